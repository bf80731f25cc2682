"""The one JSON error shape, {"error": {"code", "message", "details"}}, and the mapping of every failure to it."""

from __future__ import annotations

import http
import logging

import marshmallow as ma
from apispec import BasePlugin
from flask import Flask, current_app, jsonify
from flask_smorest import Api
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import HTTPException

from recsvc.errors import (
    ArtifactError,
    ConfigError,
    EventLogUnavailable,
    InvalidInput,
    ModelUnavailable,
    NotFound,
    RecsvcError,
)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[RecsvcError], int] = {
    InvalidInput: 400,
    NotFound: 404,
    ModelUnavailable: 503,
    ArtifactError: 503,
    ConfigError: 500,
    EventLogUnavailable: 503,
}

# Werkzeug names (e.g. "Not Found") become stable snake_case codes.
CODE_BY_STATUS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large", 414: "uri_too_long",
                  415: "unsupported_media_type", 417: "expectation_failed", 429: "rate_limited",
                  431: "headers_too_large", 500: "internal_error", 501: "not_implemented", 503: "unavailable"}
# Headers of an HTTP error worth passing on (405's Allow, 401's WWW-Authenticate, 429's Retry-After); never its HTML
# Content-Type.
_KEPT_HEADERS = {"allow", "www-authenticate", "retry-after"}


class ErrorBodySchema(ma.Schema):
    code = ma.fields.String(required=True, metadata={"description": "Stable machine-readable error name"})
    message = ma.fields.String(required=True, metadata={"description": "What went wrong, for a person"})
    details = ma.fields.Dict(required=True, metadata={"description": "Specifics, e.g. per-field validation errors"})


class ErrorSchema(ma.Schema):
    error = ma.fields.Nested(ErrorBodySchema, required=True)


def error_response(status: int, code: str, message: str, details: dict | None = None, headers: dict | None = None):
    response = jsonify({"error": {"code": code, "message": message, "details": details or {}}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


class ErrorStatusesPlugin(BasePlugin):
    """Documents every error status an operation can answer with, each with the one error body, so clients (and
    the fuzzer) can rely on the OpenAPI document: 400 instead of webargs' 422, the key checks under /v1, the body
    checks on every POST."""

    def init_spec(self, spec):
        super().init_spec(spec)
        self.spec = spec

    def operation_helper(self, path=None, operations=None, **kwargs):
        for method, operation in (operations or {}).items():
            responses = operation.setdefault("responses", {})
            if responses.pop(422, None) or responses.pop("422", None):
                responses["400"] = http.HTTPStatus(400).name
            codes = set()
            if path.startswith("/v1/"):
                # a path or query that is not UTF-8 or holds control characters; no or wrong key; rate limit;
                # no model loaded or event log down
                codes |= {400, 401, 429, 503}
            if path.startswith("/v1/admin/"):
                codes.add(403)
            if method == "post":
                # bad JSON, a body that stops coming (408), body over RECSVC_MAX_BODY_BYTES, not JSON:
                # recsvc/api/request_form.py checks the body of every POST, also of one that takes none (admin reload)
                codes |= {400, 408, 413, 415}
            for code in codes:
                if code not in responses and str(code) not in responses:
                    responses[str(code)] = http.HTTPStatus(code).name
            for status, response in responses.items():
                # alt_response(404, description=...) documents no body; the server sends the error shape
                if _is_error(status) and isinstance(response, dict) and not {"content", "$ref"} & set(response):
                    error_body = self.spec.components.get_ref("schema", "Error")
                    response["content"] = {"application/json": {"schema": error_body}}


def _is_error(status) -> bool:
    return str(status) == "default" or str(status).isdigit() and int(status) >= 400


class RecsvcApi(Api):
    """flask-smorest's Api with recsvc's error shape; validation failures are 400, not 422."""

    ERROR_SCHEMA = ErrorSchema

    def __init__(self, app: Flask):
        super().__init__(app, spec_kwargs={"extra_plugins": [ErrorStatusesPlugin()]})
        app.register_error_handler(RecsvcError, self.handle_domain_error)
        app.register_error_handler(ParseException, self.handle_unreadable_body)
        app.register_error_handler(NoMoreData, self.handle_unreadable_body)
        app.register_error_handler(Exception, self.handle_unexpected)

    def handle_http_exception(self, error: HTTPException):
        data = getattr(error, "data", None) or {}
        status = 400 if error.code == 422 else error.code or 500
        details = data.get("errors") or data.get("messages") or {}
        if error.code == 422 and isinstance(details, dict):
            details = {"fields": _flatten_locations(details)}
        message = data.get("message") or ("invalid request parameters" if error.code == 422 else error.description)
        if status == 413:  # werkzeug's text names no limit; the client needs it to split its request
            limit = current_app.config["MAX_CONTENT_LENGTH"]
            message = f"the body is over the {limit} bytes this server takes (RECSVC_MAX_BODY_BYTES)"
            details = {"max_bytes": limit}
        headers = {name: value for name, value in error.get_headers() if name.lower() in _KEPT_HEADERS}
        headers.update(data.get("headers") or {})
        return error_response(status, CODE_BY_STATUS.get(status, "http_error"), message, details, headers)

    @staticmethod
    def handle_unreadable_body(error: Exception):
        # gunicorn reads a chunked body as the app asks for it: broken framing, or a client that stopped sending.
        return error_response(400, "invalid_request", f"the request body could not be read: "
                                                      f"{error or type(error).__name__}")

    @staticmethod
    def handle_domain_error(error: RecsvcError):
        status = STATUS_BY_ERROR.get(type(error), 500)
        if status >= 500:
            log.error("request failed: %s", error.message)
        return error_response(status, error.code, error.message, error.details)

    @staticmethod
    def handle_unexpected(error: Exception):
        # HTTPExceptions never get here: Flask picks the more specific handler above.
        log.exception("unhandled error")
        return error_response(500, "internal_error", "the server could not answer; the error was logged")


def _flatten_locations(messages: dict) -> dict:
    """webargs nests errors by location ({"query": {"limit": [...]}}); callers care about the field."""
    flat = {}
    for location, fields in messages.items():
        if isinstance(fields, dict):
            flat.update(fields)
        else:
            flat[location] = fields
    return flat
