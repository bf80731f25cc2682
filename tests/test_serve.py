"""`recsvc serve` under a real gunicorn: preloaded app, several workers, real HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from recsvc.cli import bind_address
from tests.conftest import API_KEY, free_port
from tests.server_process import running_server

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


@pytest.fixture
def server(trained_registry, tmp_path):
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY}
    with running_server(env, tmp_path / "server.log") as base:
        yield base


def test_gunicorn_serves_recommendations(server):
    session = requests.Session()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for _ in range(20):  # spread over both workers
        response = session.get(f"{server}/v1/customers/C000003/recommendations?limit=3", headers=headers, timeout=5)
        assert response.status_code == 200
        assert len(response.json()["items"]) == 3
    assert session.get(f"{server}/v1/customers/C000003/recommendations", timeout=5).status_code == 401


def test_recsvc_bind_sets_the_address_when_serve_has_no_host_or_port(trained_registry, tmp_path):
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY}
    with running_server(env, tmp_path / "server.log", workers=1, bind_from_env=True) as base:
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
        # The image's HEALTHCHECK follows RECSVC_BIND too (a container on another port must not turn unhealthy).
        healthcheck = re.search(r"^HEALTHCHECK .*\n\s+CMD (\[.*\])$", DOCKERFILE.read_text(), re.M)
        command = json.loads(healthcheck.group(1))
        assert command[0] == "python"
        bind = {"RECSVC_BIND": base.removeprefix("http://")}
        assert subprocess.run([sys.executable, *command[1:]], env={**os.environ, **bind}, timeout=30).returncode == 0


def _sample(metrics: str, name: str, **labels) -> float:
    """Sum of a metric's samples with these labels in a Prometheus text page (all workers' pids together)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name + "{") and all(w in line for w in wanted))


def test_cached_answers_are_counted_by_every_worker_in_the_merged_metrics(server):
    session = requests.Session()
    route = "/v1/customers/<customer_id>/recommendations"
    before = session.get(f"{server}/metrics", timeout=5).text
    for n in range(40):  # after each worker's first (a miss), hits: answered by the fast path
        response = session.get(f"{server}/v1/customers/C000004/recommendations?limit=2", timeout=5,
                               headers={"Authorization": f"Bearer {API_KEY}", "X-Request-ID": f"serve-test-{n:04d}"})
        assert response.status_code == 200 and response.headers["X-Request-ID"] == f"serve-test-{n:04d}"
        assert response.json()["request_id"] == f"serve-test-{n:04d}"
    after = session.get(f"{server}/metrics", timeout=5).text

    def counted(name: str, **labels) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert counted("recsvc_request_seconds_count", endpoint=route, method="GET") == 40
    assert counted("recsvc_responses_total", endpoint=route, status="200") == 40
    hits = counted("recsvc_cache_lookups_total", result="hit")
    assert hits + counted("recsvc_cache_lookups_total", result="miss") == 40 and hits >= 38


def test_the_masters_warm_up_leaves_no_trace_in_metrics_logs_or_cache(trained_registry, tmp_path):
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY, "RECSVC_LOG_LEVEL": "info",
           "RECSVC_RATE_LIMIT": "0.01", "RECSVC_RATE_BURST": "2"}
    with running_server(env, tmp_path / "server.log", workers=1) as base:
        session = requests.Session()
        metrics = session.get(f"{base}/metrics", timeout=5).text
        for name in ("recsvc_cache_lookups_total", "recsvc_recommendation_source_total", "recsvc_local_cache_bytes"):
            assert _sample(metrics, name) == 0, name
        assert _sample(metrics, "recsvc_request_seconds_count") == _sample(
            metrics, "recsvc_request_seconds_count", endpoint="/readyz")  # only running_server's polls
        auth = {"Authorization": f"Bearer {API_KEY}"}
        # The warm-up used this key, but its rate-limit burst is whole; the first list is computed (a miss).
        for _ in range(2):
            assert session.get(f"{base}/v1/customers/C000000/recommendations?limit=10", headers=auth,
                               timeout=5).status_code == 200
        metrics = session.get(f"{base}/metrics", timeout=5).text
        assert _sample(metrics, "recsvc_cache_lookups_total", result="miss") == 1
        assert _sample(metrics, "recsvc_cache_lookups_total", result="hit") == 1
    access = [line for line in (tmp_path / "server.log").read_text().splitlines() if '"recsvc.access"' in line]
    assert not [line for line in access if "/recommendations" in line][2:] and "warm-up" not in "".join(access)


@pytest.mark.parametrize("host, port, env_bind, bind", [
    (None, 8001, None, "127.0.0.1:8001"), ("0.0.0.0", None, None, "0.0.0.0:8000"),
    ("::1", 8001, None, "[::1]:8001"), ("[::]", 8001, None, "[::]:8001"),
    # the part not given comes from RECSVC_BIND (the image sets 0.0.0.0:8000)
    (None, 9000, "0.0.0.0:8000", "0.0.0.0:9000"), ("127.0.0.1", None, "0.0.0.0:8080", "127.0.0.1:8080"),
    (None, 9000, "[::]:8000", "[::]:9000"), (None, 9000, "unix:/run/recsvc.sock", "127.0.0.1:9000"),
])
def test_serve_passes_host_and_port_to_gunicorn_ipv6_in_brackets(host, port, env_bind, bind):
    assert bind_address(host, port, env_bind) == bind


def test_gunicorn_conf_loads_openblas_single_threaded_without_the_variable_set(tmp_path):
    """gunicorn started by hand (or by the image) reads gunicorn_conf.py first, and its settings check loads numpy."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code = ("import recsvc.gunicorn_conf, threadpoolctl; "
            "print(max(i['num_threads'] for i in threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas'))")
    done = subprocess.run([sys.executable, "-c", code], env={**env, "RECSVC_REGISTRY": str(tmp_path)},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_bad_configuration_exits_2_before_serving(tmp_path):
    env = {**os.environ, "RECSVC_CACHE_TTL": "forever"}
    result = subprocess.run([sys.executable, "-m", "recsvc.cli", "serve"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "RECSVC_CACHE_TTL='forever' is not a number" in result.stderr


def start_and_stop(env: dict, argv: list[str], log: Path, until=lambda: False, timeout: float = 30.0) -> int:
    """Run a server command until `until()` holds (or it exits, or `timeout`), stop it; its exit code."""
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while process.poll() is None and not until() and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        process.terminate()
    return process.wait(timeout=30)


def test_without_a_model_the_warm_up_logs_no_errors_and_failed_starts_leave_no_metrics_directory(tmp_path):
    empty, temp = tmp_path / "registry", tmp_path / "tmp"
    empty.mkdir(), temp.mkdir()
    # Authentication off, as for local development: the warm-up's request without a key then reaches the model too.
    env = {"RECSVC_REGISTRY": str(empty), "RECSVC_AUTH": "off", "TMPDIR": str(temp),
           "RECSVC_SPOOL_DIR": str(tmp_path / "spool")}
    port = free_port()
    serve = [sys.executable, "-m", "recsvc.cli", "serve", "--port", str(port), "--workers", "1"]
    alive = lambda: _answers(f"http://127.0.0.1:{port}/healthz")  # noqa: E731 (/readyz is 503 without a model)
    start_and_stop(env, serve, tmp_path / "no-model.log", until=alive)
    log = (tmp_path / "no-model.log").read_text()
    assert "Booting worker" in log and "no model version is loaded yet" not in log
    assert not list(temp.glob("recsvc-metrics-*"))

    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "python:recsvc.gunicorn_conf", "--bind",
                f"127.0.0.1:{free_port()}", "no_such_module:app"]
    assert start_and_stop(env, gunicorn, tmp_path / "crash.log") != 0  # the app cannot be loaded
    assert "no_such_module" in (tmp_path / "crash.log").read_text()
    assert not list(temp.glob("recsvc-metrics-*"))


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.ConnectionError:
        return False
