"""`recsvc serve` under a real gunicorn: preloaded app, several workers, real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import API_KEY, free_port


@pytest.fixture
def server(trained_registry, tmp_path):
    port = free_port()
    env = {**os.environ, "RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "recsvc.cli", "serve", "--port", str(port), "--workers", "2"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.1)
    else:
        process.kill()
        process.wait()
        pytest.fail(f"server did not become ready:\n{log.read_text()}")
    yield base
    process.terminate()
    process.wait(timeout=30)


def test_gunicorn_serves_recommendations(server):
    session = requests.Session()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for _ in range(20):  # spread over both workers
        response = session.get(f"{server}/v1/customers/C000003/recommendations?limit=3", headers=headers, timeout=5)
        assert response.status_code == 200
        assert len(response.json()["items"]) == 3
    assert session.get(f"{server}/v1/customers/C000003/recommendations", timeout=5).status_code == 401


def test_bad_configuration_exits_2_before_serving(tmp_path):
    env = {**os.environ, "RECSVC_CACHE_TTL": "forever"}
    result = subprocess.run([sys.executable, "-m", "recsvc.cli", "serve"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "RECSVC_CACHE_TTL='forever' is not a number" in result.stderr
