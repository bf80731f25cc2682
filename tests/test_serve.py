"""`recsvc serve` under a real gunicorn: preloaded app, several workers, real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from tests.conftest import API_KEY
from tests.server_process import running_server


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


def test_bad_configuration_exits_2_before_serving(tmp_path):
    env = {**os.environ, "RECSVC_CACHE_TTL": "forever"}
    result = subprocess.run([sys.executable, "-m", "recsvc.cli", "serve"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "RECSVC_CACHE_TTL='forever' is not a number" in result.stderr
