"""Shared fixtures: demo data, a trained registry, the app, and a real redis-server."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import redis  # noqa: E402

from recsvc.app import create_app  # noqa: E402
from recsvc.config import Settings  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.demo_data import DemoSizes, write  # noqa: E402
from training.pipeline import fit_and_publish  # noqa: E402

API_KEY = "test-api-key-0001"
ADMIN_KEY = "test-admin-key-0001"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """REDIS_URL when set; otherwise a redis-server of our own on a free port, stopped at the end."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("tests need Redis: set REDIS_URL or install redis-server (make test installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    yield url
    client.close()
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory) -> dict[str, Path]:
    return write(tmp_path_factory.mktemp("demo"), DemoSizes(customers=600, items=160, interactions=15_000), seed=3)


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory, demo_paths) -> Path:
    """A registry with one published version of als + popular, trained on the demo data."""
    registry = tmp_path_factory.mktemp("registry")
    config = TrainConfig(strategies=["als", "popular"], params={"als": {"factors": 16, "iterations": 10}})
    fit_and_publish(demo_paths["interactions"], registry, config, catalog_path=demo_paths["catalog"],
                    log=lambda _line: None)
    return registry


@pytest.fixture
def settings(trained_registry) -> Settings:
    return Settings(registry=trained_registry, api_keys=frozenset({API_KEY}), admin_keys=frozenset({ADMIN_KEY}))


@pytest.fixture
def app(settings):
    app = create_app(settings)
    app.config.update(TESTING=True)
    yield app
    app.extensions["recsvc"].store.stop()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
