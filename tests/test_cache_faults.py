"""The Redis cache under faults, against real redis-server processes: outage, hang, model swap, stampede."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from recsvc import artifacts
from recsvc.app import create_app
from recsvc.cache import KEY_PREFIX, CircuitBreaker, RedisCache
from recsvc.recommend import RecommendationQuery
from tests.conftest import API_KEY
from tests.server_process import running_server

CUSTOMERS = [f"C{n:06d}" for n in range(1, 41)]


@pytest.fixture
def make_app(settings):
    apps = []

    def build(**overrides):
        app = create_app(dataclasses.replace(settings, **overrides))
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["recsvc"].store.stop()


class RequestLoop:
    """Requests recommendations in a thread until stopped, recording each status and latency."""

    def __init__(self, app, auth):
        self.client = app.test_client()
        self.auth = auth
        self.results: list[tuple[int, float, str | None]] = []  # status, start (perf_counter), model version
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            started = time.perf_counter()
            response = self.client.get(f"/v1/customers/{CUSTOMERS[n % len(CUSTOMERS)]}/recommendations?limit=5",
                                       headers=self.auth)
            body = response.get_json(silent=True) or {}
            self.results.append((response.status_code, started, body.get("model_version")))
            n += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def count(self) -> int:
        return len(self.results)


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_redis_killed_and_restarted_during_a_request_loop(own_redis, make_app, auth):
    app = make_app(redis_url=own_redis.url, cache_ttl=60, redis_breaker_cooldown=0.2)
    cache = app.extensions["recsvc"].cache
    client = app.test_client()
    with RequestLoop(app, auth) as loop:
        assert wait_for(lambda: loop.count() > 50)
        own_redis.kill()
        assert wait_for(lambda: cache.breaker.state == CircuitBreaker.OPEN)
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.get_json()["cache"]["breaker"] == "open"
        during = loop.count()
        assert wait_for(lambda: loop.count() > during + 50)  # served from the model while Redis is gone
        own_redis.start()
        assert wait_for(lambda: cache.breaker.state == CircuitBreaker.CLOSED)
        recovered = loop.count()
        assert wait_for(lambda: loop.count() > recovered + 50)
    statuses = [status for status, _started, _version in loop.results]
    assert statuses.count(200) == len(statuses), f"non-200 answers: {set(statuses)}"
    # The restarted Redis was empty: entries in it prove the cache is used again, and a repeat is a hit.
    assert own_redis.client().keys(f"{KEY_PREFIX}:rec:*")
    recommender = app.extensions["recsvc"].recommender
    before = recommender.computations
    assert client.get(f"/v1/customers/{CUSTOMERS[0]}/recommendations?limit=5", headers=auth).status_code == 200
    assert recommender.computations == before
    assert client.get("/readyz").get_json()["cache"]["breaker"] == "closed"


def test_a_frozen_redis_costs_at_most_a_few_timeouts(own_redis, make_app, auth):
    app = make_app(redis_url=own_redis.url, redis_timeout=0.03, redis_breaker_cooldown=5.0)
    client = app.test_client()
    assert client.get("/v1/customers/C000001/recommendations", headers=auth).status_code == 200
    errors_before = redis_errors()
    own_redis.freeze(True)
    try:
        latencies = []
        for customer in CUSTOMERS:
            started = time.perf_counter()
            assert client.get(f"/v1/customers/{customer}/recommendations", headers=auth).status_code == 200
            latencies.append(time.perf_counter() - started)
    finally:
        own_redis.freeze(False)
    assert app.extensions["recsvc"].cache.breaker.state == CircuitBreaker.OPEN
    # Three timed-out commands open the breaker; after that no request waits for Redis at all.
    assert redis_errors() - errors_before == 3
    assert latencies[0] >= 0.03 and max(latencies) < 1.0


def test_a_redis_that_stalls_writes_costs_a_few_timeouts_and_still_serves_hits(own_redis, make_app, auth):
    """CLIENT PAUSE WRITE (what Redis's FAILOVER does): reads answer, writes wait. Successful reads must not
    reset the count of write timeouts: three of them open the write breaker, then misses skip the lock and
    the store instead of waiting 50 ms for each, and hits keep coming from Redis."""
    app = make_app(redis_url=own_redis.url, redis_timeout=0.05, redis_breaker_cooldown=5.0)
    client, service = app.test_client(), app.extensions["recsvc"]
    cached = f"/v1/customers/{CUSTOMERS[0]}/recommendations"
    assert client.get(cached, headers=auth).status_code == 200
    errors_before = redis_errors()
    own_redis.client().execute_command("CLIENT", "PAUSE", 4000, "WRITE")
    try:
        for customer in CUSTOMERS[1:21]:
            assert client.get(f"/v1/customers/{customer}/recommendations", headers=auth).status_code == 200
        computed = service.recommender.computations
        assert client.get(cached, headers=auth).status_code == 200
        assert service.recommender.computations == computed  # a hit, read from Redis during the stall
    finally:
        own_redis.client().execute_command("CLIENT", "UNPAUSE")
    assert redis_errors() - errors_before == 3
    assert (service.cache.breaker.state, service.cache.write_breaker.state) == ("closed", "open")
    assert client.get("/readyz").get_json()["cache"]["write_breaker"] == "open"


def redis_errors() -> float:
    return sum(REGISTRY.get_sample_value("recsvc_redis_errors_total", {"operation": op}) or 0.0
               for op in ("get", "set", "lock", "unlock"))


def publish_copy(registry: Path) -> str:
    """A second version (the same arrays under a new id), published the way the trainer publishes."""
    current = artifacts.current_version(registry)
    new = artifacts.new_version_id("copy0000")
    target = artifacts.versions_root(registry) / new
    shutil.copytree(artifacts.versions_root(registry) / current, target)
    manifest = json.loads((target / artifacts.MANIFEST).read_text())
    manifest["version"] = new
    (target / artifacts.MANIFEST).write_text(json.dumps(manifest))
    artifacts.set_current(registry, new)
    return new


def test_a_model_swap_never_serves_an_entry_of_the_old_version(trained_registry, tmp_path, redis_url, redis_client,
                                                               make_app, auth):
    registry = tmp_path / "registry"
    shutil.copytree(trained_registry, registry)
    app = make_app(registry=registry, redis_url=redis_url, cache_ttl=600, reload_interval=3600)
    service = app.extensions["recsvc"]
    old = service.store.current().version
    with RequestLoop(app, auth) as loop:
        # Two rounds: every customer has an old-version entry, and the second round is served from it.
        assert wait_for(lambda: loop.count() > 2 * len(CUSTOMERS))
        new = publish_copy(registry)
        assert service.store.refresh()  # what the watcher thread does every reload interval
        swapped_at = time.perf_counter()
        started = loop.count()
        assert wait_for(lambda: loop.count() > started + 2 * len(CUSTOMERS))
    assert all(status == 200 for status, _started, _version in loop.results)
    before = {version for _status, _started, version in loop.results[:2 * len(CUSTOMERS)]}
    after = [version for _status, started, version in loop.results if started > swapped_at]
    assert before == {old} and len(after) > 2 * len(CUSTOMERS)
    assert set(after) == {new}, f"{after.count(old)} answers of the old version after the swap"
    # Both versions' entries sit side by side in Redis: the old ones are simply never looked up again.
    assert redis_client.keys(f"{KEY_PREFIX}:rec:{old}:*") and redis_client.keys(f"{KEY_PREFIX}:rec:{new}:*")


def slow_computations(recommender, seconds: float) -> list[int]:
    """Make every computation take `seconds` longer, so concurrent requests really overlap; counts them."""
    calls = []
    compute = recommender.compute

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(seconds)
        return compute(*args, **kwargs)

    recommender.compute = slow
    return calls


def concurrently(n: int, work) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_twenty_concurrent_misses_compute_once(redis_url, redis_client, make_app):
    app = make_app(redis_url=redis_url, cache_lock_wait=5.0)
    recommender = app.extensions["recsvc"].recommender
    calls = slow_computations(recommender, 0.3)
    query = RecommendationQuery(customer_id="C000007", limit=6)
    bodies = concurrently(20, lambda i: recommender.recommend(query, f"request-{i:04d}")[0])
    assert len(calls) == 1
    answers = [json.loads(body) for body in bodies]
    assert len({answer.pop("request_id") for answer in answers}) == 20
    assert all(answer == answers[0] for answer in answers) and len(answers[0]["items"]) == 6


def test_concurrent_misses_in_two_processes_compute_once(redis_url, redis_client):
    """Two caches with their own connections and in-process locks, as two gunicorn workers have."""
    caches = [RedisCache(redis_url, timeout=0.5, lock_wait=5.0) for _ in range(2)]
    calls = []

    def compute() -> bytes:
        calls.append(1)
        time.sleep(0.3)
        return b'{"items":[]}'

    results = concurrently(20, lambda i: caches[i % 2].get_or_compute("recsvc:v1:rec:test:k", "c1", compute))
    assert len(calls) == 1
    assert {fragment for fragment, _hit in results} == {b'{"items":[]}'}
    assert sum(1 for _fragment, hit in results if not hit) == 1


def test_a_slow_leader_does_not_hold_up_the_others(redis_url, redis_client):
    cache = RedisCache(redis_url, timeout=0.5, lock_wait=0.05)
    calls = []

    def compute() -> bytes:
        calls.append(1)
        time.sleep(1.0 if len(calls) == 1 else 0.0)
        return b'{"items":[]}'

    def timed(_i):
        started = time.perf_counter()
        cache.get_or_compute("recsvc:v1:rec:test:slow", "c1", compute)
        return time.perf_counter() - started

    latencies = sorted(concurrently(5, timed))
    assert len(calls) == 5  # each follower computed for itself after waiting 50 ms
    assert latencies[3] < 0.5 and latencies[4] >= 1.0


@pytest.fixture
def gunicorn_with_redis(trained_registry, own_redis, tmp_path):
    """`recsvc serve` with two workers on our own Redis, the way it runs in production."""
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY, "RECSVC_REDIS_URL": own_redis.url,
           "RECSVC_REDIS_BREAKER_COOLDOWN_MS": "200", "RECSVC_SPOOL_DIR": str(tmp_path / "spool"),
           "RECSVC_LOG_LEVEL": "warning"}
    with running_server(env, tmp_path / "server.log") as base:
        yield base


def test_gunicorn_workers_answer_every_request_through_a_redis_outage(gunicorn_with_redis, own_redis):
    import requests

    # A new connection per request, so both workers take their share (a kept-alive one stays with one worker).
    headers = {"Authorization": f"Bearer {API_KEY}", "Connection": "close"}
    statuses: list[int] = []

    def ask(n: int) -> None:
        for i in range(n):
            url = f"{gunicorn_with_redis}/v1/customers/{CUSTOMERS[i % len(CUSTOMERS)]}/recommendations"
            statuses.append(requests.get(url, headers=headers, timeout=5).status_code)

    ask(80)
    own_redis.kill()
    ask(120)  # both workers find Redis gone and open their breakers
    own_redis.start()
    time.sleep(0.5)  # past the breakers' cooldown: the next requests probe and close them
    ask(120)
    assert statuses.count(200) == len(statuses) == 320
    assert own_redis.client().keys(f"{KEY_PREFIX}:rec:*"), "the restarted Redis was not used again"
    metrics_text = requests.get(f"{gunicorn_with_redis}/metrics", timeout=5).text
    assert "recsvc_redis_breaker_state 0.0" in metrics_text


def test_an_invalidation_redis_refused_is_sent_when_it_takes_writes_again(own_redis, make_app, auth):
    """POST /v1/events while Redis refuses writes (full, noeviction): the event is spooled and its item counts as
    owned at once, but the customer's cached list is still current in Redis. This process trusts no entry of
    the customer until the new generation is sent, and sends it with its next command that succeeds."""
    app = make_app(redis_url=own_redis.url, redis_timeout=0.5)
    client = app.test_client()
    redis_admin = own_redis.client()
    redis_admin.config_set("maxmemory-policy", "noeviction")
    customer, path = CUSTOMERS[0], f"/v1/customers/{CUSTOMERS[0]}/recommendations?limit=5"
    first = client.get(path, headers=auth).get_json()["items"][0]["item_id"]
    token_key = f"{KEY_PREFIX}:gen:{customer}"
    token = redis_admin.get(token_key)
    redis_admin.config_set("maxmemory", 1)  # every write is refused from now on, reads still answer
    try:
        event = {"customer_id": customer, "item_id": first, "event_type": "purchase"}
        assert client.post("/v1/events", headers=auth, json={"events": [event]}).status_code == 202
        assert redis_admin.get(token_key) == token  # Redis did not take the invalidation
    finally:
        redis_admin.config_set("maxmemory", 0)
    answer = client.get(path, headers=auth).get_json()
    assert first not in [item["item_id"] for item in answer["items"]]  # the cached list was not trusted
    assert redis_admin.get(token_key) not in (None, token)  # and the invalidation reached Redis with that call
