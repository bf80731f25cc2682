"""Liveness and readiness for load balancers and orchestrators (no key needed)."""

from __future__ import annotations

from flask import current_app
from flask_smorest import Blueprint

from recsvc.api.schemas import HealthSchema, ReadinessSchema

blp = Blueprint("health", __name__, description="Liveness and readiness")


@blp.route("/healthz")
@blp.response(200, HealthSchema)
def healthz():
    """The process is up."""
    return {"status": "ok"}


@blp.route("/readyz")
@blp.response(200, ReadinessSchema)
@blp.alt_response(503, schema=ReadinessSchema, description="No model version loaded yet")
def readyz():
    """Ready when a model version is loaded; also reports the cache and the last refused version."""
    service = current_app.extensions["recsvc"]
    bundle = service.store.current()
    failure = service.store.last_failure
    body = {
        "status": "ready" if bundle is not None else "not ready",
        "model_version": bundle.version if bundle else None,
        "cache": {"kind": service.cache.kind},
        "last_load_failure": {"version": failure.version, "reason": failure.reason} if failure else None,
    }
    return body, 200 if bundle is not None else 503
