"""Caching recommendation lists in a real Redis, and in-process when no Redis is configured."""

from __future__ import annotations

import dataclasses

import pytest

from recsvc.app import create_app
from recsvc.cache import KEY_PREFIX, LocalCache, recommendation_key


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
