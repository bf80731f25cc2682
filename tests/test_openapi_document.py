"""The OpenAPI document is valid OpenAPI 3 and describes what the server answers: statuses, bodies, parameters."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from recsvc.api.schemas import MAX_ID, NO_CONTROL_CHARACTERS
from tests.conftest import ADMIN_KEY
from tests.test_api_endpoints import api, error_of, registry, tiny_app  # noqa: F401  (fixtures)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def spec(api):  # noqa: F811
    return api.get("/openapi.json").get_json()


def operations(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method != "parameters":
                yield method, path, operation


def resolved(spec, node: dict) -> dict:
    while "$ref" in node:
        section, name = node["$ref"].split("/")[-2:]
        node = spec["components"][section][name]
    return node


def test_the_document_is_valid_openapi(spec):
    validate(spec)  # raises, naming the part, when it is not (e.g. a pattern that is not an ECMA-262 regex)


def test_every_documented_error_has_the_error_body(spec):
    """A client generated from the document must be able to read every error: {"error": {code, message, details}}
    under each 4xx, 5xx and default (readiness's 503 is the readiness body, as the server sends)."""
    bare = []
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if status != "default" and int(status) < 400 or (path, status) == ("/readyz", "503"):
                continue
            schema = resolved(spec, response).get("content", {}).get("application/json", {}).get("schema")
            if schema != {"$ref": "#/components/schemas/Error"}:
                bare.append(f"{method.upper()} {path} {status}")
    assert bare == []


def test_every_post_documents_the_body_checks_the_server_makes(api, spec):  # noqa: F811
    # A POST under /v1 is checked for its body whether or not the operation takes one: admin reload answers 415.
    error_of(api.post("/v1/admin/reload", headers={**ADMIN, "Content-Type": "text/plain"}, data="reload"), 415)
    for method, path, operation in operations(spec):
        if method == "post" and path.startswith("/v1/"):
            assert {"400", "413", "415"} <= set(operation["responses"]), path


@pytest.mark.parametrize("path, name", [("/v1/customers/{customer_id}/recommendations", "customer_id"),
                                        ("/v1/items/{item_id}/similar", "item_id")])
def test_path_ids_are_documented_with_their_length_bound(api, spec, path, name):  # noqa: F811
    (parameter,) = [p for p in spec["paths"][path]["parameters"] if p["name"] == name]
    assert parameter["in"] == "path" and parameter["required"] is True
    assert parameter["schema"] == {"type": "string", "minLength": 1, "maxLength": MAX_ID,
                                   "pattern": NO_CONTROL_CHARACTERS}
    too_long = path.replace("{" + name + "}", "x" * (MAX_ID + 1))
    error_of(api.get(too_long, headers={"Authorization": "Bearer " + ADMIN_KEY}), 400)


@pytest.mark.parametrize("path, name", [("/v1/customers/{customer_id}/recommendations", "customer_id"),
                                        ("/v1/items/{item_id}/similar", "item_id")])
def test_path_ids_are_documented_to_carry_a_slash_as_percent_2f(spec, path, name):
    (parameter,) = [p for p in spec["paths"][path]["parameters"] if p["name"] == name]
    assert "a '/' in it is sent as %2F" in parameter["description"]


def test_a_body_is_documented_as_required_where_the_server_needs_one(api, spec, auth):  # noqa: F811
    """POST recommendations takes no body (every field has a default); the other POSTs answer 400 without one."""
    for method, path, operation in operations(spec):
        if "requestBody" not in operation:
            continue
        url = path.replace("{customer_id}", "c0")
        status = api.post(url, headers=auth).status_code
        assert operation["requestBody"]["required"] is (status == 400), (path, status)


def test_an_event_timestamp_is_documented_as_text_or_a_number(api, spec, auth):  # noqa: F811
    timestamp = spec["components"]["schemas"]["Event"]["properties"]["timestamp"]
    assert timestamp["oneOf"] == [{"type": "string"}, {"type": "number"}]
    event = {"customer_id": "c0", "item_id": "i1", "event_type": "view"}
    for accepted in ("2026-11-30T10:00:00Z", 1764500000, 1764500000.5):
        assert api.post("/v1/events", headers=auth, json=[{**event, "timestamp": accepted}]).status_code == 202
    for refused in ({}, [], True):
        error_of(api.post("/v1/events", headers=auth, json=[{**event, "timestamp": refused}]), 400)


def test_an_experiment_name_is_documented_as_the_definitions_file_allows_it(spec):
    (parameter,) = spec["paths"]["/v1/experiments/{name}/report"]["parameters"]
    assert parameter["schema"]["pattern"] == "^[A-Za-z0-9._-]{1,64}$"
