"""Shared fixtures: demo data, a trained registry, the app, and a real redis-server."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import redis  # noqa: E402

from recsvc.app import create_app  # noqa: E402
from recsvc.config import Settings  # noqa: E402
from tests.redis_process import RedisProcess, free_port  # noqa: E402,F401  (free_port: used by tests)
from training.config import TrainConfig  # noqa: E402
from training.demo_data import DemoSizes, write  # noqa: E402
from training.pipeline import fit_and_publish  # noqa: E402

API_KEY = "test-api-key-0001"
ADMIN_KEY = "test-admin-key-0001"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """REDIS_URL when set; otherwise a redis-server of our own on a free port, stopped at the end."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server for this test alone, to kill, freeze and restart on the same port."""
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


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
