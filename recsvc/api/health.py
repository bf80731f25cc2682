"""Liveness and readiness for load balancers and orchestrators (no key needed)."""

from __future__ import annotations

import time

from flask import current_app

from recsvc.api.models import experiments_state, iso_time, load_failure
from recsvc.api.parsing import Blueprint
from recsvc.api.schemas import HealthSchema, ReadinessSchema

blp = Blueprint("health", __name__, description="Liveness and readiness")


@blp.route("/healthz")
@blp.doc(security=[])
@blp.response(200, HealthSchema)
def healthz():
    """The process is up."""
    return {"status": "ok"}


@blp.route("/readyz")
@blp.doc(security=[])
@blp.response(200, ReadinessSchema)
@blp.alt_response(503, schema=ReadinessSchema, description="No model version loaded yet")
def readyz():
    """Ready when a model version is loaded; also reports the cache and the last refused version."""
    service = current_app.extensions["recsvc"]
    bundle = service.store.current()
    created = service.store.created_at
    body = {
        "status": "ready" if bundle is not None else "not ready",
        "model_version": bundle.version if bundle else None,
        "model_loaded_at": iso_time(service.store.loaded_at),
        "model_age_seconds": round(time.time() - created, 1) if created else None,
        "cache": service.cache.status(),  # Redis down is degraded, not unready: answers come from the model
        "last_load_failure": load_failure(service.store),
        # A refused experiments file is not unreadiness: the definitions loaded before keep serving.
        "experiments": experiments_state(service.experiments),
    }
    return body, 200 if bundle is not None else 503
