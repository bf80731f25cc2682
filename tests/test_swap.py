"""Hot model swap through a real gunicorn (2 workers, preloaded) with requests in flight, and its metrics."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter

import numpy as np
import pytest
import requests

from recsvc import artifacts
from tests.conftest import API_KEY
from tests.server_process import running_server
from tests.test_api_fallback import publish, tiny_bundle

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
pytestmark = pytest.mark.slow


@pytest.fixture
def registry(tmp_path):
    root = tmp_path / "registry"
    publish(root, tiny_bundle("v1"))
    return root


@pytest.fixture
def server(registry, tmp_path):
    env = {"RECSVC_REGISTRY": str(registry), "RECSVC_API_KEYS": API_KEY, "RECSVC_RELOAD_INTERVAL": "0.2",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "RECSVC_LOG_LEVEL": "info"}
    with running_server(env, tmp_path / "server.log", workers=2, threads=4) as base:
        yield base


class Traffic:
    """Threads asking for recommendations until stopped; records every outcome with its model version."""

    def __init__(self, base: str, threads: int = 4):
        self.base, self.outcomes, self._stop = base, [], threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]

    def _run(self, n: int) -> None:
        session = requests.Session()  # keep-alive: each thread's connection stays with one worker
        while not self._stop.is_set():
            try:
                response = session.get(f"{self.base}/v1/customers/c{n % 2}/recommendations?limit=2",
                                       headers=HEADERS, timeout=5)
                outcome = (response.status_code, response.json().get("model_version"))
            except (requests.RequestException, ValueError) as exc:
                outcome = (type(exc).__name__, None)
            with self._lock:
                self.outcomes.append((time.monotonic(), *outcome))

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


def _metric(text: str, name: str, **labels) -> list[float]:
    pattern = re.compile(rf"^{name}(\{{[^}}]*\}})? (\S+)$")
    found = []
    for line in text.splitlines():
        match = pattern.match(line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            found.append(float(match.group(2)))
    return found


def test_swap_under_load_fails_no_request_and_serves_both_versions(server, registry):
    with Traffic(server) as traffic:
        time.sleep(1.0)
        publish(registry, tiny_bundle("v2"))
        swapped_at = time.monotonic()
        time.sleep(2.0)
    outcomes = traffic.outcomes
    assert len(outcomes) > 50
    failures = [o for o in outcomes if o[1] != 200]
    assert failures == []
    versions = Counter(version for _t, _status, version in outcomes)
    assert versions["v1"] > 0 and versions["v2"] > 0 and set(versions) == {"v1", "v2"}
    # Every worker checks every 0.2 s: a second after the swap nobody answers with the old version.
    assert {v for t, _s, v in outcomes if t > swapped_at + 1.0} == {"v2"}

    metrics = requests.get(f"{server}/metrics", timeout=5).text
    endpoint = "/v1/customers/<customer_id>/recommendations"
    assert sum(_metric(metrics, "recsvc_responses_total", endpoint=endpoint, status="200")) == len(outcomes)
    assert sum(_metric(metrics, "recsvc_request_seconds_count", endpoint=endpoint)) == len(outcomes)
    assert _metric(metrics, "recsvc_model_info", version="v2") == [1.0, 1.0]  # one line per live worker
    assert _metric(metrics, "recsvc_model_info", version="v1") == []  # no series left per version ever loaded


def test_a_broken_version_is_refused_while_the_old_one_keeps_serving(server, registry, tmp_path):
    publish(registry, tiny_bundle("v2"))
    (registry / "versions" / "v2" / "owned.indices.npy").unlink()
    with Traffic(server, threads=2) as traffic:
        time.sleep(1.5)
    assert traffic.outcomes and {(status, version) for _t, status, version in traffic.outcomes} == {(200, "v1")}
    ready = requests.get(f"{server}/readyz", timeout=5).json()
    assert ready["model_version"] == "v1" and ready["last_load_failure"]["version"] == "v2"
    metrics = requests.get(f"{server}/metrics", timeout=5).text
    assert sum(_metric(metrics, "recsvc_model_load_failures_total")) >= 2  # each worker refused it once
    tagged = requests.get(f"{server}/v1/customers/c0/recommendations", headers={**HEADERS, "X-Request-ID": "desk-0042"},
                          timeout=5)
    assert tagged.headers["X-Request-ID"] == "desk-0042"
    time.sleep(0.2)  # let the worker flush its log line

    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.strip()]
    assert any(line["level"] == "error" and line.get("refused_version") == "v2" for line in lines)
    access = [line for line in lines if line["logger"] == "recsvc.access"]
    assert len(access) >= len(traffic.outcomes), [line for line in lines if line["logger"] != "recsvc.access"][:8]
    assert all(len(line["request_id"]) >= 8 for line in access)
    assert any(line["request_id"] == "desk-0042" and line["status"] == 200 for line in access)
    artifacts.set_current(registry, "v1")  # leave the registry consistent for the fixture's shutdown


def test_a_version_that_loads_but_cannot_answer_is_refused_while_the_old_one_keeps_serving(server, registry):
    """Titles cut short: it loaded, and every answer was a 500 while /readyz said ready."""
    path = artifacts.write_version(registry, tiny_bundle("v2"))
    np.save(path / "catalog.title.npy", np.load(path / "catalog.title.npy")[:0], allow_pickle=False)
    artifacts.set_current(registry, "v2")
    with Traffic(server, threads=2) as traffic:
        time.sleep(1.5)
    assert traffic.outcomes and {(status, version) for _t, status, version in traffic.outcomes} == {(200, "v1")}
    ready = requests.get(f"{server}/readyz", timeout=5).json()
    assert ready["model_version"] == "v1" and ready["last_load_failure"]["version"] == "v2"
    assert "catalog.title has 0 entries" in ready["last_load_failure"]["reason"]
    artifacts.set_current(registry, "v1")


def test_a_swapped_out_version_leaves_no_series_in_a_single_process():
    from prometheus_client import REGISTRY, generate_latest

    from recsvc import metrics

    metrics.model_swapped(None, "t-old", None)
    metrics.model_swapped("t-old", "t-new", None)
    text = generate_latest(REGISTRY).decode()
    assert 'recsvc_model_info{version="t-new"} 1.0' in text and 't-old' not in text
