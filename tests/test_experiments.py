"""Experiment definitions, sticky assignment, and experiments in recommendation responses."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from recsvc.app import create_app
from recsvc.errors import ConfigError
from recsvc.event_log import EXPOSURE
from recsvc.experiments import BUCKETS, bucket, load_experiments, parse_experiments

# The exact shape from the issue, with strategies the test registry has (als, popular).
ISSUE_SHAPE = {"experiments": [{"name": "als-vs-ease", "salt": "2026-11", "status": "running", "control": "control",
                                "variants": [{"name": "control", "strategy": "als", "weight": 50},
                                             {"name": "treatment", "strategy": "ease", "weight": 50}]}]}
SERVED = {"name": "als-vs-pop", "salt": "2026-11", "status": "running", "control": "control",
          "variants": [{"name": "control", "strategy": "als", "weight": 50},
                       {"name": "treatment", "strategy": "popular", "weight": 50}]}


def write_definitions(path: Path, *experiments: dict) -> Path:
    path.write_text(json.dumps({"experiments": list(experiments)}), encoding="utf-8")
    return path


@pytest.fixture
def experiment_settings(settings, redis_url, redis_client, tmp_path):
    """The test settings with Redis, one running experiment (als vs popular) and a private spool."""
    return dataclasses.replace(settings, redis_url=redis_url, spool_dir=tmp_path / "spool",
                               experiments_path=write_definitions(tmp_path / "experiments.json", SERVED))


def start_app(settings):
    app = create_app(settings)
    app.config.update(TESTING=True)
    return app


def stop_app(app) -> None:
    service = app.extensions["recsvc"]
    service.store.stop()
    service.event_log.stop()


@pytest.fixture
def experiment_app(experiment_settings):
    app = start_app(experiment_settings)
    yield app
    stop_app(app)


def exposures(app) -> list[dict]:
    return list(app.extensions["recsvc"].event_log.read(EXPOSURE))


# --- definitions -------------------------------------------------------------


def test_the_issue_json_shape_is_accepted_as_it_is(tmp_path):
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps(ISSUE_SHAPE), encoding="utf-8")
    experiment = load_experiments(path).get("als-vs-ease")
    assert experiment.control == "control"
    assert [(v.name, v.strategy, v.weight) for v in experiment.variants] == [("control", "als", 50),
                                                                            ("treatment", "ease", 50)]


def test_toml_definitions_with_a_window(tmp_path):
    path = tmp_path / "experiments.toml"
    path.write_text("""
[[experiments]]
name = "pop-test"
salt = "s1"
status = "running"
control = "a"
start = 2026-01-01T00:00:00Z
end = "2026-02-01T00:00:00+00:00"
variants = [{name = "a", strategy = "popular", weight = 1}, {name = "b", strategy = "als", weight = 3}]
""", encoding="utf-8")
    experiment = load_experiments(path).get("pop-test")
    assert experiment.start.isoformat() == "2026-01-01T00:00:00+00:00"
    assert experiment.boundaries() == [2500, 10_000]


@pytest.mark.parametrize("start, end", [("2026-01-01", "2026-02-01"),  # TOML dates
                                        ("2026-01-01T00:00:00", '"2026-02-01"')])  # a local date-time; a string
def test_a_window_without_a_zone_or_a_time_is_midnight_utc(tmp_path, start, end):
    path = tmp_path / "experiments.toml"
    path.write_text(f"""
[[experiments]]
name = "days"
salt = "s1"
status = "running"
control = "a"
start = {start}
end = {end}
variants = [{{name = "a", strategy = "popular", weight = 1}}, {{name = "b", strategy = "als", weight = 1}}]
""", encoding="utf-8")
    experiment = load_experiments(path).get("days")
    assert (experiment.start.isoformat(), experiment.end.isoformat()) == ("2026-01-01T00:00:00+00:00",
                                                                         "2026-02-01T00:00:00+00:00")


@pytest.mark.parametrize("change, field", [
    ({"status": "paused"}, "status"),
    ({"control": "nobody"}, "control"),
    ({"variants": [{"name": "control", "strategy": "als", "weight": 50}]}, "variants"),
    ({"variants": [{"name": "control", "strategy": "als", "weight": "50"},
                   {"name": "b", "strategy": "als", "weight": 1}]}, "variants"),
    ({"variants": [{"name": "control", "strategy": "als", "weight": 0},
                   {"name": "b", "strategy": "als", "weight": 0}]}, "variants"),
    ({"salt": ""}, "salt"),
    ({"colour": "red"}, "colour"),
    ({"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "end"),
])
def test_a_wrong_definition_is_refused_naming_the_field(change, field):
    with pytest.raises(ConfigError) as caught:
        parse_experiments({"experiments": [{**SERVED, **change}]}, "test")
    assert field in caught.value.message
    assert caught.value.message.startswith("test: invalid experiment definitions")


def test_unparsable_or_missing_files_are_clear_config_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_experiments(broken)
    with pytest.raises(ConfigError, match="no such file"):
        load_experiments(tmp_path / "absent.toml")


@pytest.mark.parametrize("name, text, named", [
    # an operator who stops an experiment by adding a line, leaving the old one above it
    ("experiments.json", json.dumps({"experiments": [SERVED]})[:-3] + ', "status": "stopped"}]}',
     "the key 'status' is given more than once"),
    # TOML refuses it itself (tomllib names the line, not the key)
    ("experiments.toml", '[[experiments]]\nname = "a"\nstatus = "running"\nstatus = "stopped"\n', "line 4"),
])
def test_a_key_given_twice_in_one_object_is_refused_not_the_last_taken(tmp_path, name, text, named):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    message = _error_of(path)
    assert "cannot parse" in message and named in message, message


def test_a_directory_a_fifo_or_a_device_is_refused_at_once(tmp_path):
    fifo = tmp_path / "experiments.json"
    os.mkfifo(fifo)
    outcome: list = []
    reader = threading.Thread(target=lambda: outcome.append(_error_of(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # the old code blocked in open() until a writer came: release it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome and "not a regular file" in outcome[0]
    assert "not a regular file" in _error_of(Path("/dev/zero"))  # read() would never end
    assert "is a directory" in _error_of(tmp_path)


def test_deeply_nested_json_is_a_message_not_a_traceback(tmp_path):
    path = tmp_path / "experiments.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    assert "nested too deeply" in _error_of(path)


def _error_of(path: Path) -> str:
    try:
        load_experiments(path)
    except ConfigError as exc:
        return exc.message
    return "loaded"


def test_the_app_refuses_to_start_with_a_bad_file(settings, tmp_path):
    path = write_definitions(tmp_path / "bad.json", {**SERVED, "status": "maybe"})
    with pytest.raises(ConfigError, match="RECSVC_EXPERIMENTS"):
        create_app(dataclasses.replace(settings, experiments_path=path, spool_dir=tmp_path / "spool"))


# --- assignment --------------------------------------------------------------


def test_bucket_is_sha256_of_salt_and_customer():
    # Reference computed independently: int(sha256(b"2026-11\x00customer-42").hexdigest()[:16], 16) % 10000
    import hashlib

    expected = int(hashlib.sha256(b"2026-11\x00customer-42").hexdigest()[:16], 16) % BUCKETS
    assert bucket("2026-11", "customer-42") == expected
    # Another salt reshuffles: a customer keeps the same bucket only by chance (1 in 10,000).
    assert sum(bucket("2026-11", f"c{i}") == bucket("2026-12", f"c{i}") for i in range(1000)) < 5
    assert len({bucket("2026-11", f"c{i}") for i in range(5000)}) > 3000  # spread over the buckets


def test_weights_split_customers_in_proportion():
    experiment = parse_experiments({"experiments": [{**SERVED, "variants": [
        {"name": "control", "strategy": "als", "weight": 20}, {"name": "b", "strategy": "als", "weight": 30},
        {"name": "c", "strategy": "popular", "weight": 50}]}]}).get("als-vs-pop")
    counts = Counter(experiment.variant_of(f"customer-{i}").name for i in range(40_000))
    for name, share in (("control", 0.2), ("b", 0.3), ("c", 0.5)):
        assert abs(counts[name] / 40_000 - share) < 0.01, counts


def test_assignment_is_the_same_in_another_process_with_another_hash_seed(tmp_path):
    definitions = write_definitions(tmp_path / "experiments.json", SERVED)
    ids = [f"customer-{i}" for i in range(500)]
    here = [load_experiments(definitions).get("als-vs-pop").variant_of(c).name for c in ids]
    script = ("import json, sys; from recsvc.experiments import load_experiments; "
              "e = load_experiments(sys.argv[1]).get('als-vs-pop'); "
              "print(json.dumps([e.variant_of(f'customer-{i}').name for i in range(500)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", script, str(definitions)], env=env, capture_output=True,
                           text=True, check=True)
    assert json.loads(other.stdout) == here
    assert set(here) == {"control", "treatment"}


# --- serving -----------------------------------------------------------------


def test_get_experiments_lists_definitions_and_missing_strategies(experiment_settings, tmp_path, client, auth):
    both = write_definitions(tmp_path / "both.json", SERVED, ISSUE_SHAPE["experiments"][0])
    app = start_app(dataclasses.replace(experiment_settings, experiments_path=both))
    try:
        body = app.test_client().get("/v1/experiments", headers=auth).get_json()
    finally:
        stop_app(app)
    by_name = {e["name"]: e for e in body["experiments"]}
    assert by_name["als-vs-pop"]["serving"] is True and by_name["als-vs-pop"]["missing_strategies"] == []
    assert by_name["als-vs-ease"]["serving"] is False  # only the first running experiment assigns
    assert by_name["als-vs-ease"]["missing_strategies"] == ["ease"]
    assert by_name["als-vs-ease"]["variants"][1] == {"name": "treatment", "strategy": "ease", "weight": 50}
    assert client.get("/v1/experiments").status_code == 401


def test_response_names_the_experiment_and_variant_and_records_the_exposure(experiment_app, auth):
    client = experiment_app.test_client()
    experiment = load_experiments(experiment_app.extensions["recsvc"].settings.experiments_path).get("als-vs-pop")
    body = client.get("/v1/customers/c-1/recommendations", headers=auth).get_json()
    variant = experiment.variant_of("c-1")
    assert body["experiment"] == {"name": "als-vs-pop", "variant": variant.name}
    assert body["strategy"] == variant.strategy
    [record] = exposures(experiment_app)
    assert {k: record[k] for k in ("request_id", "customer_id", "experiment", "variant", "strategy")} == {
        "request_id": body["request_id"], "customer_id": "c-1", "experiment": "als-vs-pop",
        "variant": variant.name, "strategy": variant.strategy}
    assert record["time"] > 1.7e9


def test_cache_hits_are_exposures_too_and_carry_this_requests_experiment(experiment_app, auth):
    client = experiment_app.test_client()
    first = client.get("/v1/customers/c-2/recommendations", headers=auth).get_json()
    second = client.get("/v1/customers/c-2/recommendations", headers=auth).get_json()
    assert experiment_app.extensions["recsvc"].recommender.computations == 1  # the second was a cache hit
    assert second["experiment"] == first["experiment"] and second["request_id"] != first["request_id"]
    assert [r["request_id"] for r in exposures(experiment_app)] == [first["request_id"], second["request_id"]]


def test_a_cached_list_does_not_keep_an_experiment_that_stopped(experiment_settings, tmp_path, auth):
    app = start_app(experiment_settings)
    try:
        assert app.test_client().get("/v1/customers/c-3/recommendations", headers=auth).get_json()["experiment"]
    finally:
        stop_app(app)
    stopped = write_definitions(tmp_path / "stopped.json", {**SERVED, "status": "stopped"})
    app = start_app(dataclasses.replace(experiment_settings, experiments_path=stopped))
    try:
        body = app.test_client().get("/v1/customers/c-3/recommendations", headers=auth).get_json()
    finally:
        stop_app(app)
    assert body["experiment"] is None


def test_an_explicit_strategy_bypasses_the_experiment_and_is_not_counted(experiment_app, auth):
    client = experiment_app.test_client()
    body = client.get("/v1/customers/c-4/recommendations?strategy=popular", headers=auth).get_json()
    assert body["experiment"] is None and body["strategy"] == "popular"
    assert exposures(experiment_app) == []


def test_a_variant_whose_strategy_the_model_lacks_is_served_the_default_uncounted(experiment_settings, tmp_path,
                                                                                 auth):
    missing = write_definitions(tmp_path / "missing.json", ISSUE_SHAPE["experiments"][0])
    app = start_app(dataclasses.replace(experiment_settings, experiments_path=missing))
    experiment = load_experiments(missing).get("als-vs-ease")
    customers = [f"c-{i}" for i in range(40)]
    try:
        bodies = [app.test_client().get(f"/v1/customers/{c}/recommendations", headers=auth).get_json()
                  for c in customers]
        recorded = {r["customer_id"] for r in exposures(app)}
    finally:
        stop_app(app)
    for customer, body in zip(customers, bodies):
        in_treatment = experiment.variant_of(customer).name == "treatment"
        assert (body["experiment"] is None) == in_treatment
        assert (customer in recorded) != in_treatment
    assert any(body["experiment"] is None for body in bodies)


def test_batch_responses_carry_each_customers_experiment(experiment_app, auth):
    experiment = load_experiments(experiment_app.extensions["recsvc"].settings.experiments_path).get("als-vs-pop")
    customers = [f"b-{i}" for i in range(12)]
    body = experiment_app.test_client().post("/v1/recommendations/batch", headers=auth, json={
        "requests": [{"customer_id": c, "limit": 3} for c in customers]}).get_json()
    assert [r["experiment"]["variant"] for r in body["results"]] == [experiment.variant_of(c).name for c in customers]
    assert sorted(r["customer_id"] for r in exposures(experiment_app)) == sorted(customers)
