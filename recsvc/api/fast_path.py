"""The plain GET of recommendations, answered in front of Flask; every other request goes to Flask.

A cached answer takes ~20 us of work of its own, while Flask's request machinery
around it (context, routing, hooks, webargs, response object) takes ~100 us more.
This WSGI middleware recognises the plain request — GET
/v1/customers/<id>/recommendations with a valid key and a simple query — and answers
it with the same steps as the Flask path: request id, key check, rate limit, then
Recommender.recommend (cache, computation, experiment assignment and exposure, cache
metrics), request metrics, the access line and, with RECSVC_CORS_ORIGINS, the CORS
headers (recsvc/api/cors.py). Anything else (a bad or missing key, a refused rate
limit, an unusual query, any error) goes to Flask untouched, so Flask
stays the one source of every error response. Workers that never run Flask's request
path also copy fewer of the master's pages (see Memory in docs/operations.md).
"""

from __future__ import annotations

import re
import time

from flask import Flask

from recsvc.api import cors
from recsvc.api.auth import RATE_TOKEN_TAKEN, bearer_token, key_roles
from recsvc.api.schemas import DEFAULT_LIMIT, MAX_ID, MAX_LIMIT, MAX_LIST, MAX_STRATEGY
from recsvc.app import REQUEST_ID_HEADER, record_request, request_id_for
from recsvc.logs import REQUEST_ID
from recsvc.recommend import RecommendationQuery

ROUTE = "/v1/customers/<customer_id>/recommendations"
# Ids and values made of these characters read the same to Flask and to us (no percent-decoding, no '+').
_PATH = re.compile(r"/v1/customers/([A-Za-z0-9._~:@-]{1,%d})/recommendations" % MAX_ID)
# An id with '/' (sent as %2F; the server decoded it): tried only when _PATH did not match, so plain ids stay as fast.
# Flask's <id:...> converter takes the same id: everything between the two fixed parts.
_SLASHED_PATH = re.compile(r"/v1/customers/([A-Za-z0-9._~:@/-]{1,%d})/recommendations" % MAX_ID)
_VALUE = re.compile(r"[A-Za-z0-9._~:@-]+")
_LIMIT = re.compile(r"[1-9][0-9]{0,2}")
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


def parse_query(query_string: str) -> dict | None:
    """The arguments of a plain query string as RecommendationArgsSchema would load them, or None for anything
    this parser does not vouch for (Flask then parses it, and answers 400 where it is wrong)."""
    args = {"limit": DEFAULT_LIMIT, "exclude": (), "include_owned": False}
    seen = set()
    for part in query_string.split("&") if query_string else ():
        name, _, value = part.partition("=")
        if name in seen or not _VALUE.fullmatch(value if name != "exclude" else value.replace(",", "_")):
            return None
        seen.add(name)
        if name == "limit" and _LIMIT.fullmatch(value) and int(value) <= MAX_LIMIT:
            args["limit"] = int(value)
        elif name == "strategy" and len(value) <= MAX_STRATEGY:
            args["strategy"] = value
        elif name == "category" and len(value) <= MAX_ID:
            args["category"] = value
        elif name == "include_owned" and value in _BOOLEANS:
            args["include_owned"] = _BOOLEANS[value]
        elif name == "exclude" and _plain_list(value):
            args["exclude"] = tuple(value.split(","))
        else:
            return None
    return args


def _plain_list(value: str) -> bool:
    ids = value.split(",")
    return len(ids) <= MAX_LIST and all(0 < len(i) <= MAX_ID for i in ids)


class RecommendationsFastPath:
    """WSGI middleware: answers the plain recommendations GET, hands everything else to `flask_app`."""

    def __init__(self, app: Flask, flask_app):
        self.service = app.extensions["recsvc"]
        self.limiter = app.extensions.get("recsvc.rate_limiter")
        self.cors: cors.CorsPolicy | None = app.extensions.get(cors.EXTENSION)  # None: RECSVC_CORS_ORIGINS unset
        self.flask_app = flask_app
        self.answered = 0  # requests answered here, for tests

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        customer_id = self._plain_get(environ)
        if customer_id is None:
            return self.flask_app(environ, start_response)
        request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID", ""))
        token = REQUEST_ID.set(request_id)
        try:
            body = self._body(environ, customer_id, request_id)
            if body is None:
                return self.flask_app(environ, start_response)
            self.answered += 1
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                       (REQUEST_ID_HEADER, request_id)]
            if self.cors is not None and "HTTP_ORIGIN" in environ:  # in the order Flask's hooks add them
                headers[2:2] = self.cors.answer_headers(environ["HTTP_ORIGIN"])
            start_response("200 OK", headers)
            record_request(ROUTE, "GET", environ["PATH_INFO"], 200, time.perf_counter() - started)
            return [body]
        finally:
            REQUEST_ID.reset(token)

    @staticmethod
    def _plain_get(environ) -> str | None:
        """The customer id of a GET of the route without a body, else None."""
        if environ["REQUEST_METHOD"] != "GET" or environ.get("CONTENT_LENGTH") not in (None, "", "0") \
                or "HTTP_TRANSFER_ENCODING" in environ:
            return None
        match = _PATH.fullmatch(environ.get("PATH_INFO", ""))
        if match:
            return match.group(1)
        match = _SLASHED_PATH.fullmatch(environ.get("PATH_INFO", ""))
        return match.group(1) if match else None

    def _body(self, environ, customer_id: str, request_id: str) -> bytes | None:
        """The answer when the key is valid and the rate limit allows it; else None."""
        args = parse_query(environ.get("QUERY_STRING", ""))
        if args is None or not self._authorized(environ):
            return None
        query = RecommendationQuery(customer_id=customer_id, limit=args["limit"], strategy=args.get("strategy"),
                                    exclude=args["exclude"], category=args.get("category"),
                                    include_owned=args["include_owned"])
        try:
            return self.service.recommender.recommend(query, request_id)[0]
        except Exception:  # noqa: BLE001 — e.g. an unknown strategy: Flask raises it again and answers it
            return None

    def _authorized(self, environ) -> bool:
        """The checks of recsvc.api.auth.check_request that let a request through; takes its rate-limit token.
        False for anything Flask must answer (401, 429, no keys configured)."""
        settings = self.service.settings
        if settings.auth_disabled:
            return True
        token = bearer_token(environ.get("HTTP_AUTHORIZATION", ""))
        if token is None or not key_roles(token, settings)[0]:
            return False
        if self.limiter is not None:
            if self.limiter.wait_for(token) > 0:
                return False  # Flask asks again (a refusal takes no token) and answers 429
            environ[RATE_TOKEN_TAKEN] = True  # should Flask answer after all (an error), not twice
        return True
