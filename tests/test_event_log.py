"""The durable event log: spool files, at-most-once streams, and nothing lost while Redis is down."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time

import pytest
import redis

from recsvc.cache import event_stream_key, experiments_key, recent_items_key
from recsvc.event_log import EXPOSURE, FEEDBACK, EventLog, RecentItems, RedisStreams, Spool, sweep_recent_items
from tests.redis_process import free_port
from tests.server_process import running_server
from tests.test_experiments import SERVED, start_app, stop_app, write_definitions


def feedback(n: int, action: str = "accepted") -> dict:
    return {"kind": FEEDBACK, "request_id": f"r{n}", "customer_id": f"c{n}", "item_id": "i1", "action": action,
            "time": 1.0}


def test_spool_appends_whole_lines_and_replays_them_in_order(tmp_path):
    spool = Spool(tmp_path)
    for n in range(5):
        spool.append(feedback(n))
    assert spool.pending() == 5
    received = []
    spool.rotate()
    assert spool.replay(received.extend) == 5
    assert [r["request_id"] for r in received] == [f"r{n}" for n in range(5)]
    assert spool.files() == [] and spool.pending() == 0


def test_fsync_always_syncs_feedback_at_once_and_exposures_within_the_next_sync(tmp_path, monkeypatch):
    import os

    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    spool = Spool(tmp_path, "always")
    spool.append(feedback(1))  # opens the file (directory fsync) and syncs the record
    before = len(synced)
    spool.append(feedback(2))
    assert len(synced) == before + 1
    spool.append({"kind": EXPOSURE, "n": 3}, durable=False)
    assert len(synced) == before + 1
    spool.sync()
    spool.sync()  # nothing left to sync
    assert len(synced) == before + 2


def test_a_torn_last_line_and_a_damaged_line_are_skipped(tmp_path):
    (tmp_path / "crashed.spool").write_bytes(b'{"kind":"feedback","n":1}\nnot json\n{"kind":"feedback","n":2}\n{"kin')
    received = []
    assert Spool(tmp_path).replay(received.extend) == 2
    assert [r["n"] for r in received] == [1, 2]


def test_a_file_a_live_writer_holds_is_left_alone_until_rotated(tmp_path):
    writer, replayer = Spool(tmp_path), Spool(tmp_path)
    writer.append(feedback(1))
    received = []
    assert replayer.replay(received.extend) == 0
    writer.rotate()
    assert replayer.replay(received.extend) == 1


def test_a_failed_replay_keeps_the_file_for_the_next_round(tmp_path):
    spool = Spool(tmp_path)
    spool.append(feedback(1))
    spool.rotate()

    def broken(_records):
        raise redis.ConnectionError("down again")

    with pytest.raises(redis.ConnectionError):
        spool.replay(broken)
    assert spool.pending() == 1


def test_the_spool_of_a_process_that_died_is_replayed_by_another(tmp_path):
    script = ("import sys; from recsvc.event_log import Spool; s = Spool(sys.argv[1]); "
              "[s.append({'kind': 'feedback', 'n': n}) for n in range(3)]; import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    received = []
    assert Spool(tmp_path).replay(received.extend) == 3


def test_streams_add_each_natural_key_once(redis_client):
    streams = RedisStreams(redis_client, dedupe_ttl=3600)
    streams.add(feedback(1))
    streams.add(feedback(1))  # a client retry
    streams.add_many([feedback(1), feedback(2), feedback(1, "shown")])  # a replay overlapping what is there
    assert redis_client.xlen(event_stream_key(FEEDBACK)) == 3
    assert [(r["request_id"], r["action"]) for r in streams.read(FEEDBACK)] == [
        ("r1", "accepted"), ("r2", "accepted"), ("r1", "shown")]


def test_event_log_spools_without_waiting_while_redis_is_unreachable(tmp_path):
    log = EventLog(f"redis://127.0.0.1:{free_port()}/0", tmp_path, retry_interval=60)
    started = time.perf_counter()
    assert [log.append(feedback(n)) for n in range(50)] == ["spool"] * 50
    assert time.perf_counter() - started < 2.0
    assert log.spool.pending() == 50
    assert log.replay() == 0  # still down: nothing moved, nothing lost
    assert log.spool.pending() == 50
    log.stop()


def test_recent_items_fall_back_to_this_process_while_redis_is_down():
    recent = RecentItems(f"redis://127.0.0.1:{free_port()}/0", ttl=60)
    recent.add("alice", ["i1", "i2"])
    assert recent.get("alice") == {"i1", "i2"}
    assert recent.get("bob") == set()


def test_recent_items_added_while_redis_was_down_reach_redis_when_it_returns(own_redis, tmp_path):
    log = EventLog(own_redis.url, tmp_path, retry_interval=0.1)
    recent = RecentItems(own_redis.url, ttl=60)
    log.on_reconnect.append(recent.flush)
    own_redis.stop()
    log.append({"kind": "event", "event_id": "e1", "customer_id": "alice", "item_id": "i1"})
    recent.add("alice", ["i1"])
    assert recent.get("alice") == {"i1"}
    own_redis.start()
    # A generous timeout: this replica's reads are the test's observations, and on a busy machine a 50 ms
    # one can time out and read as "no recent items".
    other_replica = RecentItems(own_redis.url, ttl=60, timeout=2.0)
    assert other_replica.get("alice") == set()
    _wait_until(lambda: log.spool.pending() == 0)  # the log's own thread replays within its retry interval
    assert other_replica.get("alice") == {"i1"}
    client = redis.Redis.from_url(own_redis.url)
    assert client.ttl(recent_items_key("alice")) == -1  # no TTL: eviction cannot drop it; the item carries its own
    assert time.time() < client.zscore(recent_items_key("alice"), "i1") <= time.time() + 60
    log.stop()


def test_recent_items_outlive_a_full_redis_that_evicts_every_key_with_a_ttl(own_redis):
    """volatile-lru (the compose policy) evicts keys with a TTL: cache entries go, a customer's recent items stay,
    so a list computed afterwards still leaves out what the customer just took."""
    client = own_redis.client()
    client.config_set("maxmemory-policy", "volatile-lru")
    RecentItems(own_redis.url, ttl=3600, timeout=2.0).add("alice", ["i1", "i2"])
    for n in range(100):
        client.set(f"recsvc:v1:rec:entry-{n}", b"x" * 1000, px=600_000)
    client.config_set("maxmemory", 1)  # every write now evicts all it can, then is refused
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("one-more-write", b"x")
    finally:
        client.config_set("maxmemory", 0)
    assert client.dbsize() == 1  # the cache entries were evicted...
    assert RecentItems(own_redis.url, ttl=3600, timeout=2.0).get("alice") == {"i1", "i2"}  # ...these were not


def test_recent_items_expire_one_by_one_and_the_sweep_removes_what_expired(own_redis):
    client = own_redis.client()
    short, long = RecentItems(own_redis.url, ttl=0.2, timeout=2.0), RecentItems(own_redis.url, ttl=3600, timeout=2.0)
    short.add("bob", ["gone"])
    long.add("bob", ["kept"])
    short.add("carol", ["gone"])
    time.sleep(0.3)
    reader = RecentItems(own_redis.url, ttl=3600, timeout=2.0)  # a replica of its own: no local copy
    assert reader.get("bob") == {"kept"} and reader.get("carol") == set()
    assert sweep_recent_items(client, batch=1) == (2, 2)  # batch=1: the SCAN is walked in steps
    assert client.zrange(recent_items_key("bob"), 0, -1) == [b"kept"]
    assert not client.exists(recent_items_key("carol"))  # an emptied set is gone
    assert sweep_recent_items(client) == (1, 0)


def test_feedback_accepted_while_redis_is_down_is_counted_exactly_once(own_redis, settings, tmp_path, auth):
    """Acceptance: Redis stopped, 1,000 feedback posts answered 202, Redis started again: the report counts
    exactly 1,000; a second replay of the same spool and client retries change nothing."""
    experiment_settings = dataclasses.replace(
        settings, redis_url=own_redis.url, spool_dir=tmp_path / "spool", redis_breaker_cooldown=0.2,
        experiments_path=write_definitions(tmp_path / "experiments.json", SERVED))
    app = start_app(experiment_settings)
    service = app.extensions["recsvc"]
    client = app.test_client()
    try:
        own_redis.stop()
        served = _serve_while_down(client, auth, [f"down-{i}" for i in range(1000)])
        posts = [{"request_id": rid, "customer_id": r["customer_id"], "item_id": r["items"][0]["item_id"],
                  "action": "accepted"} for rid, r in served]
        statuses = [client.post("/v1/feedback", headers=auth, json=post).status_code for post in posts]
        assert statuses == [202] * 1000
        assert service.event_log.spool.pending() == 2000  # 1,000 exposures and 1,000 feedback
        backup = tmp_path / "backup"
        shutil.copytree(tmp_path / "spool", backup)

        own_redis.start()  # empty: everything must come from the spool
        _wait_until(lambda: service.event_log.spool.pending() == 0)
        assert _accepted(client, auth) == (1000, 1000, 1000)

        for path in backup.glob("*.spool"):  # the same records again, as if a replay had been interrupted
            shutil.copy(path, tmp_path / "spool" / f"again-{path.name}")
        _wait_until(lambda: service.event_log.spool.pending() == 0)
        assert [client.post("/v1/feedback", headers=auth, json=post).status_code for post in posts[:100]] == \
            [202] * 100
        assert _accepted(client, auth) == (1000, 1000, 1000)
        stream = redis.Redis.from_url(own_redis.url)
        assert stream.xlen(event_stream_key(FEEDBACK)) == 1000
        assert stream.xlen(event_stream_key(EXPOSURE)) == 1000
        stream.close()
    finally:
        stop_app(app)


def test_definitions_reach_a_redis_that_was_down_at_start_up_also_without_a_spooled_record(own_redis, settings,
                                                                                           tmp_path, auth):
    """`recsvc-train experiments report` finds them in Redis when no file is given: Redis came back before any
    record needed the spool, so no replay would have published them."""
    own_redis.stop()
    app = start_app(dataclasses.replace(
        settings, redis_url=own_redis.url, spool_dir=tmp_path / "spool", redis_breaker_cooldown=0.2,
        experiments_path=write_definitions(tmp_path / "experiments.json", SERVED)))
    try:
        own_redis.start()
        response = app.test_client().get("/v1/customers/late-1/recommendations", headers=auth)
        assert response.get_json()["experiment"]["name"] == "als-vs-pop"
        assert app.extensions["recsvc"].event_log.spool.pending() == 0  # the exposure went straight to Redis
        client = redis.Redis.from_url(own_redis.url)
        _wait_until(lambda: client.hexists(experiments_key(), "als-vs-pop"), timeout=5.0)
        client.close()
    finally:
        stop_app(app)


def _serve_while_down(client, auth, customers: list[str]) -> list[tuple[str, dict]]:
    served = []
    for start in range(0, len(customers), 50):
        response = client.post("/v1/recommendations/batch", headers=auth, json={
            "requests": [{"customer_id": c, "limit": 2} for c in customers[start : start + 50]]})
        assert response.status_code == 200
        body = response.get_json()
        served += [(body["request_id"], result) for result in body["results"]]
    return served


def _accepted(client, auth) -> tuple[int, int, int]:
    """(customers exposed, customers who accepted, accepts) over all variants, from the report endpoint."""
    report = client.get("/v1/experiments/als-vs-pop/report", headers=auth).get_json()
    rows = report["variants"]
    return (sum(r["customers_exposed"] for r in rows), sum(r["customers_accepted"] for r in rows),
            sum(r["accepts"] for r in rows))


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("the spool was not replayed in time")
        time.sleep(0.1)


@pytest.mark.slow
def test_gunicorn_workers_spool_while_redis_is_down_and_replay_when_it_returns(own_redis, trained_registry,
                                                                               tmp_path):
    """Several real worker processes, each with its own spool file, lose nothing across a Redis outage."""

    import requests

    from tests.conftest import API_KEY

    spool = tmp_path / "spool"
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY,
           "RECSVC_REDIS_URL": own_redis.url, "RECSVC_SPOOL_DIR": str(spool),
           "RECSVC_REDIS_BREAKER_COOLDOWN_MS": "200", "RECSVC_LOG_LEVEL": "warning",
           "RECSVC_EXPERIMENTS": str(write_definitions(tmp_path / "experiments.json", SERVED))}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with running_server(env, tmp_path / "server.log") as base:
        own_redis.stop()
        statuses = [requests.post(f"{base}/v1/feedback", headers=headers, timeout=5, json=_body(n)).status_code
                    for n in range(300)]  # a new connection each: spread over both workers
        assert statuses == [202] * 300
        assert sum(1 for _ in Spool(spool).read_all()) == 300
        own_redis.start()
        client = redis.Redis.from_url(own_redis.url)
        _wait_until(lambda: client.xlen(event_stream_key(FEEDBACK)) == 300 and not Spool(spool).files())
        assert {r["request_id"] for r in RedisStreams(client, 60).read(FEEDBACK)} == {f"r{n}" for n in range(300)}
        client.close()


def _body(n: int) -> dict:
    return {k: v for k, v in feedback(n).items() if k not in ("kind", "time")}
