"""Bearer API keys for /v1, compared in constant time; secure by default."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time

from flask import Flask, current_app, request

from recsvc.api.errors import error_response
from recsvc.config import Settings

PROTECTED_PREFIX = "/v1/"
ADMIN_PREFIX = "/v1/admin/"
# Set in the WSGI environ by recsvc/api/fast_path.py when it took this request's rate-limit token and then handed
# the request to Flask (a cache miss): the request is not counted twice. Headers cannot set environ keys like it.
RATE_TOKEN_TAKEN = "recsvc.rate_token_taken"


def _matches(candidate: str, keys: frozenset[str]) -> bool:
    """Constant-time membership: every configured key is compared, whatever matches."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def bearer_token(authorization: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header value, or None."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_roles(token: str, settings: Settings) -> tuple[bool, bool]:
    """(valid key, admin key), in constant time: every configured key is compared."""
    is_admin = _matches(token, settings.admin_keys)
    return is_admin or _matches(token, settings.api_keys), is_admin


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
    token = bearer_token(request.headers.get("Authorization", ""))
    if token is None:
        return error_response(401, "unauthorized", "send an API key as 'Authorization: Bearer <key>'",
                              headers=challenge)
    valid, is_admin = key_roles(token, settings)
    if not valid:
        return error_response(401, "unauthorized", "the API key is not valid", headers=challenge)
    if request.path.startswith(ADMIN_PREFIX) and not is_admin:
        return error_response(403, "forbidden", "this operation needs an admin key")
    limiter: RateLimiter | None = current_app.extensions.get("recsvc.rate_limiter")
    wait = limiter.wait_for(token) if limiter and not request.environ.get(RATE_TOKEN_TAKEN) else 0.0
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        return error_response(429, "rate_limited", "too many requests with this API key; retry later",
                              {"retry_after_seconds": seconds}, headers={"Retry-After": str(seconds)})
    return None


class RateLimiter:
    """A token bucket per API key, in this worker: `rate` requests per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[bytes, tuple[float, float]] = {}  # key digest -> (tokens, last refill)
        self._lock = threading.Lock()

    def wait_for(self, api_key: str) -> float:
        """0 when the request may go on (a token is taken), else the seconds until a token is free."""
        bucket = hashlib.blake2b(api_key.encode(), digest_size=16).digest()  # the key itself is not kept
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(bucket, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[bucket] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[bucket] = (tokens - 1.0, now)
            return 0.0

    def clear(self) -> None:
        """Forget every bucket: every key has its full burst again."""
        with self._lock:
            self._buckets.clear()


def init_app(app: Flask) -> None:
    settings: Settings = app.extensions["recsvc"].settings
    if settings.rate_limit > 0:
        app.extensions["recsvc.rate_limiter"] = RateLimiter(settings.rate_limit, settings.rate_burst)
    app.before_request(check_request)
