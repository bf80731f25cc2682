"""Versions damaged on disk after publishing, a damaged CURRENT pointer, and files changed under a served version:
each is refused (the old version keeps serving, /readyz and the metrics say why) and a rollback refuses it too."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY

from recsvc import artifacts
from recsvc.app import create_app
from recsvc.model_store import ModelStore
from recsvc.recommend import check_serves
from tests.test_api_fallback import tiny_settings
from training.cli import main as train_cli

DAMAGED = "vdamaged"


@pytest.fixture
def registry(trained_registry, tmp_path) -> Path:
    """A copy of the trained registry (one version, current) to damage."""
    return Path(shutil.copytree(trained_registry, tmp_path / "registry"))


def served(registry: Path) -> str:
    return artifacts.current_version(registry)


def copy_version(registry: Path, new: str) -> Path:
    """A copy of the current version under another id: loads exactly like it until damaged."""
    path = Path(shutil.copytree(artifacts.versions_root(registry) / served(registry),
                                artifacts.versions_root(registry) / new))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": new}))
    return path


def rewrite(path: Path, change) -> None:
    """Save the array at `path` as `change` makes it from the stored one."""
    np.save(path, change(np.load(path)), allow_pickle=False)


def set_owned_index(path: Path, value: int) -> None:
    rewrite(path / "owned.indices.npy", lambda indices: np.concatenate([[value], indices[1:]]).astype(indices.dtype))


def random_bytes(array: np.ndarray) -> np.ndarray:
    return np.frombuffer(np.random.default_rng(1).bytes(array.nbytes), dtype=array.dtype).reshape(array.shape)


ALS = "strategies/als/"
# Damage the audit found served, or crashing the loader: (how, expected reason).
DAMAGE = {
    "title shorter than the items": (lambda p: rewrite(p / "catalog.title.npy", lambda a: a[: len(a) // 2]),
                                     "catalog.title has"),
    "category shorter than the items": (lambda p: rewrite(p / "catalog.category.npy", lambda a: a[:-3]),
                                        "catalog.category has"),
    "owned index beyond the items": (lambda p: set_owned_index(p, 10**6), "owned.indices fall outside"),
    "negative owned index": (lambda p: set_owned_index(p, -1), "owned.indices fall outside"),
    "owned indptr decreasing": (lambda p: rewrite(p / "owned.indptr.npy",
                                                  lambda a: np.where(np.arange(len(a)) == 1, a[2] + 1, a)),
                                "owned.indptr decreases"),
    "items as unicode": (lambda p: rewrite(p / "items.npy", lambda a: a.astype("U")), "items has dtype <U"),
    "items unsorted": (lambda p: rewrite(p / "items.npy", lambda a: a[::-1]), "items is not sorted"),
    "customers as integers": (lambda p: rewrite(p / "customers.npy", lambda a: np.arange(len(a))),
                              "customers has dtype int64"),
    "item norms too short": (lambda p: rewrite(p / f"{ALS}item_norms.npy", lambda a: a[:-1]), "als.item_norms has"),
    "popularity as a column": (lambda p: rewrite(p / "strategies/popular/popularity.npy", lambda a: a[:, None]),
                               "popular.popularity has shape"),
    "random bytes in the customer factors": (lambda p: rewrite(p / f"{ALS}user_factors.npy", random_bytes),
                                             "als.user_factors holds values"),
    "absurd customer factors": (lambda p: rewrite(p / f"{ALS}user_factors.npy", lambda a: a * np.float32(1e30)),
                                "als.user_factors holds values beyond"),
    "integer factors": (lambda p: rewrite(p / f"{ALS}user_factors.npy", lambda a: a.astype(np.int8)),
                        "als.user_factors has dtype int8"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_version_is_refused_by_the_server_and_by_rollback(registry, damage):
    store = ModelStore(registry, check=check_serves)
    assert store.refresh()
    good = store.bundle.version
    make, reason = DAMAGE[damage]
    make(copy_version(registry, DAMAGED))

    rollback = CliRunner().invoke(train_cli, ["registry", "rollback", "--registry", str(registry), DAMAGED])
    assert rollback.exit_code == 2, rollback.output
    assert f"version {DAMAGED} cannot serve" in rollback.output and reason in rollback.output
    assert "Traceback" not in rollback.output and served(registry) == good

    artifacts.set_current(registry, DAMAGED)  # published by other means: the server must refuse it itself
    assert not store.refresh()
    assert store.bundle.version == good
    assert store.last_failure.version == DAMAGED and reason in store.last_failure.reason


def test_validation_passes_a_sound_version_in_one_pass_of_its_arrays(registry):
    """The trainer's own output is accepted, and so is a float64 model (scorers keep its dtype)."""
    path = copy_version(registry, DAMAGED)
    for name in ("user_factors", "item_factors_t", "item_norms"):
        rewrite(path / f"{ALS}{name}.npy", lambda a: a.astype(np.float64))
    check_serves(artifacts.load_version(registry, DAMAGED))


def break_popular_reason(path: Path) -> None:
    """A window that is no number: loads and validates, but every popular answer fails on its reason."""
    spec = path / "strategies/popular/scorer.json"
    spec.write_text(json.dumps({"kind": "popularity", "params": {"window_days": "7"}}))


def drop_popular(path: Path) -> None:
    """No popular (nor trending) strategy: nothing for the chain's last step."""
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["strategies"]["popular"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(path / "strategies/popular")


@pytest.mark.parametrize("damage, reason", [(break_popular_reason, "TypeError"), (drop_popular, "StopIteration")])
def test_a_version_that_loads_but_cannot_answer_is_refused_by_the_check_requests(registry, damage, reason):
    store = ModelStore(registry, check=check_serves)
    assert store.refresh()
    good = store.bundle.version
    damage(copy_version(registry, DAMAGED))
    artifacts.load_version(registry, DAMAGED)  # the arrays are sound
    artifacts.set_current(registry, DAMAGED)
    assert not store.refresh()
    assert store.bundle.version == good
    assert store.last_failure.version == DAMAGED and f"cannot serve: {reason}" in store.last_failure.reason


def test_the_app_refuses_a_version_that_would_answer_500_and_keeps_serving(registry, auth):
    app = create_app(tiny_settings(registry))
    client = app.test_client()
    good = served(registry)
    DAMAGE["title shorter than the items"][0](copy_version(registry, DAMAGED))
    artifacts.set_current(registry, DAMAGED)
    app.extensions["recsvc"].store.refresh()
    customer = app.extensions["recsvc"].store.bundle.customers.external(0)
    answer = client.get(f"/v1/customers/{customer}/recommendations?limit=50", headers=auth)
    assert answer.status_code == 200 and answer.get_json()["model_version"] == good
    ready = client.get("/readyz").get_json()
    assert ready["model_version"] == good and ready["last_load_failure"]["version"] == DAMAGED
    app.extensions["recsvc"].store.stop()


@pytest.mark.parametrize("pointer", [b"\xff\xfe\n", b"/etc/secret/registry/CURRENT\n", b"../v1\n", b"\n"])
def test_a_garbage_pointer_is_refused_without_echoing_it_and_the_server_starts_without_a_model(registry, pointer):
    (registry / "CURRENT").write_bytes(pointer)
    app = create_app(tiny_settings(registry))  # preloading under gunicorn: must not raise
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503
    failure = ready.get_json()["last_load_failure"]
    assert failure["version"] is None and "does not hold a version id" in failure["reason"]
    assert "secret" not in json.dumps(ready.get_json())
    app.extensions["recsvc"].store.stop()


def test_a_version_that_crashed_the_loader_leaves_the_server_starting_unready(registry):
    DAMAGE["category shorter than the items"][0](artifacts.versions_root(registry) / served(registry))
    app = create_app(tiny_settings(registry))
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503 and "catalog.category has" in ready.get_json()["last_load_failure"]["reason"]
    app.extensions["recsvc"].store.stop()


def test_a_failure_is_cleared_when_current_names_the_served_version_again(registry):
    store = ModelStore(registry, check=check_serves)
    assert store.refresh()
    good = store.bundle.version
    DAMAGE["items unsorted"][0](copy_version(registry, DAMAGED))
    artifacts.set_current(registry, DAMAGED)
    assert not store.refresh() and store.last_failure.version == DAMAGED
    result = CliRunner().invoke(train_cli, ["registry", "rollback", "--registry", str(registry), good])
    assert result.exit_code == 0, result.output
    assert not store.refresh()
    assert store.last_failure is None and store.bundle.version == good


def refusals() -> float:
    return REGISTRY.get_sample_value("recsvc_model_load_failures_total") or 0.0


def test_a_missing_pointer_is_reported_once_while_the_loaded_version_keeps_serving(registry):
    store = ModelStore(registry)
    assert store.refresh()
    good = store.bundle.version
    saved = (registry / "CURRENT").read_bytes()
    (registry / "CURRENT").unlink()
    before = refusals()
    for _ in range(3):
        assert not store.refresh()
    assert refusals() - before == 1
    assert store.bundle.version == good
    assert store.last_failure.version is None and "current pointer (CURRENT) is missing" in store.last_failure.reason
    (registry / "CURRENT").write_bytes(saved)
    assert not store.refresh() and store.last_failure is None


def test_no_pointer_before_the_first_model_is_no_failure(tmp_path, caplog):
    store = ModelStore(tmp_path)
    for _ in range(3):
        assert not store.refresh()
    assert store.bundle is None and store.last_failure is None
    # but the log says, once, where the server looks for one (a wrong RECSVC_REGISTRY is found here)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and f"{tmp_path} has no CURRENT pointer" in said[0], said


def test_an_unreadable_pointer_before_the_first_model_is_logged_in_plain_words(tmp_path, caplog):
    (tmp_path / "CURRENT").mkdir()
    assert not ModelStore(tmp_path).refresh()
    [said] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said.startswith("cannot read the registry's current pointer") and "None" not in said
    assert said.endswith("; no model version is served")


def test_files_changed_under_the_served_version_are_reported_once(registry, caplog):
    store = ModelStore(registry)
    assert store.refresh()
    good = store.bundle.version
    manifest = artifacts.versions_root(registry) / good / "manifest.json"
    before = refusals()
    with manifest.open("a") as file:  # in place, as rsync --inplace would (the manifest is not memory-mapped)
        file.write("\n")
    stat = manifest.stat()
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    for _ in range(3):
        assert not store.refresh()
    assert refusals() - before == 1
    assert store.bundle.version == good and store.last_failure.version == good
    assert "changed on disk (manifest.json)" in store.last_failure.reason
    assert [r for r in caplog.records if r.levelname == "ERROR" and "changed on disk" in r.getMessage()]


def cli(*args: str):
    return CliRunner().invoke(train_cli, list(args))


def test_trainer_commands_on_a_garbage_pointer_give_a_message_and_rollback_to_a_named_version_repairs_it(
        registry, demo_paths, tmp_path):
    good = served(registry)
    (registry / "CURRENT").write_bytes(b"\xff\xfe\n")
    config = tmp_path / "nightly.toml"
    config.write_text(f'[nightly]\ninteractions = "{demo_paths["interactions"]}"\nregistry = "{registry}"\n'
                      '[strategies]\nenabled = ["popular"]\n')
    for args in (["registry", "list"], ["registry", "show"], ["registry", "rollback"]):
        result = cli(*args, "--registry", str(registry))
        assert result.exit_code == 1 and "does not hold a version id" in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
    for args in (["fit", "--interactions", str(demo_paths["interactions"]), "--registry", str(registry)],
                 ["nightly", "--config", str(config)]):
        result = cli(*args)
        assert result.exit_code == 1 and "does not hold a version id" in result.output, (args, result.output)
        assert isinstance(result.exception, SystemExit) and "published" not in result.output
    assert cli("registry", "show", "--registry", str(registry), good).exit_code == 0
    result = cli("registry", "rollback", "--registry", str(registry), good)
    assert result.exit_code == 0, result.output
    assert served(registry) == good
