"""Bearer API keys for /v1, compared in constant time; secure by default."""

from __future__ import annotations

import hmac

from flask import Flask, current_app, request

from recsvc.api.errors import error_response
from recsvc.config import Settings

PROTECTED_PREFIX = "/v1/"
ADMIN_PREFIX = "/v1/admin/"


def _matches(candidate: str, keys: frozenset[str]) -> bool:
    """Constant-time membership: every configured key is compared, whatever matches."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def _bearer_token() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def check_request():
    """before_request hook: None to go on, or the 401/403 error response."""
    if not request.path.startswith(PROTECTED_PREFIX):
        return None
    settings: Settings = current_app.extensions["recsvc"].settings
    if settings.auth_disabled:
        return None
    challenge = {"WWW-Authenticate": 'Bearer realm="recsvc"'}
    if not settings.api_keys and not settings.admin_keys:
        return error_response(401, "unauthorized", "no API keys are configured on this server: set RECSVC_API_KEYS "
                              "(or RECSVC_AUTH=off for local development only)", headers=challenge)
    token = _bearer_token()
    if token is None:
        return error_response(401, "unauthorized", "send an API key as 'Authorization: Bearer <key>'",
                              headers=challenge)
    is_admin = _matches(token, settings.admin_keys)
    if not (is_admin or _matches(token, settings.api_keys)):
        return error_response(401, "unauthorized", "the API key is not valid", headers=challenge)
    if request.path.startswith(ADMIN_PREFIX) and not is_admin:
        return error_response(403, "forbidden", "this operation needs an admin key")
    return None


def init_app(app: Flask) -> None:
    app.before_request(check_request)
