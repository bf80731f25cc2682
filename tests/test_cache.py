"""Caching recommendation lists in a real Redis, and in-process when no Redis is configured."""

from __future__ import annotations

import dataclasses
import zlib

import orjson
import pytest

from recsvc.app import create_app
from recsvc.cache import KEY_PREFIX, LocalCache, RedisCache, generation_key, recommendation_key


class ExplodingScorer:
    def __getattr__(self, name):
        raise AssertionError(f"the model was consulted ({name})")


@pytest.fixture
def redis_app(settings, redis_url, redis_client):
    app = create_app(dataclasses.replace(settings, redis_url=redis_url, cache_ttl=60))
    yield app
    app.extensions["recsvc"].store.stop()


def test_second_identical_request_is_served_from_redis(redis_app, redis_client, auth):
    client = redis_app.test_client()
    service = redis_app.extensions["recsvc"]
    url = "/v1/customers/C000001/recommendations?limit=4"
    first = client.get(url, headers=auth)
    assert first.status_code == 200 and service.recommender.computations == 1
    keys = redis_client.keys(f"{KEY_PREFIX}:rec:*")
    assert len(keys) == 1
    version = service.store.current().version
    assert keys[0].decode().startswith(f"{KEY_PREFIX}:rec:{version}:{first.get_json()['strategy']}:C000001:")
    assert 0 < redis_client.pttl(keys[0]) <= 60_000

    # The model must not be consulted: make every scorer explode, and the cached answer still comes back.
    scorers = service.store.current().scorers
    for name in scorers:
        scorers[name] = ExplodingScorer()
    second = client.get(url, headers=auth)
    assert second.status_code == 200 and service.recommender.computations == 1
    a, b = first.get_json(), second.get_json()
    assert a.pop("request_id") != b.pop("request_id")
    assert a == b


def test_different_parameters_are_different_entries(redis_app, redis_client, auth):
    client = redis_app.test_client()
    client.get("/v1/customers/C000001/recommendations?limit=4", headers=auth)
    client.get("/v1/customers/C000001/recommendations?limit=5", headers=auth)
    client.get("/v1/customers/C000001/recommendations?limit=4&exclude=SKU-00001", headers=auth)
    assert len(redis_client.keys(f"{KEY_PREFIX}:rec:*")) == 3
    assert redis_app.extensions["recsvc"].recommender.computations == 3


def test_key_names_every_part_and_ignores_list_order():
    a = recommendation_key("v1", "als", "c1", {"limit": 5, "exclude": sorted(["b", "a"])})
    b = recommendation_key("v1", "als", "c1", {"exclude": ["a", "b"], "limit": 5})
    assert a == b and a.startswith(f"{KEY_PREFIX}:rec:v1:als:c1:")
    assert recommendation_key("v2", "als", "c1", {"limit": 5}) != recommendation_key("v1", "als", "c1", {"limit": 5})


def test_without_redis_the_embedded_cache_serves_repeats(app, auth):
    service = app.extensions["recsvc"]
    assert isinstance(service.cache, LocalCache)
    client = app.test_client()
    for _ in range(3):
        assert client.get("/v1/customers/C000002/recommendations", headers=auth).status_code == 200
    assert service.recommender.computations == 1


def test_local_cache_expires_and_stays_bounded(monkeypatch):
    import recsvc.cache as cache_module

    now = [1000.0]
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: now[0])
    cache = LocalCache(max_entries=2)
    cache.set("a", b"1", ttl=10)
    cache.set("b", b"2", ttl=10)
    cache.set("c", b"3", ttl=10)
    assert cache.get("a") is None and cache.get("c") == b"3"
    now[0] += 11
    assert cache.get("b") is None and cache.get("c") is None


def test_local_cache_keeps_large_values_compressed_and_stays_within_its_byte_bound():
    value = orjson.dumps({"items": [{"item_id": f"I{i:06d}", "reasons": ["Because the customer has Item 1"]}
                                    for i in range(10)]})
    cache = LocalCache(max_entries=100, max_bytes=1920)  # room for three lists, one 512-byte slot each
    assert cache.status()["capacity_bytes"] <= 1920 and len(zlib.compress(value, 1)) < LocalCache.SLOT_BYTES
    for n in range(5):
        cache.set(f"k{n}", value, ttl=60)
    assert [cache.get(f"k{n}") for n in range(5)] == [None, None, value, value, value]  # least recently used went
    assert cache.bytes == 3 * LocalCache.SLOT_BYTES < 3 * len(value) and cache.status()["entries"] == 3
    cache.invalidate_customer("c1")  # a generation: kept in slots of its own, it pushes out no list
    assert [cache.get(f"k{n}") for n in range(2, 5)] == [value] * 3
    cache.set("k3", value, ttl=60)  # replacing an entry does not count it twice
    assert cache.status()["entries"] == 3 and cache.status()["generations"] == 1


def test_the_local_cache_size_is_a_metric(app, auth):
    from prometheus_client import REGISTRY

    client = app.test_client()
    assert client.get("/v1/customers/C000002/recommendations", headers=auth).status_code == 200
    cache = app.extensions["recsvc"].cache
    # Read from the table when scraped (a write does not pay for a pass over the whole table).
    assert b"recsvc_local_cache_entries 1.0" in client.get("/metrics").data
    assert REGISTRY.get_sample_value("recsvc_local_cache_bytes") == cache.bytes > 0
    assert REGISTRY.get_sample_value("recsvc_local_cache_entries") == cache.status()["entries"] == 1


def test_entry_codec_round_trips_and_rejects_foreign_bytes():
    from recsvc.cache import decode_entry, encode_entry

    assert decode_entry(encode_entry(b"g1", b'{"items":[]}')) == (b"g1", b'{"items":[]}')
    assert decode_entry(encode_entry(b"", b"{}")) == (b"", b"{}")
    assert decode_entry(b"") is None and decode_entry(b"\x05ab") is None


def test_invalidating_a_customer_reaches_every_replica(redis_app, settings, redis_url, redis_client, auth):
    other = create_app(dataclasses.replace(settings, redis_url=redis_url, cache_ttl=60))  # a second replica
    try:
        first, second = redis_app.test_client(), other.test_client()
        for customer in ("C000001", "C000002"):
            assert first.get(f"/v1/customers/{customer}/recommendations", headers=auth).status_code == 200
        redis_app.extensions["recsvc"].cache.invalidate_customer("C000001")
        replica = other.extensions["recsvc"].recommender
        assert second.get("/v1/customers/C000002/recommendations", headers=auth).status_code == 200
        assert replica.computations == 0  # the untouched customer is still a hit
        assert second.get("/v1/customers/C000001/recommendations", headers=auth).status_code == 200
        assert replica.computations == 1  # the invalidated one is computed again ...
        assert second.get("/v1/customers/C000001/recommendations", headers=auth).status_code == 200
        assert replica.computations == 1  # ... and cached again under the new generation
        assert 86_400_000 < redis_client.pttl(f"{KEY_PREFIX}:gen:C000001") <= 2 * 86_400_000
    finally:
        other.extensions["recsvc"].store.stop()


@pytest.mark.parametrize("make", [lambda url: RedisCache(url), lambda url: LocalCache()], ids=["redis", "local"])
def test_a_list_computed_while_its_customer_is_invalidated_is_not_served(make, redis_url, redis_client):
    cache = make(redis_url)

    def compute_during_an_event() -> bytes:
        cache.invalidate_customer("c1")  # new interactions arrive while the old history is being scored
        return b'{"items":["stale"]}'

    assert cache.get_or_compute("recsvc:v1:rec:k", "c1", compute_during_an_event) == (b'{"items":["stale"]}', False)
    assert cache.get_or_compute("recsvc:v1:rec:k", "c1", lambda: b'{"items":["fresh"]}') == (b'{"items":["fresh"]}',
                                                                                             False)
    assert cache.get_or_compute("recsvc:v1:rec:k", "c1", lambda: b"{}") == (b'{"items":["fresh"]}', True)


def test_an_evicted_generation_token_turns_its_customers_lists_into_misses(redis_url, redis_client):
    """Redis under maxmemory may evict a customer's generation token before the lists made under it: a list
    made before an invalidation must not then match "never invalidated" and be served."""
    cache = RedisCache(redis_url)
    assert cache.get_or_compute("recsvc:v1:rec:k", "c1", lambda: b'{"items":["old"]}') == (b'{"items":["old"]}',
                                                                                          False)
    assert cache.get_or_compute("recsvc:v1:rec:k", "c1", lambda: b"{}") == (b'{"items":["old"]}', True)
    cache.invalidate_customer("c1")  # the customer bought "old"
    assert redis_client.delete(generation_key("c1")) == 1  # what an eviction does
    assert redis_client.get("recsvc:v1:rec:k") is not None  # the stale list is still in Redis
    assert cache.get_or_compute("recsvc:v1:rec:k", "c1", lambda: b'{"items":["new"]}') == (b'{"items":["new"]}',
                                                                                          False)
    assert cache.get_or_compute("recsvc:v1:rec:k", "c1", lambda: b"{}") == (b'{"items":["new"]}', True)
    assert redis_client.pttl(generation_key("c1")) > 1000 * cache.ttl  # the new token outlives the list


def test_lists_above_the_entry_bound_are_served_but_not_cached(settings, redis_url, redis_client, auth):
    app = create_app(dataclasses.replace(settings, redis_url=redis_url, cache_max_entry_bytes=1024))
    try:
        client = app.test_client()
        small = client.get("/v1/customers/C000001/recommendations?limit=1", headers=auth)
        large = client.get("/v1/customers/C000001/recommendations?limit=50", headers=auth)
        assert small.status_code == large.status_code == 200 and len(large.data) > 1024
        assert len(redis_client.keys(f"{KEY_PREFIX}:rec:*")) == 1
        assert len(redis_client.get(redis_client.keys(f"{KEY_PREFIX}:rec:*")[0])) <= 1024
    finally:
        app.extensions["recsvc"].store.stop()


def test_breaker_opens_after_consecutive_failures_and_half_opens_to_probe():
    from recsvc.cache import CircuitBreaker

    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown=1.0, clock=lambda: now[0])
    breaker.failure(), breaker.failure(), breaker.success(), breaker.failure(), breaker.failure()
    assert breaker.state == "closed"  # a success in between resets the count
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 1.0
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow()  # one probe at a time
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 2.5
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_a_half_open_probe_that_never_reports_is_granted_again_after_a_cooldown():
    """A write's caller takes the write breaker's probe and is then stopped by the other breaker: the probe
    never reports, and the write breaker must not stay half-open (refusing every write) for good."""
    from recsvc.cache import CircuitBreaker

    now = [0.0]
    breaker = CircuitBreaker(failures=1, cooldown=1.0, clock=lambda: now[0])
    breaker.failure()
    now[0] = 1.0
    assert breaker.allow() and not breaker.allow()  # the probe, lost
    now[0] = 2.0
    assert breaker.allow() and breaker.state == "half_open"


def test_an_unreachable_redis_opens_the_breaker_and_requests_still_succeed(settings, auth):
    from tests.conftest import free_port

    app = create_app(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        client = app.test_client()
        for customer in ("C000001", "C000002", "C000003", "C000004"):
            assert client.get(f"/v1/customers/{customer}/recommendations", headers=auth).status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.get_json()["cache"]["breaker"] == "open"
        assert b"recsvc_redis_breaker_state 2.0" in client.get("/metrics").data
    finally:
        app.extensions["recsvc"].store.stop()


def test_a_claim_sees_an_entry_another_process_stored_meanwhile(redis_url, redis_client):
    first, second = RedisCache(redis_url), RedisCache(redis_url)
    assert first.get_or_compute("recsvc:v1:rec:k2", "c2", lambda: b'{"a":1}') == (b'{"a":1}', False)
    assert not redis_client.keys(f"{KEY_PREFIX}:lock:*")  # the computing process released its lock
    token = redis_client.get(generation_key("c2"))
    assert token and second.claim("recsvc:v1:rec:k2", "c2") == (True, b'{"a":1}', token)
    assert not redis_client.keys(f"{KEY_PREFIX}:lock:*")  # and so did the one that found the entry


def test_cache_settings_come_from_the_environment_in_milliseconds():
    from recsvc.config import Settings

    settings = Settings.from_env({"RECSVC_CACHE_LOCK_WAIT_MS": "80", "RECSVC_REDIS_BREAKER_COOLDOWN_MS": "250",
                                  "RECSVC_REDIS_BREAKER_FAILURES": "5", "RECSVC_CACHE_MAX_ENTRY_BYTES": "4096"})
    assert (settings.cache_lock_wait, settings.redis_breaker_cooldown) == (0.08, 0.25)
    assert (settings.redis_breaker_failures, settings.cache_max_entry_bytes) == (5, 4096)


@pytest.mark.parametrize("name, value", [("RECSVC_CACHE_LOCK_WAIT_MS", "soon"), ("RECSVC_REDIS_BREAKER_FAILURES", "0"),
                                         ("RECSVC_CACHE_MAX_ENTRY_BYTES", "10")])
def test_wrong_cache_settings_name_the_variable(name, value):
    from recsvc.config import Settings
    from recsvc.errors import ConfigError

    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_a_setting_out_of_range_names_its_bounds_in_plain_numbers():
    from recsvc.config import Settings
    from recsvc.errors import ConfigError

    with pytest.raises(ConfigError, match=r"RECSVC_MAX_BODY_BYTES='200' must be between 1024 and 67108864$"):
        Settings.from_env({"RECSVC_MAX_BODY_BYTES": "200"})
