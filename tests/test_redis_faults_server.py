"""A bought item is never suggested again, by any worker, while Redis is down, full or refusing the service.

A real gunicorn with two workers and a real redis-server: the item a customer buys (POST /v1/events) must
stay out of every answer on fresh connections, whichever worker answers, during the fault and after it.
"""

from __future__ import annotations

import http.client
import json
import time

import pytest
import redis

from recsvc.cache import KEY_PREFIX
from tests.conftest import API_KEY
from tests.server_process import running_server
from tests.test_shared_cache_server import worker_holding

pytestmark = pytest.mark.slow
CUSTOMER = "C000001"
LIST_URL = f"/v1/customers/{CUSTOMER}/recommendations?limit=5"
PASSWORD = "a-password-the-service-lacks"


@pytest.fixture
def server(trained_registry, own_redis, tmp_path):
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY, "RECSVC_REDIS_URL": own_redis.url,
           "RECSVC_REDIS_BREAKER_COOLDOWN_MS": "200", "RECSVC_SPOOL_DIR": str(tmp_path / "spool"),
           "RECSVC_LOG_LEVEL": "error", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    with running_server(env, tmp_path / "server.log", workers=2) as base:
        yield base.removeprefix("http://").split(":")


def on_fresh_connection(server, method: str, path: str, body=None) -> tuple[int, int, bytes]:
    """(the pid of the worker that answered, status, body) of one request on a new connection."""
    host, port = server
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = connection.getresponse()
        status, answer = response.status, response.read()
        return worker_holding(connection), status, answer  # the connection is kept alive until we close it
    finally:
        connection.close()


def suggested_by_both_workers(server, each: int = 6, most: int = 120) -> list[str]:
    """The items of GETs on fresh connections until each of the two workers answered `each` of them."""
    answered: dict[int, int] = {}
    items: list[str] = []
    for _ in range(most):
        worker, status, body = on_fresh_connection(server, "GET", LIST_URL)
        assert status == 200, body
        items += [item["item_id"] for item in json.loads(body)["items"]]
        answered[worker] = answered.get(worker, 0) + 1
        if len(answered) == 2 and min(answered.values()) >= each:
            return items
    pytest.fail(f"the two workers did not both answer {each} requests: {answered}")


def break_redis(own_redis, fault: str) -> None:
    admin = own_redis.client()
    if fault == "killed":
        own_redis.kill()
    elif fault == "full":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # reads answer, every write is refused
    else:
        admin.config_set("requirepass", PASSWORD)
        admin.client_kill_filter(_type="normal", skipme=True)  # the workers' connections must log in again


def mend_redis(own_redis, fault: str) -> redis.Redis:
    """Undo the fault; a client of the mended Redis."""
    if fault == "killed":
        own_redis.start()
        return own_redis.client()
    admin = redis.Redis.from_url(own_redis.url, password=PASSWORD if fault == "password" else None)
    admin.config_set("maxmemory", 0) if fault == "full" else admin.config_set("requirepass", "")
    return own_redis.client()


@pytest.mark.parametrize("fault", ["killed", "full", "password"])
def test_a_bought_item_is_never_suggested_again_by_any_worker(server, own_redis, fault):
    bought = suggested_by_both_workers(server)[0]  # cached in Redis, and both workers' breakers closed
    token = own_redis.client().get(f"{KEY_PREFIX}:gen:{CUSTOMER}")
    break_redis(own_redis, fault)
    event = {"events": [{"customer_id": CUSTOMER, "item_id": bought, "event_type": "purchase"}]}
    assert on_fresh_connection(server, "POST", "/v1/events", event)[1] == 202

    assert bought not in suggested_by_both_workers(server)
    client = mend_redis(own_redis, fault)
    assert bought not in suggested_by_both_workers(server)
    if fault != "killed":  # the invalidation Redis missed reaches it once a worker's write breaker lets a write through
        generation = f"{KEY_PREFIX}:gen:{CUSTOMER}"
        deadline = time.monotonic() + 5.0  # the breakers' cooldown is 200 ms; requests drive the retry
        while client.get(generation) in (None, token) and time.monotonic() < deadline:
            assert bought not in suggested_by_both_workers(server, each=1)
            time.sleep(0.05)
        assert client.get(generation) not in (None, token)
