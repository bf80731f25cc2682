"""Connections spread evenly over gunicorn's workers (recsvc/worker.py), checked on a real gunicorn."""

from __future__ import annotations

import os
import re
import socket
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pytest

from recsvc.worker import FREE, ConnectionBoard, GunicornLogger
from tests.conftest import API_KEY
from tests.server_process import running_server

ESTABLISHED = "01"  # state column of /proc/net/tcp


def test_board_slots_are_claimed_counted_and_freed():
    board = ConnectionBoard(slots=3)
    first, second = board.claim(), board.claim()
    assert (first, second) == (0, 1)
    assert board.fewest_besides(first) == 0  # the other live worker, with no connection yet
    board.counts[second] = 5
    assert board.fewest_besides(first) == 5
    assert board.fewest_besides(second) == 0
    board.release(first)
    assert board.counts[first] == FREE
    assert board.fewest_besides(second) is None  # alone: nobody to defer to
    assert board.claim() == 0  # a successor takes the freed slot
    assert board.claim() == 2
    assert board.claim() is None  # full: the worker runs unbalanced rather than failing


def test_board_counts_are_shared_with_a_forked_process():
    board = ConnectionBoard(slots=2)
    slot = board.claim()
    pid = os.fork()
    if pid == 0:  # the child plays a worker publishing its count
        board.counts[slot] = 7
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.counts[slot] == 7


def server_connections(port: int) -> Counter:
    """Established connections on the server side of `port`, counted by the process that holds each."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == ESTABLISHED:
            inodes.add(fields[9])
    held = Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # gone meanwhile, or not ours
            continue
        held[pid] += sum(link[8:-1] in inodes for link in links if link.startswith("socket:["))
    return +held


def wait_until_workers_poll(log: Path, workers: int, timeout: float = 30.0) -> None:
    """Block until `workers` workers of the gunicorn that writes `log` sit in their event loop (the main
    thread waits in epoll): /readyz answers as soon as the first one does, and a worker still booting
    takes no connection, balanced or not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        master = re.search(r"Listening at: \S+ \((\d+)\)", log.read_text())
        children = (Path(f"/proc/{master.group(1)}/task/{master.group(1)}/children").read_text().split()
                    if master else [])
        polling = [pid for pid in children if Path(f"/proc/{pid}/wchan").read_text() == "do_epoll_wait"]
        if len(polling) == workers:
            return
        time.sleep(0.05)
    pytest.fail(f"{workers} workers did not start polling:\n{log.read_text()}")


@pytest.mark.slow
@pytest.mark.parametrize("connections", [8, 6])
def test_keep_alive_connections_opened_at_once_are_split_evenly(trained_registry, tmp_path, connections):
    """The balancing waits at most ACCEPT_DEFER_SECONDS for the other worker to wake, so on a loaded machine a
    round can end one connection off even (a 4/2 failed one full run of the suite in CI on 2026-12-01). Three
    rounds: at least two even and none more than one off. Without the balancing (plain gthread; six runs of this
    test, 36 rounds) most rounds split 7/1, 6/2, 5/1 or 6/0, at most one of a run's three was even, and every run
    failed."""
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY}
    with running_server(env, tmp_path / "server.log", workers=2) as base:
        wait_until_workers_poll(tmp_path / "server.log", 2)
        port = urlparse(base).port
        splits = []
        for _round in range(3):
            splits.append(split_of_connections_opened_at_once(port, connections))
            wait_until_no_connections(port)
    even = [connections // 2] * 2
    assert sum(split == even for split in splits) >= 2, splits
    assert all(split[1] - split[0] <= 2 for split in splits), splits


def split_of_connections_opened_at_once(port: int, connections: int) -> list[int]:
    """Open `connections` at once, one request each kept alive, and count them per worker (sorted)."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(connections)]
    try:
        for client in clients:  # one request each, kept alive, so every connection has been accepted
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        for client in clients:
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
        per_worker = server_connections(port)
        assert sum(per_worker.values()) == connections, per_worker
        return sorted(per_worker.values()) + [0] * (2 - len(per_worker))
    finally:
        for client in clients:
            client.close()


def wait_until_no_connections(port: int, timeout: float = 10.0) -> None:
    """Block until the workers have closed every connection of the round before (they count it until then)."""
    deadline = time.monotonic() + timeout
    while server_connections(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server_connections(port), "the workers kept the closed connections"


def test_gunicorns_access_line_is_built_only_when_it_is_written():
    """recsvc's logging config drops gunicorn's access line (recsvc.access writes one with the request id);
    gunicorn would still build its fields for every request."""
    from gunicorn.config import Config

    from recsvc.logs import gunicorn_logconfig

    built = []

    class Spy(GunicornLogger):
        def atoms(self, resp, req, environ, request_time):
            built.append(1)
            return {}

    config = Config()
    config.set("logconfig_dict", gunicorn_logconfig("info"))
    Spy(config).access(None, None, {}, None)
    assert built == []
    config.set("accesslog", "/dev/null")  # an operator who asks for gunicorn's line still gets it
    config.set("logconfig_dict", {})
    Spy(config).access(None, None, {}, None)
    assert built == [1]
