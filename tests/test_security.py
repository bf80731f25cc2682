"""Walk the app's URL map: every /v1 route needs a key, every admin route an admin key, and no
response of any route leaks internals."""

from __future__ import annotations

import logging
import re

import pytest

from tests.conftest import ADMIN_KEY, API_KEY

PLACEHOLDER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json"}


def routes(app):
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, PLACEHOLDER.sub(lambda m: f"sample-{m.group(1)}", rule.rule), rule.rule


def call(client, method, url, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.open(url, method=method, headers=headers, json={} if method in ("POST", "PUT", "PATCH") else None)


def test_every_v1_route_needs_a_key(app, client):
    checked = 0
    for method, url, rule in routes(app):
        if not rule.startswith("/v1/"):
            continue
        for key in (None, "not-a-real-key-123"):
            response = call(client, method, url, key)
            assert response.status_code == 401, f"{method} {rule} answered {response.status_code} with key {key}"
            assert response.get_json()["error"]["code"] == "unauthorized"
        checked += 1
    assert checked >= 1


def test_every_admin_route_needs_an_admin_key(app, client):
    for method, url, rule in routes(app):
        if not rule.startswith("/v1/admin/"):
            continue
        assert call(client, method, url, API_KEY).status_code == 403, f"{method} {rule} with an agent key"
        assert call(client, method, url, ADMIN_KEY).status_code not in (401, 403), f"{method} {rule} with admin key"


def test_routes_outside_v1_are_only_the_public_ones(app):
    outside = {rule for _, _, rule in routes(app) if not rule.startswith("/v1/")}
    assert outside - {"/static/<path:filename>"} <= PUBLIC | {r for r in outside if r.startswith("/docs")}


def test_no_response_shows_a_stack_trace_or_a_path(app, client):
    for method, url, rule in routes(app):
        for key in (None, API_KEY, ADMIN_KEY):
            body = call(client, method, url, key).get_data(as_text=True)
            assert "Traceback" not in body and "/work/" not in body and ".py" not in body, f"{method} {rule}"


def test_keys_never_appear_in_logs(app, client, caplog):
    caplog.set_level(logging.DEBUG)
    for method, url, _rule in routes(app):
        for key in (API_KEY, ADMIN_KEY, "wrong-key-seen-in-logs"):
            call(client, method, url, key)
    assert caplog.records, "requests were logged"
    text = "\n".join(record.getMessage() for record in caplog.records)
    for key in (API_KEY, ADMIN_KEY, "wrong-key-seen-in-logs"):
        assert key not in text


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "bearer " + API_KEY + "x", "Token " + API_KEY])
def test_malformed_authorization_is_401(client, header):
    response = client.get("/v1/customers/c1/recommendations", headers={"Authorization": header})
    assert response.status_code == 401


def auth_headers(key=API_KEY):
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("method, url, body, status", [
    ("GET", "/v1/customers/" + "c" * 129 + "/recommendations", None, 400),
    ("GET", "/v1/customers/c1/recommendations?limit=101", None, 400),
    ("GET", "/v1/customers/c1/recommendations?limit=0", None, 400),
    ("GET", "/v1/items/" + "i" * 129 + "/similar", None, 400),
    ("POST", "/v1/recommendations/batch", {"requests": [{"customer_id": "c1"}] * 51}, 400),
    ("POST", "/v1/customers/c1/recommendations", {"context_items": ["i1"] * 101}, 400),
    ("POST", "/v1/events", [{"customer_id": "c1", "item_id": "i1", "event_type": "view"}] * 501, 400),
    ("POST", "/v1/feedback", {"request_id": "r" * 65, "customer_id": "c1", "item_id": "i1", "action": "shown"}, 400),
    ("POST", "/v1/feedback", {"request_id": "r1", "customer_id": "c1", "item_id": "i1", "action": "x" * 70000},
     413),
    ("POST", "/v1/events", [{"customer_id": "c" * 128, "item_id": "i" * 128, "event_type": "view"}] * 400, 413),
])
def test_sizes_and_parameters_over_their_limits_are_refused(client, method, url, body, status):
    response = client.open(url, method=method, headers=auth_headers(), json=body)
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert set(response.get_json()["error"]) == {"code", "message", "details"}


@pytest.mark.parametrize("url", ["/v1/feedback", "/v1/events", "/v1/recommendations/batch",
                                 "/v1/customers/c1/recommendations"])
def test_every_body_that_is_not_json_is_415(client, url):
    response = client.post(url, data="customer_id=c1", headers={**auth_headers(), "Content-Type": "text/plain"})
    assert response.status_code == 415 and response.get_json()["error"]["code"] == "unsupported_media_type"
