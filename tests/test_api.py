"""The recommendations API through the Flask test client: shape, fallbacks, filters, errors, auth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recsvc.app import create_app
from recsvc.artifacts import load_current

RESPONSE_FIELDS = {"customer_id", "request_id", "model_version", "strategy", "source", "experiment", "items"}


@pytest.fixture(scope="module")
def bundle(trained_registry):
    return load_current(trained_registry)


def busiest_customer(bundle) -> str:
    counts = np.diff(bundle.owned.indptr)
    return bundle.customers.external(int(np.argmax(counts)))


def test_known_customer_gets_personal_suggestions_without_owned_items(client, auth, bundle):
    customer = busiest_customer(bundle)
    response = client.get(f"/v1/customers/{customer}/recommendations?limit=7", headers=auth)
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == RESPONSE_FIELDS
    assert body["customer_id"] == customer and body["source"] == "personal"
    assert body["model_version"] == bundle.version and body["strategy"] == bundle.default_strategy
    assert body["experiment"] is None
    assert len(body["items"]) == 7
    owned = {bundle.items.external(int(i)) for i in bundle.owned_items(bundle.customers.position(customer))}
    suggested = [item["item_id"] for item in body["items"]]
    assert owned and not owned & set(suggested)
    assert len(set(suggested)) == 7
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    for item in body["items"]:
        assert item["title"] and item["reasons"] and all(isinstance(r, str) and r for r in item["reasons"])
    assert any(r.startswith("Because the customer has ") for item in body["items"] for r in item["reasons"])


def test_owned_items_return_when_asked_for(client, auth, bundle):
    customer = busiest_customer(bundle)
    response = client.get(f"/v1/customers/{customer}/recommendations?limit=100&include_owned=true", headers=auth)
    owned = {bundle.items.external(int(i)) for i in bundle.owned_items(bundle.customers.position(customer))}
    assert owned & {item["item_id"] for item in response.get_json()["items"]}


def test_unknown_customer_gets_popular_items(client, auth, bundle):
    response = client.get("/v1/customers/never-seen-before/recommendations?limit=5", headers=auth)
    assert response.status_code == 200
    body = response.get_json()
    assert body["source"] == "popular" and len(body["items"]) == 5
    popularity = np.asarray(bundle.scorers["popular"].popularity)
    active = np.asarray(bundle.catalog.active)
    assert [item["score"] for item in body["items"]] == sorted(popularity[active].tolist(), reverse=True)[:5]
    for item in body["items"]:
        position = bundle.items.position(item["item_id"])
        assert active[position] and popularity[position] == item["score"]
    assert all(item["reasons"] == ["Popular with customers"] for item in body["items"])


def test_inactive_items_are_never_suggested(client, auth, bundle):
    inactive = {bundle.items.external(int(i)) for i in np.flatnonzero(~np.asarray(bundle.catalog.active))}
    assert inactive, "the demo catalog has inactive items"
    for customer in ("never-seen-before", busiest_customer(bundle)):
        body = client.get(f"/v1/customers/{customer}/recommendations?limit=100", headers=auth).get_json()
        assert not inactive & {item["item_id"] for item in body["items"]}


def test_exclude_and_category_filters(client, auth, bundle):
    first = client.get("/v1/customers/x-new/recommendations?limit=3", headers=auth).get_json()["items"]
    excluded = ",".join(item["item_id"] for item in first[:2])
    again = client.get(f"/v1/customers/x-new/recommendations?limit=3&exclude={excluded}", headers=auth).get_json()
    assert not {i["item_id"] for i in first[:2]} & {i["item_id"] for i in again["items"]}
    body = client.get("/v1/customers/x-new/recommendations?limit=5&category=Broadband", headers=auth).get_json()
    assert body["items"] and all(item["category"] == "Broadband" for item in body["items"])


def test_an_unknown_category_is_a_400_that_lists_the_known_ones(client, auth, bundle):
    for path in ("/v1/customers/x-new/recommendations?category=Broadbnd",
                 f"/v1/items/{bundle.items.external(0)}/similar?category=Broadbnd"):
        response = client.get(path, headers=auth)
        assert response.status_code == 400, path
        error = response.get_json()["error"]
        assert error["code"] == "invalid_input" and error["message"] == "unknown category 'Broadbnd'"
        assert "Broadband" in error["details"]["available"] and "" not in error["details"]["available"]
        assert error["details"]["categories"] == len(error["details"]["available"])
    posted = client.post("/v1/customers/x-new/recommendations", headers=auth, json={"category": "Broadbnd"})
    assert posted.status_code == 400 and posted.get_json()["error"]["message"] == "unknown category 'Broadbnd'"


def test_a_strategy_can_be_chosen(client, auth, bundle):
    customer = busiest_customer(bundle)
    body = client.get(f"/v1/customers/{customer}/recommendations?strategy=popular", headers=auth).get_json()
    assert body["strategy"] == "popular" and body["source"] == "popular"


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), ("limit=1000", "limit"), ("limit=ten", "limit"), ("include_owned=maybe", "include_owned"),
])
def test_invalid_parameters_are_400_in_the_error_shape(client, auth, query, field):
    response = client.get(f"/v1/customers/c1/recommendations?{query}", headers=auth)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == "invalid_request" and field in error["details"]["fields"]


def test_unknown_strategy_is_400_naming_the_available_ones(client, auth, bundle):
    response = client.get("/v1/customers/c1/recommendations?strategy=magic", headers=auth)
    assert response.status_code == 400
    assert response.get_json()["error"]["details"]["available"] == sorted(bundle.scorers)


@pytest.mark.parametrize("path, name", [(f"/v1/customers/{'c' * 129}/recommendations", "customer_id"),
                                        ("/v1/customers/%20/recommendations", "customer_id"),
                                        (f"/v1/items/{'i' * 129}/similar", "item_id")])
def test_a_malformed_id_in_the_path_is_400_naming_it_like_a_body_field(client, auth, path, name):
    """A malformed parameter is invalid_request with details.fields, wherever it is sent (README: invalid_input is
    for a well-formed value recsvc cannot use)."""
    error = client.get(path, headers=auth).get_json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"] == {"fields": {name: ["Length must be between 1 and 128."]}}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": "Basic abc"}])
def test_requests_without_a_valid_key_are_401(client, headers):
    response = client.get("/v1/customers/c1/recommendations", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_secure_by_default_without_configured_keys(settings):
    app = create_app(dataclasses.replace(settings, api_keys=frozenset(), admin_keys=frozenset()))
    response = app.test_client().get("/v1/customers/c1/recommendations", headers={"Authorization": "Bearer anything1"})
    assert response.status_code == 401
    assert "RECSVC_API_KEYS" in response.get_json()["error"]["message"]
    app.extensions["recsvc"].store.stop()


def test_auth_can_be_switched_off_explicitly(settings):
    app = create_app(dataclasses.replace(settings, api_keys=frozenset(), auth_disabled=True))
    assert app.test_client().get("/v1/customers/c1/recommendations").status_code == 200
    app.extensions["recsvc"].store.stop()


def test_health_and_readiness(client, bundle):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["model_version"] == bundle.version


def test_not_ready_until_a_model_is_published(settings, tmp_path, auth):
    app = create_app(dataclasses.replace(settings, registry=tmp_path))
    client = app.test_client()
    assert client.get("/readyz").status_code == 503
    response = client.get("/v1/customers/c1/recommendations", headers=auth)
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "model_unavailable"
    app.extensions["recsvc"].store.stop()


def test_unknown_route_is_404_in_the_error_shape(client):
    response = client.get("/nowhere")
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "not_found"


def test_request_id_is_echoed(client, auth):
    response = client.get("/v1/customers/c1/recommendations", headers={**auth, "X-Request-ID": "agent-desk-42"})
    assert response.headers["X-Request-ID"] == "agent-desk-42"
    assert response.get_json()["request_id"] == "agent-desk-42"
    other = client.get("/v1/customers/c1/recommendations", headers=auth)
    assert other.get_json()["request_id"] == other.headers["X-Request-ID"] != "agent-desk-42"


def test_openapi_document_is_served_without_a_key(client):
    spec = client.get("/openapi.json").get_json()
    assert "/v1/customers/{customer_id}/recommendations" in spec["paths"]


def test_explicit_popular_is_all_time_popularity_while_the_fallback_is_trending(tmp_path, auth):
    from recsvc.scoring import PopularityScorer
    from tests.test_api_fallback import publish, tiny_bundle, tiny_settings

    bundle = tiny_bundle()
    # Trending ranks the active items in the opposite order of all-time popularity.
    bundle.scorers["trending"] = PopularityScorer(np.array([60, 50, 40, 30, 20, 10, 1], dtype=np.float32),
                                                  window_days=7)
    bundle.manifest["strategies"]["trending"] = {}
    publish(tmp_path, bundle)
    app = create_app(tiny_settings(tmp_path))
    client = app.test_client()
    popular = client.get("/v1/customers/stranger/recommendations?limit=3&strategy=popular", headers=auth).get_json()
    assert [item["item_id"] for item in popular["items"]] == ["i5", "i4", "i3"]
    assert popular["items"][0]["reasons"] == ["Popular with customers"]
    fallback = client.get("/v1/customers/stranger/recommendations?limit=3", headers=auth).get_json()
    assert fallback["source"] == "popular"
    assert [item["item_id"] for item in fallback["items"]] == ["i0", "i1", "i2"]
    assert fallback["items"][0]["reasons"] == ["Popular this week"]
    app.extensions["recsvc"].store.stop()
