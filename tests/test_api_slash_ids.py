"""Ids with '/' (ACME/42, SKU/7), which the trainer accepts, can be asked for in the path, sent as %2F: through Flask,
through the fast path of cached GETs, and through a real gunicorn, which decodes %2F before routing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import requests
from werkzeug.test import Client

from recsvc.app import create_app
from recsvc.config import Settings
from tests.conftest import API_KEY
from tests.server_process import running_server
from training.config import TrainConfig
from training.pipeline import fit_and_publish

CUSTOMER = "ACME/42"  # stands for the demo data's C000003
ITEM = "SKU/7"  # stands for the demo data's most popular item
AUTH = {"Authorization": f"Bearer {API_KEY}", "X-Request-ID": "req-slash-ids-0001"}


def _rename(source: Path, target: Path, renames: dict[str, dict[str, str]]) -> None:
    """Copy a CSV file, renaming values of the columns in `renames` ({column: {old: new}})."""
    with open(source, newline="") as given, open(target, "w", newline="") as out:
        reader = csv.DictReader(given)
        writer = csv.DictWriter(out, fieldnames=reader.fieldnames)
        writer.writeheader()
        for row in reader:
            for column, names in renames.items():
                row[column] = names.get(row[column], row[column])
            writer.writerow(row)


def _most_popular_item(trained_registry) -> str:
    """The first item an unknown customer is offered by the model trained on the demo data as it is."""
    app = create_app(Settings(registry=trained_registry, api_keys=frozenset({API_KEY})))
    try:
        body = app.test_client().get("/v1/customers/no-one/recommendations", headers=AUTH).get_json()
    finally:
        app.extensions["recsvc"].store.stop()
    assert body["source"] == "popular"
    return body["items"][0]["item_id"]


@pytest.fixture(scope="module")
def slash_registry(tmp_path_factory, demo_paths, trained_registry) -> Path:
    """The demo data with C000003 renamed ACME/42 and the most popular item SKU/7, trained and published."""
    data = tmp_path_factory.mktemp("slash-data")
    item = {_most_popular_item(trained_registry): ITEM}
    _rename(demo_paths["interactions"], data / "interactions.csv",
            {"customer_id": {"C000003": CUSTOMER}, "item_id": item})
    _rename(demo_paths["catalog"], data / "catalog.csv", {"item_id": item})
    registry = tmp_path_factory.mktemp("slash-registry")
    config = TrainConfig(strategies=["als", "popular"], params={"als": {"factors": 16, "iterations": 10}})
    fit_and_publish(data / "interactions.csv", registry, config, catalog_path=data / "catalog.csv",
                    log=lambda _line: None, force=True)
    return registry


@pytest.fixture
def slash_app(slash_registry):
    app = create_app(Settings(registry=slash_registry, api_keys=frozenset({API_KEY})))
    app.config.update(TESTING=True)
    yield app
    app.extensions["recsvc"].store.stop()


def item_ids(body: dict) -> list[str]:
    return [entry["item_id"] for entry in body["items"]]


def test_a_customer_id_with_a_slash_gets_personal_suggestions(slash_app):
    response = slash_app.test_client().get("/v1/customers/ACME%2F42/recommendations", headers=AUTH)
    assert response.status_code == 200
    body = response.get_json()
    assert body["customer_id"] == CUSTOMER and body["source"] == "personal" and len(body["items"]) == 10


def test_the_cached_answer_of_the_fast_path_is_flasks_answer(slash_app):
    url = "/v1/customers/ACME%2F42/recommendations?limit=5"
    middleware = slash_app.wsgi_app
    first = slash_app.test_client().get(url, headers=AUTH)  # computes and caches the list
    flask = Client(middleware.flask_app).get(url, headers=AUTH)  # Flask alone, from the cache
    answered = middleware.answered
    fast = slash_app.test_client().get(url, headers=AUTH)
    assert middleware.answered == answered + 1  # the fast path took it
    assert first.status_code == flask.status_code == fast.status_code == 200
    assert first.get_data() == flask.get_data() == fast.get_data()
    assert fast.get_json()["customer_id"] == CUSTOMER


def test_an_unknown_customer_id_with_a_slash_gets_popular_items_with_slashes_in_their_ids(slash_app):
    client = slash_app.test_client()
    first = client.get("/v1/customers/NEW%2F1/recommendations", headers=AUTH)
    assert first.status_code == 200
    body = first.get_json()
    assert body["customer_id"] == "NEW/1" and body["source"] == "popular"
    assert ITEM in item_ids(body)  # one of the most popular items (the holdout differs a little), its '/' intact
    assert client.get("/v1/customers/NEW%2F1/recommendations", headers=AUTH).get_data() == first.get_data()


def test_similar_items_of_an_item_id_with_a_slash(slash_app):
    response = slash_app.test_client().get("/v1/items/SKU%2F7/similar?limit=5", headers=AUTH)
    assert response.status_code == 200
    body = response.get_json()
    assert body["item_id"] == ITEM and len(body["items"]) == 5 and ITEM not in item_ids(body)


@pytest.mark.parametrize("path, customer", [("/v1/customers/ACME/42/recommendations", CUSTOMER),
                                            ("/v1/customers/%2FX/recommendations", "/X"),
                                            ("/v1/customers/X%2F/recommendations", "X/"),
                                            ("/v1/customers/A%2F%2FB/recommendations", "A//B"),
                                            ("/v1/customers/%20ACME%2F42%20/recommendations", CUSTOMER)])
def test_whatever_lies_between_the_fixed_parts_is_the_id(slash_app, path, customer):
    """A literal '/' reads as %2F does (the server decoded %2F before anyone sees the path); one at either end
    or doubled is part of the id too; surrounding spaces are not."""
    client = slash_app.test_client()
    for _ in range(2):  # computed, then cached (the fast path takes the ids without spaces)
        response = client.get(path, headers=AUTH)
        assert response.status_code == 200 and response.get_json()["customer_id"] == customer


def test_an_over_long_id_with_a_slash_is_400_naming_it(slash_app):
    response = slash_app.test_client().get("/v1/customers/" + "a%2F" * 64 + "a/recommendations", headers=AUTH)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"] == {"fields": {"customer_id": ["Length must be between 1 and 128."]}}


def test_through_gunicorn_percent_2f_ids_are_answered(slash_registry, tmp_path):
    """gunicorn decodes %2F into PATH_INFO before the app routes: the point of the <id:...> converter."""
    env = {"RECSVC_REGISTRY": str(slash_registry), "RECSVC_API_KEYS": API_KEY}
    with running_server(env, tmp_path / "server.log", workers=1) as base, requests.Session() as session:
        answers = [session.get(f"{base}/v1/customers/ACME%2F42/recommendations", headers=AUTH, timeout=10)
                   for _ in range(2)]  # computed, then from the cache through the fast path
        assert [answer.status_code for answer in answers] == [200, 200]
        assert answers[0].content == answers[1].content
        assert answers[0].json()["customer_id"] == CUSTOMER and answers[0].json()["source"] == "personal"
        unknown = session.get(f"{base}/v1/customers/NEW%2F1/recommendations", headers=AUTH, timeout=10)
        assert unknown.status_code == 200 and unknown.json()["source"] == "popular"
        assert ITEM in item_ids(unknown.json())
        similar = session.get(f"{base}/v1/items/SKU%2F7/similar", headers=AUTH, timeout=10)
        assert similar.status_code == 200 and similar.json()["item_id"] == ITEM
