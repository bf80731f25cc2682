"""recsvc-train registry list|show|rollback, retention that never removes CURRENT or the version current before
it, the sweep of what killed runs leave, and the modes of what the trainer writes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from recsvc import artifacts
from recsvc.artifacts import Catalog, IdIndex, ModelBundle
from recsvc.model_store import ModelStore
from recsvc.scoring import PopularityScorer
from tests.test_nightly import lock_held
from training.cli import main as train_cli
from training.registry import apply_retention, make_current, protected_versions


def publish(registry, version: str, ndcg: float, current: bool = True) -> None:
    """A small but complete version, as the trainer writes it."""
    popularity = np.array([3, 1, 2], dtype=np.float32)
    bundle = ModelBundle(
        manifest={"version": version, "created_at": f"2026-11-{version[1:3]}T02:00:00+00:00",
                  "default_strategy": "popular", "evaluation": {"primary_metric": "ndcg@10"},
                  "strategies": {"popular": {"metrics": {"ndcg@10": ndcg}}},
                  "data": {"rows": 7, "customers": 2, "items": 3}},
        customers=IdIndex(artifacts.encode_ids(["c1", "c2"])), items=IdIndex(artifacts.encode_ids(["i1", "i2", "i3"])),
        owned=sp.csr_matrix(np.array([[1, 0, 1], [0, 1, 0]], dtype=np.float32)),
        catalog=Catalog.empty(3), scorers={"popular": PopularityScorer(popularity)})
    artifacts.write_version(registry, bundle)
    if current:
        artifacts.set_current(registry, version)


@pytest.fixture
def registry(tmp_path):
    for day, ndcg in ((10, 0.30), (11, 0.31), (12, 0.32)):
        publish(tmp_path, f"v{day}", ndcg)
    return tmp_path


def run(*args):
    return CliRunner().invoke(train_cli, ["registry", *args], catch_exceptions=False)


def test_list_marks_the_current_version(registry):
    result = run("list", "--registry", str(registry))
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["v10", "v11", "*"]
    assert "ndcg@10 0.3200" in lines[3] and lines[3].split()[1] == "v12"
    as_json = json.loads(run("list", "--registry", str(registry), "--json").output)
    assert [(v["version"], v["current"]) for v in as_json] == [("v10", False), ("v11", False), ("v12", True)]


def test_show_prints_a_manifest(registry):
    result = run("show", "--registry", str(registry), "v11")
    assert result.exit_code == 0
    assert json.loads(result.output)["strategies"]["popular"]["metrics"]["ndcg@10"] == 0.31
    assert json.loads(run("show", "--registry", str(registry)).output)["version"] == "v12"  # default: current


def test_rollback_restores_the_previous_version_and_a_server_follows(registry):
    store = ModelStore(registry)
    assert store.refresh() and store.bundle.version == "v12"
    result = run("rollback", "--registry", str(registry))
    assert result.exit_code == 0
    assert result.output.strip() == "CURRENT: v12 -> v11"
    assert artifacts.current_version(registry) == "v11"
    assert store.refresh() and store.bundle.version == "v11"
    assert run("rollback", "--registry", str(registry)).output.strip() == "CURRENT: v11 -> v10"
    assert run("rollback", "--registry", str(registry), "v12").output.strip() == "CURRENT: v10 -> v12"


def test_an_unreadable_pointer_is_refused_once_without_paths_and_forgotten_when_it_reads_again(registry,
                                                                                               monkeypatch):
    from prometheus_client import REGISTRY

    def refusals() -> float:
        return REGISTRY.get_sample_value("recsvc_model_load_failures_total") or 0.0

    monkeypatch.chdir(registry.parent)
    store = ModelStore(registry.relative_to(registry.parent))  # relative, as RECSVC_REGISTRY=var/registry gives
    assert store.refresh()
    pointer = registry / "CURRENT"
    saved = pointer.read_bytes()
    pointer.unlink()
    pointer.mkdir()
    before = refusals()
    for _ in range(3):  # the watcher checks again every interval
        assert not store.refresh()
    assert refusals() - before == 1  # counted (and logged) once, not at every check
    assert store.last_failure.version is None and store.last_failure.reason.endswith("'CURRENT'")  # no path left
    pointer.rmdir()
    pointer.write_bytes(saved)
    assert not store.refresh()  # the same version as before: nothing to load
    assert store.last_failure is None and store.bundle.version == "v12"


def test_rollback_refuses_missing_damaged_and_nonexistent_targets(registry):
    (artifacts.versions_root(registry) / "v11" / "items.npy").unlink()
    result = run("rollback", "--registry", str(registry))
    assert result.exit_code == 2
    assert "version v11 cannot serve" in result.output
    assert run("rollback", "--registry", str(registry), "v99").output.strip().endswith("no version v99")
    assert artifacts.current_version(registry) == "v12"
    artifacts.set_current(registry, "v10")
    assert "no version before v10" in run("rollback", "--registry", str(registry)).output


def test_registry_commands_on_a_directory_that_is_no_registry(tmp_path):
    result = run("list", "--registry", str(tmp_path / "nothing"))
    assert result.exit_code == 2
    assert "not a model registry" in result.output and "Traceback" not in result.output


def test_retention_keeps_the_newest_versions(registry):
    publish(registry, "v13", 0.33)
    assert apply_retention(registry, keep=2) == ["v10", "v11"]
    assert artifacts.list_versions(registry) == ["v12", "v13"]
    assert not [p for p in artifacts.versions_root(registry).iterdir() if p.name.startswith(".")]


def test_retention_never_removes_current_or_the_version_before_it(registry):
    publish(registry, "v13", 0.33, current=False)
    publish(registry, "v14", 0.34, current=False)
    artifacts.set_current(registry, "v11")  # after a rollback, CURRENT is old
    assert protected_versions(registry, keep=1) == {"v14", "v11", "v10"}
    assert apply_retention(registry, keep=1) == ["v12", "v13"]
    assert artifacts.list_versions(registry) == ["v10", "v11", "v14"]
    assert artifacts.load_current(registry).version == "v11"


def test_fit_applies_the_configured_retention(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    for day in (1, 2, 3):
        publish(registry, f"v0{day}", 0.0)
    config = tmp_path / "keep2.toml"
    config.write_text("[retention]\nkeep_versions = 2\n[strategies]\nenabled = [\"popular\"]\n")
    result = CliRunner().invoke(train_cli, ["fit", "--interactions", str(demo_paths["interactions"]), "--registry",
                                            str(registry), "--config", str(config), "--force"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "retention removed v01, v02" in result.output
    assert artifacts.list_versions(registry) == ["v03", artifacts.current_version(registry)]


# --- the history of CURRENT: what a rollback goes to and what retention keeps --------------------------


def fit(demo_paths, registry, *extra):
    result = CliRunner().invoke(train_cli, ["fit", "--interactions", str(demo_paths["interactions"]), "--registry",
                                            str(registry), "--strategies", "popular", "--force", *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return artifacts.current_version(registry)


def test_retention_after_two_rollbacks_keeps_the_version_rolled_back_to(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    v1, v2, v3, v4 = (fit(demo_paths, registry) for _ in range(4))
    run("rollback", "--registry", str(registry))
    assert run("rollback", "--registry", str(registry)).output.strip() == f"CURRENT: {v3} -> {v2}"
    config = tmp_path / "keep1.toml"
    config.write_text("[retention]\nkeep_versions = 1\n")
    v5 = fit(demo_paths, registry, "--config", str(config))
    assert artifacts.list_versions(registry) == [v2, v5]  # v4 and v3 were rolled away from as bad
    assert run("rollback", "--registry", str(registry)).output.strip() == f"CURRENT: {v5} -> {v2}"


def test_a_rollback_goes_to_the_version_current_before_not_the_next_older_id(registry):
    assert run("rollback", "--registry", str(registry)).output.strip() == "CURRENT: v12 -> v11"
    publish(registry, "v13", 0.33, current=False)
    make_current(registry, "v13")  # the next night publishes on top of v11
    assert protected_versions(registry, keep=0) == {"v13", "v11"}
    assert run("rollback", "--registry", str(registry)).output.strip() == "CURRENT: v13 -> v11"
    assert run("rollback", "--registry", str(registry)).output.strip() == "CURRENT: v11 -> v10"  # not back to v13


def test_rollback_to_the_current_version_says_nothing_changed(registry):
    assert run("rollback", "--registry", str(registry), "v12").output.strip() == \
        "CURRENT: v12 is current already; nothing changed"
    assert run("rollback", "--registry", str(registry)).output.strip() == "CURRENT: v12 -> v11"  # history intact


def test_rollback_on_an_empty_registry_says_there_is_no_current_version(tmp_path):
    artifacts.versions_root(tmp_path).mkdir()
    result = run("rollback", "--registry", str(tmp_path))
    assert result.exit_code == 2
    assert "the registry has no current version" in result.output and "None" not in result.output


def test_rollback_exits_4_while_a_nightly_run_holds_the_lock(registry):
    with lock_held(registry):
        result = CliRunner().invoke(train_cli, ["registry", "rollback", "--registry", str(registry)])
    assert result.exit_code == 4, result.output
    assert "another run (fit, nightly or rollback) is in progress" in result.stderr
    assert artifacts.current_version(registry) == "v12"


def test_fit_exits_4_while_another_run_holds_the_lock(registry, tmp_path_factory):
    interactions = tmp_path_factory.mktemp("data") / "interactions.csv"
    interactions.write_text("customer_id,item_id\n" + "".join(f"c{c},i{(c + i) % 12}\n" for c in range(40)
                                                             for i in range(4)))
    with lock_held(registry):
        result = CliRunner().invoke(train_cli, ["fit", "--interactions", str(interactions), "--registry", str(registry),
                                                "--strategies", "popular", "--force"])
    assert result.exit_code == 4, result.output
    assert "another run (fit, nightly or rollback) is in progress" in result.stderr
    assert artifacts.current_version(registry) == "v12" and len(artifacts.list_versions(registry)) == 3


# --- what killed runs leave behind, and who can read the registry --------------------------------------


def leftover(path, age_seconds: float, directory: bool = True):
    """A hidden entry as a killed run leaves it, `age_seconds` old."""
    if directory:
        path.mkdir()
        (path / "items.npy").write_bytes(b"x" * 1000)
    else:
        path.write_text("v1\n")
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))
    return path


def test_publishing_sweeps_what_killed_runs_left_but_not_a_run_in_progress(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    fit(demo_paths, registry)
    root = artifacts.versions_root(registry)
    stale = [leftover(root / ".v20261101T023000000000Z-abcdef01.k2j4h5", 2 * 3600),
             leftover(root / ".deleting.v20261101T023000000000Z-abcdef01.4242", 10),  # renamed away: any age
             leftover(registry / ".CURRENT.x8d7f", 2 * 3600, directory=False)]
    in_progress = leftover(root / ".v20261130T023000000000Z-abcdef02.p0o9i8", 60)
    lock = leftover(registry / ".nightly.lock", 2 * 3600, directory=False)
    result = CliRunner().invoke(train_cli, ["fit", "--interactions", str(demo_paths["interactions"]), "--registry",
                                            str(registry), "--strategies", "popular", "--force"])
    assert result.exit_code == 0, result.output
    assert "removed what interrupted runs left in" in result.stderr
    assert not any(path.exists() for path in stale)
    assert in_progress.exists() and lock.exists()


SIGTERM_WHILE_PUBLISHING = """
import os, signal, sys
from recsvc import artifacts
from training.cli import main

written = artifacts.save_array
def save_then_sigterm(path, array):  # the signal arrives once the version's first file is on disk
    written(path, array)
    os.kill(os.getpid(), signal.SIGTERM)
artifacts.save_array = save_then_sigterm
main(sys.argv[1:], prog_name="recsvc-train")
"""


def test_sigterm_while_publishing_leaves_no_half_written_version(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    done = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_PUBLISHING, "fit", "--interactions",
                           str(demo_paths["interactions"]), "--registry", str(registry), "--strategies", "popular",
                           "--log-format", "json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert json.loads(done.stderr.splitlines()[-1])["message"] == "terminated by SIGTERM"
    assert list(artifacts.versions_root(registry).iterdir()) == []  # the staging directory was removed
    assert artifacts.current_version(registry) is None


def test_registry_files_follow_the_umask_so_a_server_under_another_user_can_read_them(demo_paths, tmp_path):
    registry = tmp_path / "registry"

    def fit(umask: int) -> None:
        done = subprocess.run([str(Path(sys.executable).parent / "recsvc-train"), "fit", "--force", "--interactions",
                               str(demo_paths["interactions"]), "--registry", str(registry), "--strategies", "popular"],
                              capture_output=True, text=True, timeout=120, umask=umask)
        assert done.returncode == 0, done.stderr

    fit(0o022)
    fit(0o027)  # the cron user's umask changed: CURRENT and HISTORY follow it, not their old modes
    version = artifacts.versions_root(registry) / artifacts.current_version(registry)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(version) == 0o750 and mode(version / "strategies") == 0o750
    assert {mode(path) for path in version.rglob("*") if path.is_file()} == {0o640}
    assert mode(registry / "CURRENT") == 0o640 and mode(registry / "HISTORY") == 0o640


def test_a_worker_forked_while_the_masters_watcher_loads_a_version_still_starts(registry):
    """gunicorn forks a replacement worker whenever one dies; the master's own watcher may be loading a new
    version at that moment, holding the store's lock, and the child inherits it locked with no thread to
    release it: its start_watching (post_worker_init) blocked forever, so the worker never booted."""
    store = ModelStore(registry, reload_interval=3600)
    assert store.refresh()
    with store._lock:  # the master's watcher, mid-load
        pid = os.fork()
        if pid == 0:  # the worker: must start watching and still refresh
            code = 1
            try:
                signal.alarm(10)  # on the old code this hangs; the alarm ends it with a failure
                store.start_watching()
                store.refresh(retry_refused=True)
                code = 0
            finally:
                os._exit(code)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked worker hung on the lock its parent held at the fork")
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_fork_waits_for_the_watchers_round_so_the_child_inherits_no_lock_it_held(registry):
    """Whatever the watcher's round holds (here a lock standing for prometheus_client's, taken while a metric is
    written) must not be inherited locked by a worker forked meanwhile."""
    store = ModelStore(registry, reload_interval=0.01)
    assert store.refresh()
    inside, metric_lock = threading.Event(), threading.Lock()

    def writes_a_metric_slowly():
        with metric_lock:
            inside.set()
            time.sleep(0.5)

    store.also_check.append(writes_a_metric_slowly)
    store.current()  # starts the watcher
    assert inside.wait(5)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if metric_lock.acquire(timeout=3) else 1)
    store.stop()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child inherited the lock the watcher's round held"
