"""POST recommendations, batch, similar items, models, admin reload, metrics, docs: success and error cases."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.app import create_app
from tests.conftest import ADMIN_KEY
from tests.test_api_fallback import ids, publish, tiny_bundle, tiny_settings

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def registry(tmp_path):
    publish(tmp_path, tiny_bundle("v1"))
    return tmp_path


@pytest.fixture
def tiny_app(registry):
    app = create_app(tiny_settings(registry))
    yield app
    app.extensions["recsvc"].store.stop()


@pytest.fixture
def api(tiny_app):
    return tiny_app.test_client()


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]


# --- POST /v1/customers/{id}/recommendations ------------------------------------------------------

def test_post_recommendations_has_the_get_shape_and_honours_every_field(api, auth):
    body = api.post("/v1/customers/c0/recommendations", headers=auth,
                    json={"limit": 3, "strategy": "als", "exclude": ["i2"], "category": "Phones",
                          "context_items": [], "include_owned": True}).get_json()
    assert set(body) == {"customer_id", "request_id", "model_version", "strategy", "source", "experiment", "items"}
    assert body["model_version"] == "v1" and body["strategy"] == "als"
    assert ids(body) == ["i0", "i1"]  # Phones only, i2 excluded, i6 inactive, owned i0 asked for


@pytest.mark.parametrize("payload, field", [
    ({"limit": 0}, "limit"), ({"limit": "ten"}, "limit"), ({"exclude": "i1"}, "exclude"),
    ({"context_items": ["x" * 129]}, "context_items"), ({"context_items": ["i"] * 101}, "context_items"),
    ({"colour": "red"}, "colour"), ({"include_owned": "maybe"}, "include_owned"),
])
def test_post_recommendations_rejects_bad_bodies(api, auth, payload, field):
    error = error_of(api.post("/v1/customers/c0/recommendations", json=payload, headers=auth), 400)
    assert error["code"] == "invalid_request" and field in error["details"]["fields"]


def test_post_recommendations_needs_a_json_body(api, auth):
    response = api.post("/v1/customers/c0/recommendations", data="limit=3", headers=auth,
                        content_type="text/plain")
    assert error_of(response, 415)["code"] == "unsupported_media_type"
    error_of(api.post("/v1/customers/c0/recommendations", data="{not json", headers=auth,
                      content_type="application/json"), 400)


# --- POST /v1/recommendations/batch ---------------------------------------------------------------

def test_batch_answers_each_customer_in_order_with_one_request_id(api, auth):
    response = api.post("/v1/recommendations/batch", headers={**auth, "X-Request-ID": "batch-0001"},
                        json={"requests": [{"customer_id": "c0", "limit": 2},
                                           {"customer_id": "walk-in", "limit": 1, "context_items": ["i3"]},
                                           {"customer_id": "c1", "limit": 1}]})
    assert response.status_code == 200
    body = response.get_json()
    assert body["request_id"] == "batch-0001"
    results = body["results"]
    assert [r["customer_id"] for r in results] == ["c0", "walk-in", "c1"]
    assert [r["source"] for r in results] == ["personal", "context", "popular"]
    assert ids(results[0]) == ["i1", "i2"] and ids(results[1]) == ["i4"]
    assert all(r["request_id"] == "batch-0001" for r in results)


@pytest.mark.parametrize("payload", [
    {}, {"requests": []}, {"requests": [{"limit": 2}]}, {"requests": [{"customer_id": "c"}] * 51},
    {"requests": [{"customer_id": "c" * 129}]},
])
def test_batch_rejects_bad_bodies_and_caps_the_count(api, auth, payload):
    assert error_of(api.post("/v1/recommendations/batch", json=payload, headers=auth), 400)["code"] == \
        "invalid_request"


def test_batch_with_an_unknown_strategy_is_400(api, auth):
    response = api.post("/v1/recommendations/batch", headers=auth,
                        json={"requests": [{"customer_id": "c0", "strategy": "magic"}]})
    assert error_of(response, 400)["details"]["available"] == ["als", "knn", "popular"]


# --- GET /v1/items/{id}/similar -------------------------------------------------------------------

def test_similar_items_honours_limit_and_category(api, auth):
    assert ids(api.get("/v1/items/i3/similar?limit=1", headers=auth).get_json()) == ["i4"]
    # i2 and i1 are like i3; i0 is not, and tops the list up as a popular item
    assert ids(api.get("/v1/items/i3/similar?category=Phones", headers=auth).get_json()) == ["i2", "i1", "i0"]
    popular = api.get("/v1/items/i3/similar?strategy=popular&limit=2", headers=auth).get_json()
    assert ids(popular) == ["i5", "i4"] and popular["items"][0]["reasons"] == ["Popular with customers"]


def test_similar_items_of_an_unknown_item_is_404(api, auth):
    error = error_of(api.get("/v1/items/nope/similar", headers=auth), 404)
    assert error["code"] == "not_found" and error["details"] == {"item_id": "nope"}


@pytest.mark.parametrize("path", ["/v1/items/i0/similar?limit=0", "/v1/items/i0/similar?strategy=magic",
                                  f"/v1/items/{'i' * 129}/similar"])
def test_similar_items_rejects_bad_input(api, auth, path):
    error_of(api.get(path, headers=auth), 400)


def test_similar_items_needs_a_key(api):
    error_of(api.get("/v1/items/i0/similar"), 401)


# --- GET /v1/models and POST /v1/admin/reload ------------------------------------------------------

def test_models_shows_the_served_version_with_its_metrics(api, auth):
    body = api.get("/v1/models", headers=auth).get_json()
    assert body["model_version"] == "v1" and body["default_strategy"] == "als"
    assert body["strategies"]["als"]["metrics"] == {"ndcg@10": 0.3}
    assert body["created_at"] == "2026-11-01T00:00:00+00:00" and body["loaded_at"]


def test_models_without_a_model_is_503(tmp_path, auth):
    app = create_app(tiny_settings(tmp_path))
    assert error_of(app.test_client().get("/v1/models", headers=auth), 503)["code"] == "model_unavailable"
    app.extensions["recsvc"].store.stop()


def test_admin_reload_swaps_in_the_new_current_version(api, auth, registry):
    publish(registry, tiny_bundle("v2"))
    body = api.post("/v1/admin/reload", headers=ADMIN).get_json()
    assert body == {"changed": True, "model_version": "v2", "previous_version": "v1", "last_load_failure": None,
                    "experiments": None}  # no RECSVC_EXPERIMENTS
    assert api.get("/v1/models", headers=auth).get_json()["model_version"] == "v2"
    assert api.post("/v1/admin/reload", headers=ADMIN).get_json()["changed"] is False


def _remove_items(version_dir):
    (version_dir / "items.npy").unlink()


def _shrink_catalog(version_dir):
    # Loads fine, but fails validation: the catalog no longer matches the item count.
    np.save(version_dir / "catalog.active.npy", np.ones(3, dtype=bool), allow_pickle=False)


@pytest.mark.parametrize("damage, words", [(_remove_items, "items.npy"), (_shrink_catalog, "catalog")])
def test_a_broken_version_is_refused_and_shown_while_the_old_one_serves(api, auth, registry, damage, words):
    publish(registry, tiny_bundle("v2"))
    damage(registry / "versions" / "v2")
    body = api.post("/v1/admin/reload", headers=ADMIN).get_json()
    assert body["changed"] is False and body["model_version"] == "v1"
    failure = body["last_load_failure"]
    assert failure["version"] == "v2" and words in failure["reason"] and str(registry) not in failure["reason"]
    ready = api.get("/readyz").get_json()
    assert ready["model_version"] == "v1" and ready["last_load_failure"]["version"] == "v2"
    assert api.get("/v1/customers/c0/recommendations", headers=auth).get_json()["model_version"] == "v1"
    metrics = api.get("/metrics").get_data(as_text=True)
    assert _sample(metrics, "recsvc_model_load_failures_total") >= 1


def test_admin_reload_needs_an_admin_key(api, auth):
    assert error_of(api.post("/v1/admin/reload", headers=auth), 403)["code"] == "forbidden"
    assert error_of(api.post("/v1/admin/reload"), 401)["code"] == "unauthorized"


def test_admin_reload_only_takes_post(api):
    error_of(api.get("/v1/admin/reload", headers=ADMIN), 405)


# --- /metrics, /docs, /openapi.json ---------------------------------------------------------------

def _sample(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_statuses_cache_and_sources(api, auth):
    endpoint = "/v1/customers/<customer_id>/recommendations"
    before = api.get("/metrics").get_data(as_text=True)
    for _ in range(3):
        api.get("/v1/customers/walk-in/recommendations?limit=2", headers=auth)
    api.get("/v1/customers/c0/recommendations?limit=0", headers=auth)
    after = api.get("/metrics").get_data(as_text=True)

    def delta(name, **labels):
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("recsvc_responses_total", endpoint=endpoint, status="200") == 3
    assert delta("recsvc_responses_total", endpoint=endpoint, status="400") == 1
    assert delta("recsvc_request_seconds_count", endpoint=endpoint, method="GET") == 4
    assert delta("recsvc_cache_lookups_total", result="miss") == 1
    assert delta("recsvc_cache_lookups_total", result="hit") == 2
    assert delta("recsvc_recommendation_source_total", source="popular") == 1
    assert _sample(after, "recsvc_model_info", version="v1") == 1
    assert _sample(after, "recsvc_model_age_seconds") > 0


def test_docs_page_is_served_without_a_key_and_reads_the_openapi_document(api):
    response = api.get("/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert 'fetch("openapi.json")' in response.get_data(as_text=True)


def test_openapi_document_covers_every_endpoint_with_the_validating_schemas(api):
    spec = api.get("/openapi.json").get_json()
    assert {"/v1/customers/{customer_id}/recommendations", "/v1/recommendations/batch", "/v1/items/{item_id}/similar",
            "/v1/models", "/v1/admin/reload", "/healthz", "/readyz"} <= set(spec["paths"])
    post = spec["paths"]["/v1/customers/{customer_id}/recommendations"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "context_items" in spec["components"]["schemas"][body]["properties"]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearer": []}] and spec["paths"]["/healthz"]["get"]["security"] == []
