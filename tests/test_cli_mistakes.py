"""User mistakes on the command line: a readable message and a documented exit code, never a traceback."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from recsvc import artifacts
from recsvc.config import Settings, check_server_settings
from recsvc.errors import ConfigError
from tests.redis_process import free_port
from training.cli import main

EXIT_UNUSABLE_INPUT = 2


def run(args, **env):
    return CliRunner(env=env or None).invoke(main, args, catch_exceptions=False)


def refused(result, message: str) -> None:
    assert result.exit_code == EXIT_UNUSABLE_INPUT, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_directory_under_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(run(["demo-data", "--out", str(blocker / "demo")]), "Not a directory")


@pytest.mark.parametrize("args, message", [
    (["evaluate", "--interactions", "x.csv", "--seed", "-1"], "-1 is not in the range x>=0"),
    (["demo-data", "--out", "d", "--seed", "-1"], "-1 is not in the range x>=0"),
    (["warm-cache", "--registry", "r", "--redis-url", "http://nope"], "it must start with redis://"),
    (["warm-cache", "--registry", "r", "--redis-url", "redis://127.0.0.1:6379/abc"],
     "the database after the host must be a number, not 'abc'"),
    (["experiments", "report", "x", "--redis-url", "redis://127.0.0.1:abc/0"], "is not a Redis URL"),
])
def test_bad_options_are_refused_with_exit_2(args, message):
    refused(run(args), message)


def test_k_above_the_number_of_items_is_a_clear_error(demo_paths):
    refused(run(["evaluate", "--interactions", str(demo_paths["interactions"]), "--strategies", "popular",
                 "--k", "100000"]), "k = 100000 is more than the")


@pytest.mark.parametrize("command, setting", [
    ("fit", "set [evaluation] k in the config to at most that"),
    ("evaluate", "set --k (or [evaluation] k in the config) to at most that"),
])
def test_k_above_the_number_of_items_names_a_setting_the_command_takes(tmp_path, command, setting):
    """fit has no --k: its message must not send the user to one (the default k is 10, the file has 3 items)."""
    interactions = tmp_path / "interactions.csv"
    interactions.write_text("customer_id,item_id\n" + "".join(f"C{c},SKU-{i}\n" for c in range(4) for i in range(3)))
    args = [command, "--interactions", str(interactions), "--strategies", "popular"]
    if command == "fit":
        args += ["--registry", str(tmp_path / "registry")]
    result = run(args)
    refused(result, f"k = 10 is more than the 3 items there are to recommend; {setting}")
    if command == "fit":
        assert "--k" not in result.output


@pytest.mark.parametrize("column", [pa.array([[1], [2]]), pa.array([b"\xff", b"a"], pa.binary())])
def test_parquet_ids_that_are_neither_text_nor_numbers_are_refused(tmp_path, column):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"customer_id": column, "item_id": ["a", "b"]}), path)
    refused(run(["evaluate", "--interactions", str(path)]), "ids and event types must be text or whole numbers")


def test_an_invalid_experiments_file_exits_2_and_names_the_file(tmp_path, redis_url):
    definitions = tmp_path / "experiments.json"
    definitions.write_text("[1, 2]")
    result = run(["experiments", "report", "x", "--redis-url", redis_url, "--experiments", str(definitions)])
    refused(result, f"experiments file {definitions}")
    assert "RECSVC_EXPERIMENTS=" not in result.output


def test_a_manifest_that_is_not_an_object_is_an_artifact_error(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    assert run(["fit", "--interactions", str(demo_paths["interactions"]), "--registry", str(registry),
                "--strategies", "popular"]).exit_code == 0
    version = artifacts.current_version(registry)
    (artifacts.versions_root(registry) / version / "manifest.json").write_text(json.dumps([1, 2]))
    result = run(["registry", "show", "--registry", str(registry)])
    assert result.exit_code == 1 and "is not a JSON object" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name, value, message", [
    ("RECSVC_REDIS_URL", "http://x", "RECSVC_REDIS_URL='http://x' is not a Redis URL"),
    ("RECSVC_REDIS_URL", "redis://127.0.0.1:6379/abc", "the database after the host must be a number"),
    ("RECSVC_REDIS_URL", "redis://:s3cret@127.0.0.1:6379/abc", "RECSVC_REDIS_URL='redis://***@127.0.0.1:6379/abc'"),
    ("RECSVC_REDIS_URL", "http://admin:s3cret@x/?password=s3cret", "'http://***@x/?password=***' is not a Redis URL"),
    ("RECSVC_REDIS_URL", "redis://:s3cret@[::1:1/0", "'redis://***@[::1:1/0' is not a Redis URL"),
    ("RECSVC_REDIS_URL", "redis://:s3c/ret@127.0.0.1:1/0", "'redis://***@127.0.0.1:1/0' is not a Redis URL: the port"),
    ("RECSVC_REDIS_URL", "redis://:s3c#ret@127.0.0.1:1/0", "'redis://***@127.0.0.1:1/0' is not a Redis URL"),
    # A '/' in the password with '@' after it: the URL parser takes the rest for the database.
    ("RECSVC_REDIS_URL", "redis://:p@s3c/ret@127.0.0.1:1/0", "'redis://***@127.0.0.1:1/0' is not a Redis URL: the d"),
    ("RECSVC_REDIS_URL", "redis://127.0.0.1:1/0?Password=s3cret", "redis-py cannot use it"),
])
def test_a_redis_url_redis_py_would_misread_is_a_config_error(name, value, message):
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({name: value})
    assert message in str(refused.value)
    assert "s3c" not in str(refused.value) and "ret@" not in str(refused.value)  # never the password, nor part of it


@pytest.mark.parametrize("name", ["RECSVC_REDIS_BREAKER_FAILURES", "RECSVC_RATE_BURST", "RECSVC_MAX_BODY_BYTES",
                                  "RECSVC_LOCAL_CACHE_ENTRIES", "RECSVC_LOCAL_CACHE_BYTES",
                                  "RECSVC_CACHE_MAX_ENTRY_BYTES", "RECSVC_WORKERS", "RECSVC_THREADS"])
def test_a_count_with_a_fraction_is_refused_not_rounded_down(name):
    value = {"RECSVC_MAX_BODY_BYTES": "2048.5", "RECSVC_LOCAL_CACHE_BYTES": "100000.5",
             "RECSVC_CACHE_MAX_ENTRY_BYTES": "2048.5"}.get(name, "2.5")
    with pytest.raises(ConfigError, match=f"{name}='{value}' must be a whole number"):
        check_server_settings({name: value})
    assert check_server_settings({name: value.replace(".5", ".0")}) is not None  # 2.0 is two


@pytest.mark.parametrize("command", [["events", "export", "--out", "{tmp}/events.csv"],
                                     ["events", "trim", "--before", "2026-11-30"],
                                     ["experiments", "report", "als-vs-pop"]])
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_commands_that_read_the_event_log_need_a_redis_url(tmp_path, command, log_format):
    command = [word.format(tmp=tmp_path) for word in command]
    result = CliRunner(env={"RECSVC_REDIS_URL": None}).invoke(main, [*command, "--log-format", log_format])
    refused(result, "pass --redis-url or set RECSVC_REDIS_URL")
    if log_format == "json":
        assert json.loads(result.stderr)["exit_code"] == EXIT_UNUSABLE_INPUT
    assert not (tmp_path / "events.csv").exists()


def test_a_malformed_redis_url_is_exit_2_without_a_traceback_or_the_password():
    refused(run(["warm-cache", "--registry", "r", "--redis-url", "redis://:s3cret@[::1:1/0"]), "is not a Redis URL")
    assert "s3cret" not in run(["warm-cache", "--registry", "r", "--redis-url", "redis://:s3/cret@h:1/0"]).output


@pytest.mark.parametrize("name, value, message", [
    ("RECSVC_WORKERS", "x", "RECSVC_WORKERS='x' is not a number"),
    ("RECSVC_WORKERS", "-1", "RECSVC_WORKERS='-1' must be between 1 and 64"),
    ("RECSVC_THREADS", "0", "RECSVC_THREADS='0' must be between 1 and 64"),
    ("RECSVC_BIND", "127.0.0.1:abc", "RECSVC_BIND='127.0.0.1:abc' must be HOST:PORT"),
    ("RECSVC_LOG_LEVEL", "bogus", "RECSVC_LOG_LEVEL='bogus' must be one of debug, info"),
    ("RECSVC_REDIS_URL", "http://x", "is not a Redis URL"),
    ("RECSVC_SPOOL_DIR", "/etc/passwd", "RECSVC_SPOOL_DIR='/etc/passwd' must be a directory"),
    ("RECSVC_SPOOL_DIR", "/etc/passwd/spool", "RECSVC_SPOOL_DIR='/etc/passwd/spool' must be a directory"),
    ("RECSVC_LOCAL_CACHE_BYTES", "100", "RECSVC_LOCAL_CACHE_BYTES='100' must be between 704 and"),
    ("RECSVC_LOCAL_CACHE_ENTRIES", "0", "RECSVC_LOCAL_CACHE_ENTRIES='0' must be between 1 and"),
    ("RECSVC_REGISTRY", "/etc/passwd", "RECSVC_REGISTRY='/etc/passwd' must be a directory"),
    ("RECSVC_CORS_ORIGINS", "https://agents.example.com/", "RECSVC_CORS_ORIGINS: 'https://agents.example.com/' is "
                                                           "not an origin"),
])
def test_recsvc_serve_refuses_a_wrong_setting_with_exit_2(tmp_path, name, value, message):
    env = {**os.environ, "RECSVC_REGISTRY": str(tmp_path), name: value}
    done = subprocess.run([sys.executable, "-m", "recsvc.cli", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name, value, message", [
    ("RECSVC_CACHE_TTL", "forever", "RECSVC_CACHE_TTL='forever' is not a number"),
    ("RECSVC_EXPERIMENTS", "/nonexistent/experiments.json", "RECSVC_EXPERIMENTS=/nonexistent/experiments.json"),
    ("RECSVC_CORS_ORIGINS", "agents.example.com", "RECSVC_CORS_ORIGINS: 'agents.example.com' is not an origin: it "
                                                  "must start with https:// or http://"),
])
def test_the_images_gunicorn_refuses_a_wrong_setting_as_recsvc_serve_does(tmp_path, name, value, message):
    """The Dockerfile's CMD starts gunicorn with gunicorn_conf.py, without `recsvc serve` in front."""
    env = {**os.environ, "RECSVC_REGISTRY": str(tmp_path), "RECSVC_BIND": "127.0.0.1:1", name: value}
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "python:recsvc.gunicorn_conf", "recsvc.wsgi:app"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"error: {message}" in done.stderr and "Traceback" not in done.stderr


def test_recsvc_serve_refuses_a_metrics_directory_that_is_a_file(tmp_path):
    blocker = tmp_path / "metrics"
    blocker.write_text("x")
    env = {**os.environ, "RECSVC_REGISTRY": str(tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(blocker)}
    done = subprocess.run([sys.executable, "-m", "recsvc.cli", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "PROMETHEUS_MULTIPROC_DIR=" in done.stderr and "Traceback" not in done.stderr


def test_a_catalog_with_an_unreadable_active_flag_or_no_matching_item_is_refused(demo_paths, tmp_path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("item_id,title,category,active\nSKU-00001,A,Phones,maybe\n")
    args = ["evaluate", "--interactions", str(demo_paths["interactions"]), "--strategies", "popular",
            "--catalog", str(catalog)]
    refused(run(args), "row 2: active must be true or false (or 1/0, yes/no), not 'maybe'")
    catalog.write_text("item_id,title,category,active\nnot-an-item,A,Phones,true\n")
    refused(run(args), "none of the catalog's 1 item ids is among the interactions' items")


def test_a_directory_or_an_empty_strategy_list_is_refused(demo_paths, tmp_path):
    refused(run(["evaluate", "--interactions", str(tmp_path)]), "is a directory, not a file")
    refused(run(["evaluate", "--interactions", str(demo_paths["interactions"]), "--strategies", ",,"]),
            "--strategies ',,' names no strategy")


def test_an_empty_holdout_is_said_out_loud(tmp_path):
    interactions = tmp_path / "one.csv"
    interactions.write_text("customer_id,item_id\nc1,i1\n")
    result = CliRunner().invoke(main, ["evaluate", "--interactions", str(interactions),
                                       "--strategies", "popular", "--k", "1"])
    assert result.exit_code == 0, result.output
    assert "the holdout is empty" in result.stderr


def test_a_wrong_value_in_the_tuning_space_stops_tune_before_any_trial(demo_paths, tmp_path):
    config = tmp_path / "tune.toml"
    config.write_text("[tuning.space.als]\nfactors = [8, \"x\"]\n")
    result = run(["tune", "--interactions", str(demo_paths["interactions"]), "--strategy", "als", "--trials", "2",
                  "--config", str(config)])
    refused(result, "als: factors must be a whole number of at least 1, not 'x'")
    assert "trial 1/" not in result.output


def test_a_registry_under_a_file_is_refused_before_training(demo_paths, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run(["fit", "--interactions", str(demo_paths["interactions"]), "--registry", str(blocker / "registry"),
                  "--strategies", "popular"])
    refused(result, "Not a directory")
    assert "fit." not in result.output  # refused before any step ran


def test_a_current_pointer_that_cannot_be_written_leaves_no_version_behind(demo_paths, tmp_path, monkeypatch):
    registry = tmp_path / "registry"

    def refuse(_registry, _version):
        raise PermissionError(13, "Permission denied", str(registry / "CURRENT"))

    monkeypatch.setattr(artifacts, "set_current", refuse)
    refused(run(["fit", "--interactions", str(demo_paths["interactions"]), "--registry", str(registry),
                 "--strategies", "popular"]), "Permission denied")
    assert list((registry / "versions").iterdir()) == []


def test_evaluate_in_json_log_mode_prints_its_summary_as_one_json_line(demo_paths):
    result = CliRunner().invoke(main, ["evaluate", "--interactions", str(demo_paths["interactions"]),
                                       "--strategies", "popular", "--log-format", "json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["event"] == "summary" and summary["best"] == "popular"
    assert 0 < summary["metrics"]["popular"]["ndcg@10"] <= 1


def test_catalog_rows_that_repeat_an_item_are_warned_about(demo_paths, tmp_path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("item_id,title,category,active\nSKU-00001,Old title,Phones,true\n"
                       "SKU-00002,B,Phones,true\nSKU-00001,New title,Phones,false\n")
    result = CliRunner().invoke(main, ["evaluate", "--interactions", str(demo_paths["interactions"]),
                                       "--strategies", "popular", "--catalog", str(catalog)])
    assert result.exit_code == 0, result.output
    assert "1 catalog rows repeat an item id listed before; the last row of each is used" in result.stderr
    assert "'SKU-00001' in rows 2 and 4" in result.stderr


def test_a_full_disk_is_named_with_the_file_it_stopped(tmp_path):
    with pytest.raises(OSError) as raised:  # /dev/full: every write fails as on a full disk
        artifacts.save_array(Path("/dev/full"), np.arange(100_000))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == "/dev/full"
    assert str(raised.value) == "[Errno 28] No space left on device: '/dev/full'"


def test_a_registry_that_cannot_take_the_model_exits_1_naming_the_problem_and_the_file(demo_paths, tmp_path):
    registry = tmp_path / "registry"
    done = subprocess.run([str(Path(sys.executable).parent / "recsvc-train"), "fit", "--interactions",
                           str(demo_paths["interactions"]), "--registry", str(registry), "--strategies", "popular"],
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)))
    assert done.returncode == 1, done.stderr  # the machine's trouble, not the user's input
    assert f"error: File too large: {artifacts.versions_root(registry)}/." in done.stderr
    assert "requested and" not in done.stderr and "Traceback" not in done.stderr
    assert list(artifacts.versions_root(registry).iterdir()) == []


@pytest.mark.parametrize("name, value, message", [
    ("RECSVC_EXPERIMENTS", '{"experiments": [{"name": "x"}]}', "experiments.json: invalid experiment definitions"),
    ("RECSVC_CACHE_TTL", "abc", "RECSVC_CACHE_TTL='abc' is not a number"),
])
def test_gunicorn_started_directly_refuses_a_wrong_setting_with_exit_2(tmp_path, name, value, message):
    """The container's CMD runs gunicorn without `recsvc serve`: the same message, no traceback."""
    if name == "RECSVC_EXPERIMENTS":
        (tmp_path / "experiments.json").write_text(value)
        value = str(tmp_path / "experiments.json")
    env = {**os.environ, "RECSVC_REGISTRY": str(tmp_path), "RECSVC_AUTH": "off", "RECSVC_SPOOL_DIR":
           str(tmp_path / "spool"), "RECSVC_BIND": f"127.0.0.1:{free_port()}", name: value}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "python:recsvc.gunicorn_conf", "recsvc.wsgi:app"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("error: ") == 1
    assert "Traceback" not in done.stderr
