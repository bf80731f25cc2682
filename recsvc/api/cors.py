"""Cross-origin calls from browser-based agent desktops (RECSVC_CORS_ORIGINS): the preflight and the headers of every
answer, for the Flask path and the fast path alike.

A browser on another origin first sends a preflight (OPTIONS with Access-Control-Request-Method,
never with the Authorization header), so it is answered here, ahead of the key check; the actual
request then needs its key as any other. Keys travel in a header, not in cookies: no
Access-Control-Allow-Credentials. A disallowed origin gets no CORS headers (the browser then
withholds the answer) and its request is handled as without CORS.

Hand-written rather than flask-cors: its preflight answer comes after the before_request
hooks, where the key check has already answered 401, and the fast path in front of Flask
needs the same headers from the same place.
"""

from __future__ import annotations

from flask import Flask, current_app, request

from recsvc.config import ANY_ORIGIN

# Every request header the API reads that is not CORS-safelisted (Accept and Content-Type text/plain are).
ALLOWED_HEADERS = "Authorization, Content-Type, Content-Encoding, X-Request-ID"
# Response headers beyond the safelisted ones (Content-Type, Content-Length...) a client script may read.
EXPOSED_HEADERS = "X-Request-ID, Retry-After, WWW-Authenticate, Allow"
# Seconds a browser may reuse a preflight's answer for the same URL: Chromium caps it at 7200, Firefox at 86400.
MAX_AGE_SECONDS = 7200
EXTENSION = "recsvc.cors"


class CorsPolicy:
    """Which origins may call, and the headers their answers carry."""

    def __init__(self, origins: frozenset[str]):
        self.origins = origins
        self.any_origin = ANY_ORIGIN in origins
        # With "*" every origin gets the same answer: the Fetch standard's "*", right because no answer is
        # credentialed (keys travel in Authorization, which a browser sends only when the page sets it).
        self._any_origin_headers = [("Access-Control-Allow-Origin", ANY_ORIGIN),
                                    ("Access-Control-Expose-Headers", EXPOSED_HEADERS), ("Vary", "Origin")]

    def allows(self, origin: str | None) -> bool:
        """Whether a browser on `origin` (the Origin header's value, None when none was sent) may read answers."""
        return bool(origin) and (self.any_origin or origin in self.origins)

    def answer_headers(self, origin: str) -> list[tuple[str, str]]:
        """Headers of any answer to a request that sent this Origin: the CORS ones for an allowed origin, and
        for any origin Vary, since the answer depends on it. A request without Origin (no browser on another
        origin) gets none: it is answered as without CORS, and the fast path stays as it was for it.
        Vary stays with "*" too: a request without Origin gets no CORS header."""
        if self.any_origin and origin:
            return self._any_origin_headers
        if self.allows(origin):
            return [("Access-Control-Allow-Origin", origin), ("Access-Control-Expose-Headers", EXPOSED_HEADERS),
                    ("Vary", "Origin")]
        return [("Vary", "Origin")]


def answer_preflight():
    """before_request hook, ahead of the key check: a preflight from an allowed origin is answered 204 with the
    route's methods; anything else goes on (a refused origin's preflight to /v1 meets the key check, 401)."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    policy: CorsPolicy = current_app.extensions[EXTENSION]
    if not policy.allows(request.headers.get("Origin")):
        return None
    if request.routing_exception is not None:
        raise request.routing_exception  # an unknown path: 404, not a 401 for want of a key no preflight carries
    response = current_app.make_default_options_response()  # 204 and Allow: the route's methods
    response.headers["Access-Control-Allow-Methods"] = response.headers["Allow"]
    response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
    response.headers["Access-Control-Max-Age"] = str(MAX_AGE_SECONDS)
    return response


def add_answer_headers(response):
    """after_request hook: every answer of the Flask path, errors included (they are responses by then)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return response
    policy: CorsPolicy = current_app.extensions[EXTENSION]
    for name, value in policy.answer_headers(origin):
        if name == "Vary":
            response.vary.add(value)
        else:
            response.headers[name] = value
    return response


def init_app(app: Flask) -> None:
    """Before recsvc.api.auth.init_app: the preflight is answered before the key check. Without
    RECSVC_CORS_ORIGINS nothing is registered and answers carry no CORS header."""
    origins = app.extensions["recsvc"].settings.cors_origins
    if not origins:
        return
    app.extensions[EXTENSION] = CorsPolicy(origins)
    app.before_request(answer_preflight)
    app.after_request(add_answer_headers)
