"""Security of the API: body size, length limits, rate limit, keys, and no internals in any response."""

from __future__ import annotations

import pytest

from recsvc.app import create_app
from tests.conftest import ADMIN_KEY
from tests.test_api_fallback import publish, tiny_bundle, tiny_settings


@pytest.fixture
def make_client(tmp_path):
    publish(tmp_path, tiny_bundle())
    apps = []

    def make(**changes):
        apps.append(create_app(tiny_settings(tmp_path, **changes)))
        return apps[-1].test_client()

    yield make
    for app in apps:
        app.extensions["recsvc"].store.stop()


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    return body["error"]


@pytest.mark.parametrize("path", ["/v1/customers/c0/recommendations", "/v1/recommendations/batch"])
def test_a_body_over_the_limit_is_413_in_the_error_shape(make_client, auth, path):
    client = make_client(max_body_bytes=1024)
    response = client.post(path, headers=auth, json={"context_items": ["i" * 100] * 20})
    assert error_of(response, 413)["code"] == "payload_too_large"


def test_a_body_over_the_limit_is_told_the_limit(make_client, auth):
    client = make_client(max_body_bytes=1024)
    response = client.post("/v1/events", headers={**auth, "Content-Type": "application/json"}, data=b" " * 2000)
    error = error_of(response, 413)
    assert error["details"] == {"max_bytes": 1024} and "1024 bytes" in error["message"]


def test_a_body_that_is_not_utf8_is_told_where(make_client, auth):
    response = make_client().post("/v1/feedback", headers={**auth, "Content-Type": "application/json"},
                                  data=b'{"request_id": "r\xe9sum\xe9"}')
    error = error_of(response, 400)
    assert error["message"] == "the body is not valid JSON: it is not valid UTF-8 (byte 0xe9 at 17)"


def test_a_body_under_the_limit_is_served(make_client, auth):
    client = make_client(max_body_bytes=1024)
    assert client.post("/v1/customers/c0/recommendations", headers=auth, json={"limit": 2}).status_code == 200


@pytest.mark.parametrize("path, body, message", [
    # A lone surrogate is valid to Python's json but no UTF-8 string: no cache key, Redis key or log line can hold it.
    ("/v1/customers/c0/recommendations", b'{"exclude": ["\\ud800"]}', "no low surrogate in string"),
    ("/v1/recommendations/batch", b'{"requests": [{"customer_id": "\\ud800"}]}', "no low surrogate in string"),
    ("/v1/events", b'{"events": [{"customer_id": "\\ud800", "item_id": "i1", "event_type": "view"}]}',
     "no low surrogate in string"),
    ("/v1/feedback", b'{"request_id": "abcdefgh", "customer_id": "c\\udfff", "item_id": "i1", "action": "accepted"}',
     "surrogate"),
    ("/v1/customers/c0/recommendations", b'{"limit": ' + b"9" * 5001 + b"}", "not valid JSON"),
    ("/v1/customers/c0/recommendations", b'{"limit": NaN}', "not valid JSON"),
    ("/v1/customers/c0/recommendations", b'{"exclude": ["\xff"]}', "not valid UTF-8"),
    ("/v1/customers/c0/recommendations", b'{"limit": 2', "not valid JSON"),
])
def test_json_no_service_can_store_is_a_400_that_says_why(make_client, auth, path, body, message):
    response = make_client().post(path, headers={**auth, "Content-Type": "application/json"}, data=body)
    error = error_of(response, 400)
    assert error["code"] == "invalid_request" and error["message"].startswith("the body is not valid JSON: ")
    assert message in error["message"]


def test_a_json_limit_must_be_a_whole_number(make_client, auth):
    client = make_client()
    error = error_of(client.post("/v1/customers/c0/recommendations", headers=auth, json={"limit": 2.5}), 400)
    assert error["details"]["fields"]["limit"] == ["Not a valid integer."]
    assert client.post("/v1/customers/c0/recommendations", headers=auth, json={"limit": 2}).status_code == 200


@pytest.mark.parametrize("query", [f"exclude={','.join(['i'] * 101)}", f"exclude={'x' * 129}",
                                   f"category={'x' * 129}", f"strategy={'x' * 65}"])
def test_ids_and_lists_in_the_query_are_length_limited(make_client, auth, query):
    error_of(make_client().get(f"/v1/customers/c0/recommendations?{query}", headers=auth), 400)


def test_rate_limit_is_per_key_429_with_retry_after(make_client, auth):
    client = make_client(rate_limit=0.5, rate_burst=2)
    assert [client.get("/v1/models", headers=auth).status_code for _ in range(2)] == [200, 200]
    response = client.get("/v1/models", headers=auth)
    error = error_of(response, 429)
    assert error["code"] == "rate_limited" and int(response.headers["Retry-After"]) >= 1
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes are never limited


def test_no_rate_limit_by_default(make_client, auth):
    client = make_client()
    assert {client.get("/v1/models", headers=auth).status_code for _ in range(60)} == {200}


def test_an_unexpected_failure_is_500_without_internals(make_client, auth, monkeypatch):
    client = make_client()
    service = client.application.extensions["recsvc"]

    def broken(*_args, **_kwargs):
        raise RuntimeError("secret detail at /srv/recsvc/registry")

    monkeypatch.setattr(service.recommender, "compute", broken)
    response = client.get("/v1/customers/c0/recommendations", headers=auth)
    error = error_of(response, 500)
    text = response.get_data(as_text=True)
    assert error["code"] == "internal_error" and "secret" not in text and "Traceback" not in text
    assert "/srv" not in text and response.headers["X-Request-ID"]


@pytest.mark.parametrize("method, path, status", [
    ("get", "/v1/customers/c0/recommendations", 401), ("post", "/v1/admin/reload", 401),
    ("get", "/v1/nowhere", 401), ("get", "/nowhere", 404), ("delete", "/v1/models", 401),
])
def test_every_refusal_without_a_key_is_json(make_client, method, path, status):
    error_of(getattr(make_client(), method)(path), status)


def test_with_a_key_unknown_paths_and_methods_are_404_and_405_json(make_client, auth):
    client = make_client()
    assert error_of(client.get("/v1/nowhere", headers=auth), 404)["code"] == "not_found"
    assert error_of(client.delete("/v1/models", headers=auth), 405)["code"] == "method_not_allowed"


def test_a_client_request_id_is_accepted_only_when_well_formed(make_client, auth):
    client = make_client()
    bad = client.get("/healthz", headers={"X-Request-ID": "<script>alert(1)</script>"})
    assert bad.headers["X-Request-ID"] != "<script>alert(1)</script>" and len(bad.headers["X-Request-ID"]) == 32
