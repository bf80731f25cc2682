"""`recsvc-train warm-cache`: entries byte-identical to the server's, served without computing."""

from __future__ import annotations

import dataclasses
import time
from urllib.parse import quote

import pytest
from click.testing import CliRunner

from recsvc import artifacts
from recsvc.app import create_app
from recsvc.cache import KEY_PREFIX, generation_key, recent_items_key
from recsvc.recommend import RecommendationQuery
from tests.conftest import free_port
from training.cli import main
from training.config import TrainConfig
from training.pipeline import fit_and_publish
from training.warm import most_active, warm_cache

TOP = 60


@pytest.fixture
def redis_app(settings, redis_url, redis_client):
    # redis_timeout 2 s: busy machines lose no events
    app = create_app(dataclasses.replace(settings, redis_url=redis_url, redis_timeout=2.0))
    yield app
    app.extensions["recsvc"].store.stop()


def warmed_customers(trained_registry, top: int) -> list[str]:
    bundle = artifacts.load_current(trained_registry)
    return [bundle.customers.external(int(c)) for c in most_active(bundle, top)]


def test_warm_entries_are_byte_identical_to_what_the_server_caches(trained_registry, redis_url, redis_client,
                                                                    redis_app, auth):
    # One customer invalidated, one with items from POST /v1/events since training: both as the server sees them.
    first, second = warmed_customers(trained_registry, 2)
    redis_app.extensions["recsvc"].cache.invalidate_customer(first)
    service = redis_app.extensions["recsvc"]
    bundle = service.store.current()
    best = service.recommender.compute(bundle, bundle.default_strategy, RecommendationQuery(second))["items"][0]
    service.recent_items.add(second, [best["item_id"]])
    # An item whose time as the customer's own has passed counts no more, for the warm-up as for the server.
    expired = service.recommender.compute(bundle, bundle.default_strategy, RecommendationQuery(first))["items"][0]
    redis_client.zadd(recent_items_key(first), {expired["item_id"]: time.time() - 1})
    result = warm_cache(trained_registry, redis_url, top=TOP, log=lambda _line: None)
    assert result.entries == TOP
    warmed = {key: redis_client.get(key) for key in redis_client.keys(f"{KEY_PREFIX}:rec:*")}
    assert len(warmed) == TOP

    redis_client.delete(*warmed)
    client = redis_app.test_client()
    for customer in warmed_customers(trained_registry, TOP):
        assert client.get(f"/v1/customers/{customer}/recommendations", headers=auth).status_code == 200
    served = {key: redis_client.get(key) for key in redis_client.keys(f"{KEY_PREFIX}:rec:*")}
    assert served == warmed
    assert service.recommender.computations == 2 + TOP  # the two computed above, then one per customer
    # The event was really taken into account: the customer's best item now counts as owned.
    assert best["item_id"].encode() not in warmed[next(k for k in warmed if f":{second}:".encode() in k)]
    assert expired["item_id"].encode() in warmed[next(k for k in warmed if f":{first}:".encode() in k)]


def test_customer_ids_beyond_ascii_are_warmed_under_the_servers_keys(demo_paths, tmp_path, settings, redis_url,
                                                                  redis_client, auth):
    """The warm-up writes keys and lengths in bytes around the ids' UTF-8: ids of two- and three-byte characters
    (and a token made for each) must give the entries the server makes and finds."""
    interactions = tmp_path / "interactions.csv"
    interactions.write_text(demo_paths["interactions"].read_text(encoding="utf-8").replace('"C', '"kundé-顧客-C'),
                            encoding="utf-8")
    registry = tmp_path / "registry"
    fit_and_publish(interactions, registry, TrainConfig(strategies=["als"], params={"als": {"factors": 8}}),
                    catalog_path=demo_paths["catalog"], log=lambda _line: None)
    customers = warmed_customers(registry, TOP)
    assert all(len(customer.encode()) > len(customer) for customer in customers)
    assert warm_cache(registry, redis_url, top=TOP, log=lambda _line: None).entries == TOP
    warmed = {key: redis_client.get(key) for key in redis_client.keys(f"{KEY_PREFIX}:rec:*")}
    assert len(warmed) == TOP and all(redis_client.get(generation_key(customer)) for customer in customers)
    redis_client.delete(*warmed)
    app = create_app(dataclasses.replace(settings, registry=registry, redis_url=redis_url, redis_timeout=2.0))
    try:
        client = app.test_client()
        for customer in customers:
            assert client.get(f"/v1/customers/{quote(customer)}/recommendations", headers=auth).status_code == 200
        assert {key: redis_client.get(key) for key in redis_client.keys(f"{KEY_PREFIX}:rec:*")} == warmed
    finally:
        app.extensions["recsvc"].store.stop()


def test_the_server_answers_warmed_customers_without_computing(trained_registry, redis_url, redis_client,
                                                               redis_app, auth):
    warm_cache(trained_registry, redis_url, top=TOP, log=lambda _line: None)
    client = redis_app.test_client()
    customers = warmed_customers(trained_registry, TOP)
    for customer in customers:
        body = client.get(f"/v1/customers/{customer}/recommendations", headers=auth).get_json()
        assert body["customer_id"] == customer and len(body["items"]) == 10
    assert redis_app.extensions["recsvc"].recommender.computations == 0
    # Other requests are not warmed: a different limit is computed.
    client.get(f"/v1/customers/{customers[0]}/recommendations?limit=3", headers=auth)
    assert redis_app.extensions["recsvc"].recommender.computations == 1


def test_most_active_customers_come_first(trained_registry):
    bundle = artifacts.load_current(trained_registry)
    counts = [len(bundle.owned_items(int(c))) for c in most_active(bundle, 100)]
    assert counts == sorted(counts, reverse=True) and counts[0] == max(
        len(bundle.owned_items(c)) for c in range(len(bundle.customers)))


def test_cli_prints_entries_per_second(trained_registry, redis_url, redis_client):
    result = CliRunner().invoke(main, ["warm-cache", "--registry", str(trained_registry), "--redis-url", redis_url,
                                       "--top", "25", "--ttl", "120"])
    assert result.exit_code == 0, result.output
    assert "warmed 25 entries" in result.output and "entries/s" in result.output
    keys = redis_client.keys(f"{KEY_PREFIX}:rec:*")
    assert len(keys) == 25 and 0 < redis_client.pttl(keys[0]) <= 120_000


def test_server_only_settings_in_the_environment_do_not_stop_the_warm_up(trained_registry, redis_url, tmp_path):
    """A trainer sharing the servers' environment file: their spool directory and keys are none of its business,
    while their RECSVC_CACHE_MAX_ENTRY_BYTES is (a list the servers would not cache is not written)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    env = {"RECSVC_SPOOL_DIR": str(blocker / "spool"), "RECSVC_API_KEYS": "short"}
    args = ["warm-cache", "--registry", str(trained_registry), "--redis-url", redis_url, "--top", "5"]
    result = CliRunner(env=env).invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "warmed 5 entries" in result.output
    result = CliRunner(env={**env, "RECSVC_CACHE_MAX_ENTRY_BYTES": "10"}).invoke(main, args)
    assert result.exit_code == 2 and "RECSVC_CACHE_MAX_ENTRY_BYTES='10' must be between 1024" in result.output


@pytest.mark.parametrize("args, code, message", [
    (["--registry", "{empty}", "--redis-url", "{redis}"], 2, "has no current model version"),
    (["--registry", "{registry}", "--redis-url", "http://example.org"], 2, "is not a Redis URL"),
    (["--registry", "{registry}", "--redis-url", "redis://:wrongpass@127.0.0.1:{dead}/0"], 1,
     "cannot reach Redis at redis://***@127.0.0.1:"),
    (["--registry", "{registry}", "--redis-url", "{redis}", "--top", "0"], 2, "--top"),
    (["--registry", "{registry}", "--redis-url", "{redis}", "--ttl", "172800"], 2, "--ttl must be between"),
])
def test_cli_mistakes_give_a_message_and_an_exit_code(trained_registry, redis_url, tmp_path, args, code, message):
    values = {"empty": str(tmp_path), "redis": redis_url, "registry": str(trained_registry), "dead": free_port()}
    result = CliRunner().invoke(main, ["warm-cache", *(a.format(**values) for a in args)])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output and "wrongpass" not in result.output
