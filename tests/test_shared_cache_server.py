"""The embedded cache under a real gunicorn with two workers: one table for both, hits and invalidations included."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import pytest

from tests.conftest import API_KEY
from tests.server_process import running_server
from tests.test_api_fallback import publish, tiny_bundle
from tests.test_swap import _metric

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
LIST_URL = "/v1/customers/c0/recommendations?limit=3"
pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    registry = tmp_path / "registry"
    publish(registry, tiny_bundle("v1"))
    env = {"RECSVC_REGISTRY": str(registry), "RECSVC_API_KEYS": API_KEY,
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "RECSVC_LOG_LEVEL": "warning"}
    with running_server(env, tmp_path / "server.log", workers=2, threads=2) as base:
        yield base


def worker_holding(connection: http.client.HTTPConnection) -> int:
    """The pid of the process that accepted this keep-alive connection: the owner of the server end of the
    socket (found in /proc/net/tcp by the two ports, then among the processes' open files by its inode)."""
    client_port, server_port = connection.sock.getsockname()[1], connection.port
    inodes = [fields[9] for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
              if int(fields[1].split(":")[1], 16) == server_port and int(fields[2].split(":")[1], 16) == client_port]
    target = f"socket:[{inodes[0]}]"
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:  # a process that ended, or not ours to read
            continue
    raise AssertionError("no process holds the server end of the connection")


@pytest.fixture
def both_workers(server) -> tuple[http.client.HTTPConnection, http.client.HTTPConnection]:
    """Two keep-alive connections accepted by different workers (each worker accepts what it can: try a few)."""
    host, port = server.removeprefix("http://").split(":")
    opened, by_worker = [], {}
    try:
        while len(by_worker) < 2 and len(opened) < 40:
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            opened.append(connection)
            assert call(connection, "GET", "/healthz")[0] == 200
            by_worker.setdefault(worker_holding(connection), connection)
        if len(by_worker) < 2:
            pytest.fail("every connection went to the same worker")
        yield tuple(by_worker.values())
    finally:
        for connection in opened:
            connection.close()


def call(connection: http.client.HTTPConnection, method: str, path: str, body=None) -> tuple[int, bytes]:
    connection.request(method, path, body=None if body is None else json.dumps(body), headers=HEADERS)
    response = connection.getresponse()
    return response.status, response.read()


def lookups(connection: http.client.HTTPConnection) -> tuple[float, float]:
    """(hits, misses) of the recommendation cache over the whole server."""
    text = call(connection, "GET", "/metrics")[1].decode()
    return (sum(_metric(text, "recsvc_cache_lookups_total", result="hit")),
            sum(_metric(text, "recsvc_cache_lookups_total", result="miss")))


def items(body: bytes) -> list[str]:
    return [item["item_id"] for item in json.loads(body)["items"]]


def test_a_list_one_worker_cached_is_a_hit_in_the_other_and_an_event_reaches_both(both_workers):
    first, second = both_workers
    assert worker_holding(first) != worker_holding(second)

    status, computed = call(first, "GET", LIST_URL)
    assert status == 200 and lookups(first) == (0, 1)
    status, cached = call(second, "GET", LIST_URL)  # the other worker: served from the shared table
    assert status == 200 and lookups(second) == (1, 1) and items(cached) == items(computed)

    bought = items(computed)[0]
    event = {"events": [{"customer_id": "c0", "item_id": bought, "event_type": "purchase"}]}
    assert call(first, "POST", "/v1/events", event)[0] == 202
    status, recomputed = call(second, "GET", LIST_URL)
    assert status == 200 and lookups(second) == (1, 2)  # the other worker saw the invalidation: computed again
    assert bought not in items(recomputed)  # and knew the item the customer now has from the first's event
    assert call(first, "GET", LIST_URL)[0] == 200
    assert lookups(first) == (2, 2)  # and the list it computed serves both workers again

    text = call(first, "GET", "/metrics")[1].decode()
    assert len(_metric(text, "recsvc_local_cache_entries")) == 1  # one shared table: one series, not one per pid
    assert _metric(text, "recsvc_local_cache_entries") == [2.0]  # the list and the customer's recent items
    ready = json.loads(call(second, "GET", "/readyz")[1])
    assert ready["cache"]["kind"] == "local" and ready["cache"]["shared"] and ready["cache"]["entries"] == 2
