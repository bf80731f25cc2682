"""The per-key token bucket: refill over time, per key, only for valid keys, 429 in the one error shape."""

from __future__ import annotations

import pytest
import requests

from recsvc.api.auth import RateLimiter
from recsvc.config import Settings
from recsvc.errors import ConfigError
from tests.conftest import API_KEY
from tests.server_process import running_server
from tests.test_api_security import error_of, make_client  # noqa: F401  (fixture)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_the_burst_then_refills_at_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.wait_for("key-a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_for("key-a") == pytest.approx(0.5)  # one token comes back every 1/rate seconds
    clock.now += 0.5
    assert limiter.wait_for("key-a") == 0.0
    assert limiter.wait_for("key-a") > 0
    clock.now += 60  # a long pause refills to the burst, never above it
    assert [limiter.wait_for("key-a") for _ in range(4)][-1] > 0


def test_keys_have_separate_buckets_and_the_key_itself_is_not_kept():
    limiter = RateLimiter(rate=1.0, burst=1, clock=FakeClock())
    assert limiter.wait_for("key-a") == 0.0 and limiter.wait_for("key-a") > 0
    assert limiter.wait_for("key-b") == 0.0
    assert all(isinstance(bucket, bytes) and b"key-" not in bucket for bucket in limiter._buckets)


def test_requests_with_wrong_keys_do_not_use_up_a_real_keys_bucket(make_client, auth):  # noqa: F811
    client = make_client(rate_limit=0.5, rate_burst=2)
    for _ in range(20):
        assert client.get("/v1/models", headers={"Authorization": "Bearer not-a-real-key-1"}).status_code == 401
    assert [client.get("/v1/models", headers=auth).status_code for _ in range(3)] == [200, 200, 429]


def test_every_v1_route_is_limited_and_says_when_to_retry(make_client, auth):  # noqa: F811
    client = make_client(rate_limit=0.5, rate_burst=1)
    assert client.get("/v1/customers/c0/recommendations", headers=auth).status_code == 200
    for method, path in [("GET", "/v1/customers/c0/recommendations"), ("POST", "/v1/feedback"),
                         ("GET", "/v1/items/i0/similar"), ("POST", "/v1/recommendations/batch")]:
        response = client.open(path, method=method, headers=auth, json={})
        error = error_of(response, 429)
        assert error["details"]["retry_after_seconds"] == int(response.headers["Retry-After"]) == 2
        assert API_KEY not in response.get_data(as_text=True)


@pytest.mark.parametrize("name, value", [("RECSVC_RATE_LIMIT", "fast"), ("RECSVC_RATE_LIMIT", "-1"),
                                         ("RECSVC_RATE_BURST", "0")])
def test_a_wrong_rate_setting_is_refused_by_name(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_the_rate_settings_are_read_from_the_environment():
    settings = Settings.from_env({"RECSVC_RATE_LIMIT": "20", "RECSVC_RATE_BURST": "40"})
    assert (settings.rate_limit, settings.rate_burst) == (20.0, 40)


@pytest.mark.slow
def test_under_gunicorn_each_worker_has_its_own_bucket(trained_registry, tmp_path):
    """The documented trade-off: no Redis round trip on the hot path, so the limit holds per worker."""
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY, "RECSVC_RATE_LIMIT": "0.01",
           "RECSVC_RATE_BURST": "3", "RECSVC_SPOOL_DIR": str(tmp_path / "spool"), "RECSVC_LOG_LEVEL": "warning"}
    with running_server(env, tmp_path / "server.log") as base:
        # A new connection per request, so both workers take some.
        statuses = [requests.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=5).status_code for _ in range(24)]
    assert set(statuses) == {200, 429}
    assert 3 <= statuses.count(200) <= 6, statuses  # the burst of 3, in one worker or in each of the two
