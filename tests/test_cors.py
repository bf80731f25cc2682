"""Browser-based agent desktops on another origin (RECSVC_CORS_ORIGINS): preflights without a key, CORS headers on
every answer to an allowed origin (errors and the fast path included), none for any other origin or by default."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import requests

from recsvc.api.cors import ALLOWED_HEADERS, EXPOSED_HEADERS, MAX_AGE_SECONDS
from recsvc.app import create_app
from recsvc.config import Settings
from recsvc.errors import ConfigError
from tests.conftest import ADMIN_KEY, API_KEY
from tests.server_process import running_server
from tests.test_fast_path import FrozenClock, Paths

DESKTOP = "https://agents.example.com"
OTHER_DESK = "http://localhost:3000"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
RECOMMENDATIONS = "/v1/customers/C000003/recommendations"
CORS_HEADERS = {"access-control-allow-origin", "access-control-expose-headers", "access-control-allow-methods",
                "access-control-allow-headers", "access-control-max-age", "access-control-allow-credentials"}


def preflight(method: str = "GET", origin: str = DESKTOP) -> dict[str, str]:
    """The headers a browser sends on a preflight: no Authorization, ever."""
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type,x-request-id"}


def cors_headers(response) -> dict[str, str]:
    return {name.lower(): value for name, value in response.headers.items() if name.lower() in CORS_HEADERS}


def assert_allowed(response, origin: str = DESKTOP) -> None:
    """The headers of an actual answer a browser on `origin` may read."""
    assert cors_headers(response) == {"access-control-allow-origin": origin,
                                      "access-control-expose-headers": EXPOSED_HEADERS}
    assert "Origin" in response.headers["Vary"]


def make_app(settings, **changes):
    app = create_app(dataclasses.replace(settings, **changes))
    app.config.update(TESTING=True)
    return app


@pytest.fixture
def cors_app(settings):
    app = make_app(settings, cors_origins=frozenset({DESKTOP, OTHER_DESK}))
    yield app
    app.extensions["recsvc"].store.stop()


@pytest.fixture
def cors_client(cors_app):
    return cors_app.test_client()


# --- the setting --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, origins", [
    ("", set()),
    (" https://agents.example.com , http://localhost:3000 ", {DESKTOP, OTHER_DESK}),
    # As browsers write Origin: lower case, no default port (otherwise it would never match).
    ("HTTPS://Agents.Example.COM:443,http://localhost:80", {DESKTOP, "http://localhost"}),
    ("https://agents.example.com:8443,http://[::1]:3000", {"https://agents.example.com:8443", "http://[::1]:3000"}),
    ("*", {"*"}),
])
def test_origins_are_read_as_browsers_send_them(value, origins):
    assert Settings.from_env({"RECSVC_CORS_ORIGINS": value}).cors_origins == origins


@pytest.mark.parametrize("value, message", [
    ("agents.example.com", "it must start with https:// or http://"),
    ("https://agents.example.com/", "no path (not even a trailing '/')"),
    ("https://agents.example.com/sidebar", "no path"),
    ("https://agents.example.com?x=1", "query"),
    ("ftp://agents.example.com", "it must start with https:// or http://"),
    ("null", "it must start with https:// or http://"),
    ("https://user@agents.example.com", "no user name or password"),
    ("https://agents.example.com:99999", "a number from 1 to 65535"),
    ("https://agents example.com", "the host must be a name in ASCII"),
    ("https://bücher.example", "punycode"),
    ("*,https://agents.example.com", "'*' allows every origin and stands alone"),
])
def test_a_malformed_origin_is_a_config_error_naming_the_variable(value, message):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"RECSVC_CORS_ORIGINS": value})
    assert raised.value.message.startswith("RECSVC_CORS_ORIGINS") and message in raised.value.message


# --- by default: no CORS at all -----------------------------------------------------------------------


def test_without_the_setting_no_answer_carries_cors_headers_and_a_preflight_needs_a_key(client):
    assert client.options(RECOMMENDATIONS, headers=preflight()).status_code == 401
    for response in (client.options(RECOMMENDATIONS, headers=preflight()),
                     client.options("/healthz", headers=preflight()),
                     client.get(RECOMMENDATIONS, headers={**AUTH, "Origin": DESKTOP}),
                     client.get(RECOMMENDATIONS, headers={"Origin": DESKTOP})):
        assert cors_headers(response) == {} and "Vary" not in response.headers


# --- preflights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, method, methods", [
    (RECOMMENDATIONS, "GET", {"GET", "POST", "HEAD", "OPTIONS"}),
    (RECOMMENDATIONS, "POST", {"GET", "POST", "HEAD", "OPTIONS"}),
    ("/v1/recommendations/batch", "POST", {"POST", "OPTIONS"}),
    ("/v1/feedback", "POST", {"POST", "OPTIONS"}),
    ("/v1/admin/reload", "POST", {"POST", "OPTIONS"}),
    ("/healthz", "GET", {"GET", "HEAD", "OPTIONS"}),
    ("/openapi.json", "GET", {"GET", "HEAD", "OPTIONS"}),
])
def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(cors_client, path, method, methods):
    response = cors_client.options(path, headers=preflight(method, OTHER_DESK))
    assert response.status_code == 204 and response.get_data() == b""
    headers = cors_headers(response)
    assert headers.pop("access-control-allow-origin") == OTHER_DESK and "Origin" in response.headers["Vary"]
    assert set(headers.pop("access-control-allow-methods").split(", ")) == methods
    assert {"Authorization", "Content-Type", "X-Request-ID"} <= set(headers.pop("access-control-allow-headers")
                                                                     .split(", "))
    assert headers.pop("access-control-max-age") == str(MAX_AGE_SECONDS)
    assert headers == {"access-control-expose-headers": EXPOSED_HEADERS}  # and no Allow-Credentials
    assert response.headers["X-Request-ID"]


def test_every_request_header_the_api_reads_may_be_sent():
    assert set(ALLOWED_HEADERS.split(", ")) == {"Authorization", "Content-Type", "Content-Encoding", "X-Request-ID"}


def test_the_actual_request_after_a_preflight_still_needs_its_key(cors_client):
    assert cors_client.options(RECOMMENDATIONS, headers=preflight()).status_code == 204
    response = cors_client.get(RECOMMENDATIONS, headers={"Origin": DESKTOP})
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "unauthorized"
    assert_allowed(response)  # the desktop can read why
    # An agent key is no admin key, whatever the preflight said.
    response = cors_client.post("/v1/admin/reload", headers={**AUTH, "Origin": DESKTOP})
    assert response.status_code == 403
    assert_allowed(response)
    assert cors_client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                                         "Origin": DESKTOP}).status_code == 200


def test_an_options_request_that_is_no_preflight_is_handled_as_before(cors_client):
    response = cors_client.options(RECOMMENDATIONS, headers={"Origin": DESKTOP})  # no Access-Control-Request-Method
    assert response.status_code == 401
    assert_allowed(response)
    response = cors_client.options(RECOMMENDATIONS, headers={**AUTH, "Origin": DESKTOP})
    assert response.status_code == 204 and "Access-Control-Allow-Methods" not in response.headers
    assert set(response.headers["Allow"].split(", ")) == {"GET", "POST", "HEAD", "OPTIONS"}


def test_a_preflight_to_an_unknown_path_is_a_404_the_desktop_can_read(cors_client):
    response = cors_client.options("/v1/nowhere", headers=preflight())
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "not_found"
    assert_allowed(response)


@pytest.mark.parametrize("origin", ["https://evil.example", "https://agents.example.com.evil.example",
                                    "https://evil-agents.example.com", "http://agents.example.com",
                                    "https://agents.example.com:8443", "https://AGENTS.example.com", "null", ""])
def test_any_other_origin_gets_no_cors_headers_and_is_handled_as_without_cors(cors_client, origin):
    response = cors_client.options(RECOMMENDATIONS, headers=preflight("GET", origin))
    assert response.status_code == 401 and cors_headers(response) == {}  # the key check, as without CORS
    response = cors_client.options("/healthz", headers=preflight("GET", origin))
    assert response.status_code == 204 and cors_headers(response) == {}
    for headers in (AUTH, {}):
        response = cors_client.get(RECOMMENDATIONS, headers={**headers, "Origin": origin})
        assert response.status_code == (200 if headers else 401) and cors_headers(response) == {}
        assert response.headers["Vary"] == "Origin"  # a cache must not hand it to an allowed origin


def test_a_request_without_an_origin_is_answered_as_without_the_setting(cors_client):
    answers = [cors_client.get("/healthz"), cors_client.get("/v1/models", headers=AUTH),
               cors_client.get(RECOMMENDATIONS), cors_client.options(RECOMMENDATIONS, headers={
                   "Access-Control-Request-Method": "GET"})]  # no Origin: no preflight, the key check
    assert [response.status_code for response in answers] == [200, 200, 401, 401]
    for response in answers:
        assert cors_headers(response) == {} and "Vary" not in response.headers


def test_any_origin_with_a_star_is_answered_with_a_star(settings):
    """Fetch: without credentials "*" lets any origin read the answer; echoing each Origin would only make caches
    keep one copy per origin. Keys travel in Authorization, so no answer is credentialed."""
    app = make_app(settings, cors_origins=frozenset({"*"}))
    client = app.test_client()
    for origin in ("https://anyone.example", "null"):
        response = client.options(RECOMMENDATIONS, headers=preflight("GET", origin))
        assert response.status_code == 204 and response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in response.headers
        for headers, status in ((AUTH, 200), ({}, 401)):
            response = client.get(RECOMMENDATIONS, headers={**headers, "Origin": origin})
            assert response.status_code == status
            assert_allowed(response, "*")
    paths = Paths(app)  # the fast path answers the same
    flask, fast = paths.both(RECOMMENDATIONS, {**AUTH, "Origin": "https://anyone.example",
                                               "X-Request-ID": "req-cors-star-0001"})
    assert fast[3] == 1 and fast[:3] == flask[:3]
    assert ("Access-Control-Allow-Origin", "*") in fast[1] and ("Vary", "Origin") in fast[1]
    assert client.options(RECOMMENDATIONS, headers=preflight("GET", "")).status_code == 401  # no origin at all
    response = client.get(RECOMMENDATIONS, headers=AUTH)  # no Origin: answered as without CORS
    assert cors_headers(response) == {} and "Vary" not in response.headers
    app.extensions["recsvc"].store.stop()


# --- actual answers, errors included --------------------------------------------------------------------


def test_answers_of_every_kind_carry_the_headers(cors_client):
    origin = {"Origin": DESKTOP}
    answers = {
        200: cors_client.post(RECOMMENDATIONS, headers={**AUTH, **origin}, json={"limit": 2}),
        202: cors_client.post("/v1/events", headers={**AUTH, **origin},
                              json=[{"customer_id": "C000003", "item_id": "I000001", "event_type": "view"}]),
        400: cors_client.get(f"{RECOMMENDATIONS}?limit=0", headers={**AUTH, **origin}),
        404: cors_client.get("/v1/items/no-such-item/similar", headers={**AUTH, **origin}),
        405: cors_client.delete("/v1/models", headers={**AUTH, **origin}),
        413: cors_client.post(RECOMMENDATIONS, headers={**AUTH, **origin}, json={"context_items": ["i" * 100] * 700}),
        415: cors_client.post(RECOMMENDATIONS, headers={**AUTH, **origin}, data="limit=2"),
    }
    for status, response in answers.items():
        assert response.status_code == status, response.get_data(as_text=True)
        assert_allowed(response)
    assert "Allow" in answers[405].headers


def test_a_429_carries_the_headers_and_retry_after_is_exposed(settings):
    app = make_app(settings, cors_origins=frozenset({DESKTOP}), rate_limit=1.0, rate_burst=1)
    app.extensions["recsvc.rate_limiter"].clock = FrozenClock()
    client = app.test_client()
    statuses = [client.get("/v1/models", headers={**AUTH, "Origin": DESKTOP}) for _ in range(2)]
    assert [r.status_code for r in statuses] == [200, 429]
    assert_allowed(statuses[1])
    assert "Retry-After" in statuses[1].headers and "Retry-After" in EXPOSED_HEADERS.split(", ")
    app.extensions["recsvc"].store.stop()


def test_a_500_carries_the_headers(cors_app, cors_client, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("scoring blew up")

    monkeypatch.setattr(cors_app.extensions["recsvc"].recommender, "compute", broken)
    response = cors_client.get("/v1/customers/C000005/recommendations", headers={**AUTH, "Origin": DESKTOP})
    assert response.status_code == 500 and response.get_json()["error"]["code"] == "internal_error"
    assert_allowed(response)


def test_a_503_without_a_model_carries_the_headers(settings, tmp_path):
    app = make_app(settings, registry=tmp_path / "empty-registry", cors_origins=frozenset({DESKTOP}))
    response = app.test_client().get(RECOMMENDATIONS, headers={**AUTH, "Origin": DESKTOP})
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "model_unavailable"
    assert_allowed(response)
    app.extensions["recsvc"].store.stop()


# --- the fast path --------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [DESKTOP, OTHER_DESK, "https://evil.example", None])
def test_the_fast_path_answers_browsers_as_flask_does(cors_app, origin):
    paths = Paths(cors_app)
    headers = {**AUTH, "X-Request-ID": "req-cors-fast-0001", **({"Origin": origin} if origin else {})}
    flask, fast = paths.both(f"{RECOMMENDATIONS}?limit=4", headers)
    assert fast[3] == 1, "not answered by the fast path"
    assert flask[3] == 0 and fast[:3] == flask[:3] and fast[0] == 200
    sent = {name.lower(): value for name, value in fast[1]}
    assert sent.get("access-control-allow-origin") == (origin if origin in (DESKTOP, OTHER_DESK) else None)
    if origin is None:  # no browser on another origin: the answer is the one without CORS
        assert [name for name, _ in fast[1]] == ["Content-Type", "Content-Length", "X-Request-ID"]
    else:
        assert sent["vary"] == "Origin"


def test_without_the_setting_the_fast_path_sends_what_it_always_sent(app):
    paths = Paths(app)
    status, headers, _, answered = paths.both(RECOMMENDATIONS, {**AUTH, "Origin": DESKTOP,
                                                                "X-Request-ID": "req-cors-fast-0002"})[1]
    assert answered == 1 and status == 200
    assert [name for name, _ in headers] == ["Content-Type", "Content-Length", "X-Request-ID"]


# --- a real gunicorn ------------------------------------------------------------------------------------


def test_gunicorn_serves_a_browser_on_an_allowed_origin(trained_registry, tmp_path):
    env = {"RECSVC_REGISTRY": str(trained_registry), "RECSVC_API_KEYS": API_KEY,
           "RECSVC_CORS_ORIGINS": f"{DESKTOP}, {OTHER_DESK}", "RECSVC_SPOOL_DIR": str(tmp_path / "spool")}
    with running_server(env, tmp_path / "server.log") as base, requests.Session() as session:
        url = f"{base}{RECOMMENDATIONS}?limit=3"
        response = session.options(url, headers=preflight("GET"), timeout=5)
        assert response.status_code == 204
        assert response.headers["Access-Control-Allow-Origin"] == DESKTOP
        assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
        assert "Access-Control-Allow-Credentials" not in response.headers
        for _ in range(6):  # the first computes the list, the others are cached: the fast path on both workers
            response = session.get(url, headers={**AUTH, "Origin": DESKTOP}, timeout=5)
            assert response.status_code == 200 and len(response.json()["items"]) == 3
            assert_allowed(response)
        response = session.get(url, headers={"Origin": DESKTOP}, timeout=5)
        assert response.status_code == 401
        assert_allowed(response)
        response = session.options(url, headers=preflight("GET", "https://evil.example"), timeout=5)
        assert response.status_code == 401 and cors_headers(response) == {}
        response = session.get(url, headers={**AUTH, "Origin": "https://evil.example"}, timeout=5)
        assert response.status_code == 200 and cors_headers(response) == {}
        # A broken chunked body is read, and refused, by the app: its 400 carries the headers too.
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall((f"POST {RECOMMENDATIONS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                          f"Origin: {DESKTOP}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                          "zz\r\nabc\r\n0\r\n\r\n").encode())
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while data := sock.recv(65536):  # the server closes the connection: the body's framing was broken
                answer += data
            answer = answer.decode("latin-1")
        assert answer.startswith("HTTP/1.1 400 ") and '"code":"invalid_request"' in answer, answer
        assert f"Access-Control-Allow-Origin: {DESKTOP}\r\n" in answer, answer
