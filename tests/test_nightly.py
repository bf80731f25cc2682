"""recsvc-train nightly: the whole chain for cron, its exit codes, the cache warm-up and the lock between runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from recsvc import artifacts
from recsvc.cache import KEY_PREFIX, recent_items_key
from tests.conftest import free_port
from training.cli import main as train_cli
from training.demo_data import DemoSizes, write

FAST_ALS = "[strategies.als]\nfactors = 16\niterations = 8\n"
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
RECSVC_TRAIN = str(Path(sys.executable).parent / "recsvc-train")  # the console script cron runs


def nightly_config(path, interactions, registry, redis_url: str | None = None, strategies: str = FAST_ALS):
    redis_line = f'redis_url = "{redis_url}"\nwarm_top = 50\n' if redis_url else ""
    path.write_text(f'[nightly]\ninteractions = "{interactions}"\nregistry = "{registry}"\n{redis_line}\n{strategies}')
    return path


def nightly(config, *extra):
    return subprocess.run([RECSVC_TRAIN, "nightly", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=240, env=ENV)


def test_nightly_publishes_warms_the_cache_and_is_safe_to_rerun(demo_paths, tmp_path, redis_url, redis_client):
    registry = tmp_path / "registry"
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], registry, redis_url)
    # Recent items (POST /v1/events) are kept without a TTL; the nightly removes those whose time has passed.
    redis_client.zadd(recent_items_key("c-left"), {"i-old": time.time() - 1})
    redis_client.zadd(recent_items_key("c-back"), {"i-old": time.time() - 1, "i-new": time.time() + 3600})
    first = nightly(config)
    assert first.returncode == 0, first.stderr
    version = artifacts.current_version(registry)
    assert f"published {version}" in first.stdout and "no current model: the first model is published" in first.stdout
    assert "cache warm-up: warmed 50 entries" in first.stderr
    assert "recent items: 2 expired item(s) removed, 2 customer(s) with recent items" in first.stderr
    assert not redis_client.exists(recent_items_key("c-left"))
    assert redis_client.zrange(recent_items_key("c-back"), 0, -1) == [b"i-new"]
    assert len(redis_client.keys(f"{KEY_PREFIX}:rec:{version}:*")) == 50
    again = nightly(config)
    assert again.returncode == 0, again.stderr
    assert f"{version} was trained on the same data and configuration: nothing to do" in again.stdout
    assert "nothing to do" not in again.stderr  # said once, as the outcome, not again as a log line
    assert artifacts.list_versions(registry) == [version]


def test_nightly_exits_3_and_keeps_the_current_model_when_the_gate_refuses(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], registry)
    assert CliRunner().invoke(train_cli, ["nightly", "--config", str(config)]).exit_code == 0
    current = artifacts.current_version(registry)
    nightly_config(config, demo_paths["interactions"], registry, strategies="[strategies.als]\nfactors = 1\n"
                                                                            "iterations = 1\n")
    result = CliRunner().invoke(train_cli, ["nightly", "--config", str(config), "--quiet"])
    assert result.exit_code == 3
    assert "refused: the quality gate kept the current model" in result.output
    assert artifacts.current_version(registry) == current and artifacts.list_versions(registry) == [current]


def test_a_failed_warm_up_does_not_undo_the_publication(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], registry, unreachable)
    result = CliRunner().invoke(train_cli, ["nightly", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "cache warm-up failed, the new model serves without it" in result.output
    assert artifacts.current_version(registry) is not None


def test_the_json_summary_says_whether_the_warm_up_failed(demo_paths, tmp_path):
    """A cron job's .jsonl keeps one summary per night: it tells a night whose warm-up failed from a warm one."""
    registry = tmp_path / "registry"
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], registry, unreachable)
    result = nightly(config, "--log-format", "json", "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["outcome"] == "published"
    assert summary["warm"]["outcome"] == "failed" and "cannot reach Redis" in summary["warm"]["message"]
    assert summary["seconds"]["warm_cache"] >= 0 and {"ingest", "publish", "total"} <= set(summary["seconds"])
    plain = nightly_config(tmp_path / "plain.toml", demo_paths["interactions"], tmp_path / "other")
    assert json.loads(nightly(plain, "--log-format", "json").stdout)["warm"] == {
        "outcome": "skipped", "message": "no redis_url configured"}


@pytest.mark.parametrize("body, message", [
    ("[nightly]\nregistry = \"r\"\n", "the [nightly] section needs interactions"),
    ("[nightly]\ninteractions = \"missing.csv\"\nregistry = \"r\"\n", "missing.csv: no such file"),
    ("[nightly]\ninteractions = [\"events/*.csv\"]\nregistry = \"r\"\n", "events/*.csv: no file matches this pattern"),
    ("[nightly]\ninteractions = [\"a.csv\", 3]\nregistry = \"r\"\n",
     "nightly.interactions must be a path or a list of paths (each may be a glob pattern"),
    ("[gate]\ntolerance = 1.5\n", "gate tolerance must be in [0, 1), not 1.5"),
])
def test_unusable_nightly_input_exits_2(tmp_path, body, message):
    config = tmp_path / "nightly.toml"
    config.write_text(body)
    result = CliRunner().invoke(train_cli, ["nightly", "--config", str(config)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


HOLD_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(120)
"""


@contextmanager
def lock_held(registry: Path) -> Iterator[None]:
    """Another process holds the registry's nightly lock while the block runs (it dies with the block)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(registry / ".nightly.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.communicate(timeout=10)


def test_nightly_exits_4_while_another_process_holds_the_lock(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], registry)
    with lock_held(registry):
        result = nightly(config)
    assert result.returncode == 4, result.stderr
    assert "another run (fit, nightly or rollback) is in progress" in result.stderr
    assert "this run did nothing" in result.stderr
    assert artifacts.list_versions(registry) == []
    assert nightly(config).returncode == 0  # the lock died with its holder


def test_two_concurrent_nightly_runs_cannot_both_proceed(tmp_path):
    # Big enough that one run is still training when the other starts (each takes seconds; they start together).
    paths = write(tmp_path / "demo", DemoSizes(customers=4000, items=500, interactions=150_000), seed=5)
    registry = tmp_path / "registry"
    config = nightly_config(tmp_path / "nightly.toml", paths["interactions"], registry,
                            strategies="[strategies.als]\nfactors = 32\niterations = 25\n")
    command = [RECSVC_TRAIN, "nightly", "--config", str(config), "--force"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
            for _ in range(2)]
    outputs = [run.communicate(timeout=240) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 4], outputs
    assert len(artifacts.list_versions(registry)) == 1


def json_lines(text: str) -> list[dict]:
    """Every line parsed as JSON: fails on any plain-text line."""
    return [json.loads(line) for line in text.splitlines()]


def test_json_log_mode_writes_errors_as_json_lines_with_the_exit_code(tmp_path):
    done = nightly(tmp_path / "missing.toml", "--quiet", "--log-format", "json")
    assert done.returncode == 2
    [error] = json_lines(done.stderr)
    assert error["level"] == "error" and error["exit_code"] == 2 and "missing.toml" in error["message"]
    assert error["ts"] and done.stdout == ""


def test_json_log_mode_says_busy_in_json(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], registry)
    with lock_held(registry):
        result = nightly(config, "--quiet", "--log-format", "json")
    assert result.returncode == 4
    [error] = json_lines(result.stderr)
    assert error["exit_code"] == 4 and "this run did nothing" in error["message"]


def test_json_log_mode_logs_an_unexpected_exception_as_one_line_with_its_traceback(demo_paths, tmp_path,
                                                                                    monkeypatch):
    import training.nightly

    def bug(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(training.nightly, "fit_and_publish", bug)  # no real bug to trigger on purpose
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], tmp_path / "registry")
    result = CliRunner().invoke(train_cli, ["nightly", "--config", str(config), "--quiet", "--log-format", "json"])
    assert result.exit_code == 1
    [error] = json_lines(result.stderr)
    assert error["message"] == "internal error: RuntimeError: a bug" and error["exit_code"] == 1
    assert "Traceback (most recent call last)" in error["traceback"] and "RuntimeError: a bug" in error["traceback"]
    text = CliRunner().invoke(train_cli, ["nightly", "--config", str(config), "--quiet"])
    assert isinstance(text.exception, RuntimeError)  # text mode: the traceback as before


def test_every_json_summary_has_an_outcome(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], registry,
                            strategies='[strategies]\nenabled = ["popular"]\n')
    outcomes = []
    for _ in range(2):
        result = CliRunner().invoke(train_cli, ["nightly", "--config", str(config), "--log-format", "json"])
        outcomes.append(json.loads(result.stdout.splitlines()[-1])["outcome"])
    stricter = tmp_path / "stricter.toml"  # another holdout: the gate refuses to compare
    stricter.write_text('[strategies]\nenabled = ["popular"]\n[evaluation.holdout]\nfraction = 0.3\n')
    result = CliRunner().invoke(train_cli, ["fit", "--interactions", str(demo_paths["interactions"]), "--registry",
                                            str(registry), "--config", str(stricter), "--log-format", "json"])
    assert result.exit_code == 3
    outcomes.append(json.loads(result.stdout.splitlines()[-1])["outcome"])
    assert outcomes == ["published", "up_to_date", "refused"]


def test_the_nightly_lock_sweeps_leftovers_even_when_nothing_is_published(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], registry,
                            strategies='[strategies]\nenabled = ["popular"]\n')
    assert nightly(config).returncode == 0
    half_deleted = artifacts.versions_root(registry) / ".deleting.v20261101T023000000000Z-abcdef01.4242"
    half_deleted.mkdir()
    again = nightly(config)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert not half_deleted.exists()


def test_nightly_reads_a_list_of_files_and_patterns_and_runs_again_only_for_new_data(demo_paths, tmp_path):
    """[nightly] interactions = ["base.csv", "events/*.csv"], relative to the config: a new day's file is new
    data, a night with nothing new is up to date."""
    header, *rows = demo_paths["interactions"].read_text().splitlines(keepends=True)
    (tmp_path / "base.csv").write_text(header + "".join(rows[:12_000]))
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "2026-11-29.csv").write_text(header + "".join(rows[12_000:13_500]))
    config = tmp_path / "nightly.toml"
    config.write_text('[nightly]\ninteractions = ["base.csv", "events/*.csv"]\nregistry = "registry"\n'
                      '[strategies]\nenabled = ["popular"]\n'
                      "[gate]\ntolerance = 0.5\n")  # this test is about when nightly trains, not about the gate

    def nightly_run() -> str:
        result = CliRunner().invoke(train_cli, ["nightly", "--config", str(config)])
        assert result.exit_code == 0, result.output
        return result.output

    def current_data() -> dict:
        registry = tmp_path / "registry"
        return artifacts.read_manifest(artifacts.versions_root(registry) / artifacts.current_version(registry))["data"]

    assert "published" in nightly_run()
    first = current_data()
    assert first["rows"] == 13_500 and [Path(f["path"]).name for f in first["files"]] == ["base.csv", "2026-11-29.csv"]
    assert "nothing to do" in nightly_run()
    (tmp_path / "events" / "2026-11-30.csv").write_text(header + "".join(rows[13_500:]))
    assert "published" in nightly_run()
    second = current_data()
    assert second["rows"] == 15_000 and second["fingerprint"] != first["fingerprint"]
    assert len(artifacts.list_versions(tmp_path / "registry")) == 2
    assert "nothing to do" in nightly_run()


def test_a_night_that_trains_hashes_each_input_file_once(demo_paths, tmp_path, monkeypatch):
    """The up-to-date check fingerprints the input; the fit after it takes those fingerprints instead of reading
    every file again, and records the same values (a registry trained before stays up to date)."""
    import training.ingest

    header, *rows = demo_paths["interactions"].read_text().splitlines(keepends=True)
    days = [tmp_path / f"2026-11-{day}.csv" for day in (27, 28, 29, 30)]
    days[0].write_text(header)  # a day without events: hashed once too
    for index, path in enumerate(days[1:3]):
        path.write_text(header + "".join(rows[index * 5_000:(index + 1) * 5_000]))
    config = tmp_path / "nightly.toml"
    config.write_text(f'[nightly]\ninteractions = "2026-11-*.csv"\ncatalog = "{demo_paths["catalog"]}"\n'
                      'registry = "registry"\n[strategies]\nenabled = ["popular"]\n[gate]\ntolerance = 0.5\n')
    assert CliRunner().invoke(train_cli, ["nightly", "--config", str(config)]).exit_code == 0
    days[3].write_text(header + "".join(rows[10_000:]))  # a new day: the next night trains

    hashed = []
    fingerprint_file = training.ingest.fingerprint_file
    file_fingerprint = training.ingest.file_fingerprint
    monkeypatch.setattr(training.ingest, "file_fingerprint", lambda path: hashed.append(path) or file_fingerprint(path))
    result = CliRunner().invoke(train_cli, ["nightly", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "published" in result.output
    assert sorted(map(str, hashed)) == sorted(map(str, [*days, demo_paths["catalog"]]))
    registry = tmp_path / "registry"
    manifest = artifacts.read_manifest(artifacts.versions_root(registry) / artifacts.current_version(registry))
    assert [f["fingerprint"] for f in manifest["data"]["files"]] == [fingerprint_file(path) for path in days]
    assert manifest["data"]["catalog_fingerprint"] == fingerprint_file(demo_paths["catalog"])
    hashed.clear()
    assert "nothing to do" in CliRunner().invoke(train_cli, ["nightly", "--config", str(config)]).output
    assert len(hashed) == len(days) + 1


def _list_config(tmp_path: Path, data: str = "") -> Path:
    """[nightly] interactions = ["base.csv", "events/*"] over the demo's rows, a fast strategy and a lenient gate:
    these tests are about when nightly trains."""
    config = tmp_path / "nightly.toml"
    config.write_text('[nightly]\ninteractions = ["base.csv", "events/*"]\nregistry = "registry"\n'
                      f'[strategies]\nenabled = ["popular"]\n[gate]\ntolerance = 0.5\n{data}')
    return config


def _nightly_outcome(config: Path) -> str:
    result = CliRunner().invoke(train_cli, ["nightly", "--config", str(config), "--log-format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[-1])["outcome"]


def test_a_day_without_events_is_no_new_data_but_every_real_change_is(demo_paths, tmp_path):
    """The export's file of a day without events (its header alone, in each format it writes) adds no row, so
    nightly has nothing to do; a row changed, a file's rows removed or other event weights still train."""
    from training.event_export import export_events

    header, *rows = demo_paths["interactions"].read_text().splitlines(keepends=True)
    (tmp_path / "base.csv").write_text(header + "".join(rows[:12_000]))
    (tmp_path / "events").mkdir()
    day = tmp_path / "events" / "2026-11-29.csv"
    day.write_text(header + "".join(rows[12_000:13_500]))
    config = _list_config(tmp_path)
    assert _nightly_outcome(config) == "published"
    for name in ("2026-11-30.csv", "2026-12-01.csv.gz", "2026-12-02.parquet"):
        empty = export_events(lambda: [], tmp_path / "events" / name)
        assert empty.rows == 0
        assert _nightly_outcome(config) == "up_to_date", name
    (tmp_path / "events" / "2026-12-01.csv.gz").unlink()  # a header-only file gone: nothing gone
    assert _nightly_outcome(config) == "up_to_date"

    day.write_text(header + rows[0] + "".join(rows[12_001:13_500]))  # one row changed
    assert _nightly_outcome(config) == "published"
    assert _nightly_outcome(config) == "up_to_date"
    export_events(lambda: [], day)  # the day's rows removed: its file is header-only now
    assert _nightly_outcome(config) == "published"
    registry = tmp_path / "registry"
    data = artifacts.read_manifest(artifacts.versions_root(registry) / artifacts.current_version(registry))["data"]
    assert data["rows"] == 12_000
    assert [(Path(f["path"]).name, f["rows"]) for f in data["files"]] == [
        ("base.csv", 12_000), ("2026-11-29.csv", 0), ("2026-11-30.csv", 0), ("2026-12-02.parquet", 0)]
    assert _nightly_outcome(config) == "up_to_date"
    assert _nightly_outcome(_list_config(tmp_path, "[data]\nevent_weights = { purchase = 20 }\n")) == "published"


def test_the_first_nightly_after_the_upgrade_trains_at_most_once(demo_paths, tmp_path):
    """A manifest whose digest counted a header-only file (as before), or holds no digest at all, is not up to
    date: nightly trains once, without an error, and is up to date the night after."""
    import hashlib

    from training.config import TrainConfig
    from training.ingest import fingerprint_file
    from training.pipeline import config_digest

    header, *rows = demo_paths["interactions"].read_text().splitlines(keepends=True)
    (tmp_path / "base.csv").write_text(header + "".join(rows[:12_000]))
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "2026-11-29.csv").write_text(header)  # a day without events
    config = _list_config(tmp_path)
    registry = tmp_path / "registry"
    assert _nightly_outcome(config) == "published"

    def set_digest(digest: str | None) -> None:
        manifest_path = artifacts.versions_root(registry) / artifacts.current_version(registry) / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["config_digest"] = digest
        manifest_path.write_text(json.dumps(manifest))

    # The fingerprint as it was: the SHA-256 of both files' SHA-256s, one a line, the header-only file's too.
    joined = "".join(f"{fingerprint_file(tmp_path / name)}\n" for name in ("base.csv", "events/2026-11-29.csv"))
    set_digest(config_digest(TrainConfig.from_file(config), hashlib.sha256(joined.encode()).hexdigest(), None))
    assert _nightly_outcome(config) == "published"
    assert _nightly_outcome(config) == "up_to_date"
    set_digest(None)
    assert _nightly_outcome(config) == "published"
    assert _nightly_outcome(config) == "up_to_date"
