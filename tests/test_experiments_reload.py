"""Experiment definitions re-read while serving: a changed RECSVC_EXPERIMENTS file takes effect without a restart,
a bad one never does; in the app, and through a real gunicorn with 2 workers and a real Redis."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from recsvc.cache import experiments_key
from recsvc.event_log import EXPOSURE
from recsvc.experiments import load_experiments
from tests.conftest import ADMIN_KEY, API_KEY
from tests.server_process import running_server
from tests.test_api_fallback import publish, tiny_bundle, tiny_settings
from tests.test_experiments import exposures, start_app, stop_app
from tests.test_worker import server_connections, wait_until_workers_poll
from training.cli import main

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CUSTOMERS = [f"c-{i}" for i in range(40)]


def definitions(status: str = "running", control: int = 50, treatment: int = 50,
                treatment_strategy: str = "popular", salt: str = "2026-11") -> str:
    """One experiment, als (control) against another strategy (treatment), in TOML."""
    return (f'[[experiments]]\nname = "als-vs-pop"\nsalt = "{salt}"\nstatus = "{status}"\ncontrol = "control"\n'
            f'variants = [{{name = "control", strategy = "als", weight = {control}}},\n'
            f'            {{name = "treatment", strategy = "{treatment_strategy}", weight = {treatment}}}]\n')


def rewrite(path: Path, content: str | bytes) -> None:
    """As an operator's editor or a deploy tool does: a new file renamed over the old one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    os.replace(temporary, path)


def published_status(redis_client, name: str = "als-vs-pop") -> str | None:
    definition = redis_client.hget(experiments_key(), name)
    return json.loads(definition)["status"] if definition else None


def published(redis_client, name: str = "als-vs-pop") -> dict | None:
    definition = redis_client.hget(experiments_key(), name)
    return json.loads(definition) if definition else None


def trim_exposures(redis_url: str):
    """`recsvc-train events trim` of everything the log took until now, exposures and feedback included."""
    return CliRunner().invoke(main, ["events", "trim", "--redis-url", redis_url, "--before", f"{time.time():.3f}",
                                     "--stream", "exposure", "--stream", "feedback"])


def report(redis_url: str, name: str = "als-vs-pop") -> dict:
    """The CLI's report, from the definitions the servers published to Redis."""
    result = CliRunner().invoke(main, ["experiments", "report", name, "--redis-url", redis_url, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


NO_EXPERIMENTS = "experiments = []\n"


def sample(text: str, name: str, **labels) -> list[float]:
    """The values of a metric's series in Prometheus text, those carrying `labels`."""
    found = []
    for match in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE):
        if all(f'{key}="{value}"' in (match.group(1) or "") for key, value in labels.items()):
            found.append(float(match.group(2)))
    return found


def failures(client) -> float:
    return sum(sample(client.get("/metrics").get_data(as_text=True), "recsvc_experiments_load_failures_total"))


# --- in the app --------------------------------------------------------------------------------------------


@pytest.fixture
def experiments_file(tmp_path) -> Path:
    path = tmp_path / "experiments.toml"
    path.write_text(definitions(), encoding="utf-8")
    return path


@pytest.fixture
def app(tmp_path, redis_url, redis_client, experiments_file):
    publish(tmp_path / "registry", tiny_bundle())
    app = start_app(tiny_settings(tmp_path / "registry", redis_url=redis_url, spool_dir=tmp_path / "spool",
                                  experiments_path=experiments_file))
    yield app
    stop_app(app)


def serve_all(client) -> list[dict]:
    bodies = [client.get(f"/v1/customers/{c}/recommendations?limit=2", headers=HEADERS).get_json() for c in CUSTOMERS]
    assert all("items" in body for body in bodies), bodies[0]
    return bodies


def test_a_stopped_experiment_assigns_and_records_nothing_after_the_reload(app, experiments_file, redis_client):
    client, router = app.test_client(), app.extensions["recsvc"].experiments
    assert all(body["experiment"] for body in serve_all(client))
    assert len(exposures(app)) == len(CUSTOMERS) and published_status(redis_client) == "running"

    rewrite(experiments_file, definitions(status="stopped"))
    assert router.refresh() is True
    assert all(body["experiment"] is None for body in serve_all(client))
    assert len(exposures(app)) == len(CUSTOMERS)  # none since the swap
    assert published_status(redis_client) == "stopped"  # `events trim` and the report read this
    assert client.get("/v1/experiments", headers=HEADERS).get_json()["experiments"][0]["status"] == "stopped"


def test_exposures_after_the_swap_carry_the_new_definitions_and_assignment_stays_a_function_of_salt_and_id(
        app, experiments_file):
    client, router = app.test_client(), app.extensions["recsvc"].experiments
    before = {body["customer_id"]: body["experiment"]["variant"] for body in serve_all(client)}
    assert set(before.values()) == {"control", "treatment"}

    rewrite(experiments_file, definitions(control=0, treatment=100))  # everyone in treatment from now on
    assert router.refresh() is True
    after = serve_all(client)
    assert {body["experiment"]["variant"] for body in after} == {"treatment"}
    assert {body["strategy"] for body in after} == {"popular"}
    recorded = exposures(app)[len(CUSTOMERS):]
    assert {(r["variant"], r["strategy"]) for r in recorded} == {("treatment", "popular")}

    rewrite(experiments_file, definitions(salt="2026-12"))  # a new salt: the pure function of the new salt
    assert router.refresh() is True
    fresh = load_experiments(experiments_file).get("als-vs-pop")
    assert {body["customer_id"]: body["experiment"]["variant"] for body in serve_all(client)} == {
        c: fresh.variant_of(c).name for c in CUSTOMERS}


BAD_FILES = {
    "bad TOML": 'experiments = [[\n',
    "a failed check": definitions(status="paused"),
    "a strategy typo": definitions(treatment_strategy="popluar"),
    "not UTF-8": definitions().encode("utf-16"),
}


@pytest.mark.parametrize("damage", list(BAD_FILES))
def test_a_bad_rewrite_never_takes_effect_and_is_logged_counted_and_shown(app, experiments_file, redis_client,
                                                                          caplog, damage):
    client, router = app.test_client(), app.extensions["recsvc"].experiments
    counted = failures(client)
    rewrite(experiments_file, BAD_FILES[damage])
    with caplog.at_level(logging.ERROR, logger="recsvc.experiments"):
        assert router.refresh() is False
        assert router.refresh() is False  # the same file: not read, logged or counted again
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"RECSVC_EXPERIMENTS={experiments_file}" in line and "keeping the experiment definitions in use" in line
    assert failures(client) == counted + 1
    assert sample(client.get("/metrics").get_data(as_text=True), "recsvc_experiments_file_refused") == [1.0]

    assert all(body["experiment"] for body in serve_all(client))  # the last good definitions serve
    assert len(exposures(app)) == len(CUSTOMERS) and published_status(redis_client) == "running"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    failure = ready.get_json()["experiments"]["last_failure"]
    assert failure["reason"].startswith("experiments.toml: ") and str(experiments_file.parent) not in failure["reason"]

    rewrite(experiments_file, definitions(status="stopped"))  # fixed: it loads, and the failure is over
    assert router.refresh() is True
    assert client.get("/readyz").get_json()["experiments"]["last_failure"] is None
    assert sample(client.get("/metrics").get_data(as_text=True), "recsvc_experiments_file_refused") == [0.0]
    assert published_status(redis_client) == "stopped"


def test_a_strategy_typo_names_the_variant_and_the_served_strategies(app, experiments_file):
    rewrite(experiments_file, definitions(treatment_strategy="popluar"))
    app.extensions["recsvc"].experiments.refresh()
    reason = app.extensions["recsvc"].experiments.source.last_failure.reason
    assert "variant treatment: strategy 'popluar'" in reason and "(which has als, knn, popular)" in reason


def test_a_removed_file_keeps_the_last_good_definitions_until_it_is_back(app, experiments_file):
    client, router = app.test_client(), app.extensions["recsvc"].experiments
    experiments_file.unlink()
    assert router.refresh() is False
    assert "no such file" in router.source.last_failure.reason
    assert all(body["experiment"] for body in serve_all(client))
    experiments_file.write_text(definitions(status="stopped"), encoding="utf-8")
    assert router.refresh() is True
    assert all(body["experiment"] is None for body in serve_all(client))


def test_an_unchanged_or_touched_file_is_not_swapped(app, experiments_file):
    router = app.extensions["recsvc"].experiments
    in_use = router.experiments
    assert router.refresh() is False  # not even read: same inode, size and modification time
    experiments_file.touch()
    os.utime(experiments_file, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert router.refresh() is False and router.experiments is in_use  # read, same bytes: nothing to swap


def test_admin_reload_rereads_the_file_now(app, experiments_file):
    client = app.test_client()
    stat = experiments_file.stat()
    experiments_file.write_text(definitions(status="stopped"), encoding="utf-8")  # in place, the same size
    os.utime(experiments_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old time: stat sees no change
    assert app.extensions["recsvc"].experiments.refresh() is False
    body = client.post("/v1/admin/reload", headers=ADMIN).get_json()
    assert body["experiments"]["changed"] is True and body["experiments"]["last_failure"] is None
    assert re.fullmatch(r"[0-9a-f]{12}", body["experiments"]["digest"])
    assert all(body["experiment"] is None for body in serve_all(client))
    assert client.post("/v1/admin/reload", headers=ADMIN).get_json()["experiments"]["changed"] is False


def test_the_watcher_rereads_the_file_at_the_reload_interval(tmp_path, experiments_file):
    publish(tmp_path / "registry", tiny_bundle())
    app = start_app(tiny_settings(tmp_path / "registry", spool_dir=tmp_path / "spool", reload_interval=0.1,
                                  experiments_path=experiments_file))
    try:
        client = app.test_client()
        assert serve_all(client)[0]["experiment"]  # the first request starts the watcher
        rewrite(experiments_file, definitions(status="stopped"))
        deadline = time.monotonic() + 5
        while app.extensions["recsvc"].experiments.experiments.active() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(body["experiment"] is None for body in serve_all(client))
    finally:
        stop_app(app)


def test_an_experiment_removed_from_the_file_is_published_as_removed_and_no_longer_blocks_trim(
        app, experiments_file, redis_client, redis_url):
    client, router = app.test_client(), app.extensions["recsvc"].experiments
    serve_all(client)
    assert len(exposures(app)) == len(CUSTOMERS)
    before = report(redis_url)
    refused = trim_exposures(redis_url)
    assert refused.exit_code == 3 and "experiment als-vs-pop (running)" in refused.stderr

    rewrite(experiments_file, NO_EXPERIMENTS)  # removed without being stopped first
    assert router.refresh() is True
    assert all(body["experiment"] is None for body in serve_all(client))
    entry = published(redis_client)
    assert entry["status"] == "removed"
    assert abs(dt.datetime.fromisoformat(entry["removed_at"]).timestamp() - time.time()) < 60  # when it was read
    assert [v["name"] for v in entry["variants"]] == ["control", "treatment"]  # the definition stays
    # the CLI report still reads its past data, from the published definition
    assert report(redis_url) == {**before, "status": "removed"}
    result = trim_exposures(redis_url)
    assert result.exit_code == 0, result.output
    assert f"warning: experiment als-vs-pop (removed) has {len(CUSTOMERS)} exposures" in result.stderr
    assert redis_client.xlen(f"recsvc:v1:log:{EXPOSURE}") == 0

    rewrite(experiments_file, definitions())  # added again: it runs, and is published as running
    assert router.refresh() is True
    assert published_status(redis_client) == "running" and "removed_at" not in published(redis_client)


def test_a_server_starting_without_an_experiment_published_before_publishes_it_as_removed(
        tmp_path, redis_url, redis_client, experiments_file):
    publish(tmp_path / "registry", tiny_bundle())
    settings = tiny_settings(tmp_path / "registry", redis_url=redis_url, spool_dir=tmp_path / "spool",
                             experiments_path=experiments_file)
    stop_app(start_app(settings))
    assert published_status(redis_client) == "running"
    rewrite(experiments_file, definitions().replace("als-vs-pop", "als-vs-knn"))  # changed while no server ran
    second = start_app(settings)
    try:
        assert published_status(redis_client) == "removed"
        assert published_status(redis_client, "als-vs-knn") == "running"
    finally:
        stop_app(second)


def test_a_replica_on_the_old_file_brings_a_removed_experiment_back_only_by_reading_that_file_again(
        tmp_path, redis_url, redis_client):
    """Two replicas sharing Redis, each with its own copy of the file: the latest file read wins, whatever order
    they write in."""
    publish(tmp_path / "registry", tiny_bundle())
    files = {name: tmp_path / f"{name}.toml" for name in ("old", "new")}
    for path in files.values():
        path.write_text(definitions(), encoding="utf-8")

    def replica(name: str):
        return start_app(tiny_settings(tmp_path / "registry", redis_url=redis_url, spool_dir=tmp_path / name,
                                       experiments_path=files[name]))

    old, new = replica("old"), replica("new")
    try:
        rewrite(files["new"], NO_EXPERIMENTS)
        assert new.extensions["recsvc"].experiments.refresh() is True
        assert published_status(redis_client) == "removed"
        # the old replica publishes again what it read before (as when Redis comes back): no flip back
        router = old.extensions["recsvc"].experiments
        router.publish_quietly(old.extensions["recsvc"].event_log.reader.client)
        assert published_status(redis_client) == "removed"
        assert all(body["experiment"] for body in serve_all(old.test_client()))  # while it still serves it
        stop_app(old)
        old = replica("old")  # restarted on the old file: it serves the experiment, and says so
        assert published_status(redis_client) == "running"
        rewrite(files["old"], NO_EXPERIMENTS)  # and then gets the new file
        assert old.extensions["recsvc"].experiments.refresh() is True
        assert published_status(redis_client) == "removed"
        new.extensions["recsvc"].experiments.publish_quietly(new.extensions["recsvc"].event_log.reader.client)
        assert published_status(redis_client) == "removed"
    finally:
        stop_app(old)
        stop_app(new)


# --- through a real gunicorn ----------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path, redis_url, redis_client, experiments_file):
    publish(tmp_path / "registry", tiny_bundle())
    env = {"RECSVC_REGISTRY": str(tmp_path / "registry"), "RECSVC_API_KEYS": API_KEY, "RECSVC_ADMIN_KEYS": ADMIN_KEY,
           "RECSVC_RELOAD_INTERVAL": "0.2", "RECSVC_EXPERIMENTS": str(experiments_file),
           "RECSVC_REDIS_URL": redis_url, "RECSVC_SPOOL_DIR": str(tmp_path / "spool"),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "RECSVC_LOG_LEVEL": "info"}
    with running_server(env, tmp_path / "server.log", workers=2, threads=4) as base:
        wait_until_workers_poll(tmp_path / "server.log", workers=2)
        yield base


class Agents:
    """Eight keep-alive connections, spread over both workers, each asking for its customers' lists in turn."""

    def __init__(self, base: str, connections: int = 8):
        self.base = base
        self.sessions = [requests.Session() for _ in range(connections)]

    def ask_all(self) -> list[dict]:
        """One round: every connection asks for five customers; the answers in order."""
        answers: list[list[dict]] = [[] for _ in self.sessions]

        def run(n: int) -> None:
            for customer in CUSTOMERS[n * 5:n * 5 + 5]:
                response = self.sessions[n].get(f"{self.base}/v1/customers/{customer}/recommendations?limit=2",
                                                headers=HEADERS, timeout=5)
                assert response.status_code == 200, response.text
                answers[n].append(response.json())

        threads = [threading.Thread(target=run, args=(n,)) for n in range(len(self.sessions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [answer for per_connection in answers for answer in per_connection]


def exposure_count(redis_client) -> int:
    return redis_client.xlen(f"recsvc:v1:log:{EXPOSURE}")


def wait_for(condition, timeout: float = 5.0) -> float:
    """Seconds until `condition()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail("condition not met in time")
        time.sleep(0.05)
    return time.monotonic() - started


def worker_digests(base: str) -> list[str]:
    """The definitions digest each live worker uses, from its recsvc_experiments_info series."""
    text = requests.get(f"{base}/metrics", timeout=5).text
    return sorted(re.findall(r'^recsvc_experiments_info\{[^}]*digest="([0-9a-f]+)"[^}]*\} 1\.0$', text, re.MULTILINE))


def every_worker_left(base: str, digests: list[str]) -> bool:
    """Both workers use definitions other than `digests`."""
    now = worker_digests(base)
    return len(now) == 2 and not set(now) & set(digests)


@pytest.mark.slow
def test_every_gunicorn_worker_stops_the_experiment_within_the_reload_interval(server, experiments_file,
                                                                               redis_client):
    agents = Agents(server)
    answers = agents.ask_all()
    port = int(server.rsplit(":", 1)[1])
    assert len(server_connections(port)) == 2  # both workers hold agents' connections
    assert all(answer["experiment"] for answer in answers)
    wait_for(lambda: exposure_count(redis_client) == len(answers))
    assert published_status(redis_client) == "running"
    running = worker_digests(server)

    rewrite(experiments_file, definitions(status="stopped"))
    took = wait_for(lambda: not any(answer["experiment"] for answer in agents.ask_all()))
    assert took < 2.0  # a 0.2 s interval; the margin is for a loaded machine
    recorded = exposure_count(redis_client)
    answers = agents.ask_all() + agents.ask_all()
    assert all(answer["experiment"] is None for answer in answers)
    assert len(server_connections(port)) == 2  # still answered by both workers
    time.sleep(0.3)  # exposures are written after the answer
    assert exposure_count(redis_client) == recorded  # no worker recorded one after the swap
    wait_for(lambda: published_status(redis_client) == "stopped", timeout=1.0)
    assert len(running) == 2 and len(set(running)) == 1 and every_worker_left(server, running)
    assert len(set(worker_digests(server))) == 1


@pytest.mark.slow
def test_an_invalid_rewrite_keeps_every_worker_on_the_old_definitions_and_counts_a_failure(server, experiments_file,
                                                                                           redis_client, tmp_path):
    agents = Agents(server)
    before = worker_digests(server)
    rewrite(experiments_file, definitions(status="paused"))

    def counted() -> float:
        return sum(sample(requests.get(f"{server}/metrics", timeout=5).text, "recsvc_experiments_load_failures_total"))

    wait_for(lambda: counted() >= 2)  # each worker refused it once (the master, which watches too, may add one)
    time.sleep(0.5)
    assert 2 <= counted() <= 3  # and not again at every check
    assert worker_digests(server) == before
    answers = agents.ask_all()
    assert all(answer["experiment"] for answer in answers)
    wait_for(lambda: exposure_count(redis_client) == len(answers))
    ready = requests.get(f"{server}/readyz", timeout=5)
    assert ready.status_code == 200
    assert "Must be one of: running, stopped" in ready.json()["experiments"]["last_failure"]["reason"]
    assert published_status(redis_client) == "running"
    log = (tmp_path / "server.log").read_text()
    assert f"RECSVC_EXPERIMENTS={experiments_file}: invalid experiment definitions" in log

    rewrite(experiments_file, definitions(status="stopped"))  # fixed: every worker takes it, and the failure is over
    wait_for(lambda: every_worker_left(server, before))
    assert requests.get(f"{server}/readyz", timeout=5).json()["experiments"]["last_failure"] is None
    assert requests.post(f"{server}/v1/admin/reload", headers=ADMIN, timeout=5).json()["experiments"][
        "last_failure"] is None
    assert published_status(redis_client) == "stopped"
    assert all(answer["experiment"] is None for answer in agents.ask_all())


@pytest.mark.slow
def test_every_gunicorn_process_publishes_a_removed_experiment_as_removed_and_trim_then_goes_ahead(
        server, experiments_file, redis_client, redis_url, tmp_path):
    answers = Agents(server).ask_all()
    wait_for(lambda: exposure_count(redis_client) == len(answers))
    assert published_status(redis_client) == "running"
    running = worker_digests(server)
    rewrite(experiments_file, NO_EXPERIMENTS)
    wait_for(lambda: published_status(redis_client) == "removed")
    wait_for(lambda: every_worker_left(server, running))
    time.sleep(0.5)  # the master's round too (0.2 s interval): no process flips it back
    assert published_status(redis_client) == "removed"
    assert "not published to redis" not in (tmp_path / "server.log").read_text()
    result = trim_exposures(redis_url)
    assert result.exit_code == 0, result.output
    assert f"warning: experiment als-vs-pop (removed) has {len(answers)} exposures" in result.stderr
