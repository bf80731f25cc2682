"""The served model version, and the operator's reload."""

from __future__ import annotations

import datetime as dt

from flask import current_app

from recsvc.api.parsing import Blueprint
from recsvc.api.schemas import ModelSchema, ReloadSchema

blp = Blueprint("models", __name__, url_prefix="/v1", description="Model versions")


def iso_time(seconds: float | None) -> str | None:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="seconds") if seconds else None


def load_failure(store) -> dict | None:
    failure = store.last_failure
    return {"version": failure.version, "reason": failure.reason, "at": iso_time(failure.at)} if failure else None


@blp.route("/models")
@blp.response(200, ModelSchema)
@blp.alt_response(503, description="No model version is loaded yet")
def current_model():
    """The model version this server answers with: its strategies, their parameters and offline metrics."""
    service = current_app.extensions["recsvc"]
    bundle = service.recommender.bundle()
    manifest = bundle.manifest
    return {
        "model_version": bundle.version,
        "created_at": manifest.get("created_at"),
        "loaded_at": iso_time(service.store.loaded_at),
        "default_strategy": bundle.default_strategy,
        "strategies": manifest.get("strategies", {}),
        "evaluation": manifest.get("evaluation"),
        "data": manifest.get("data"),
    }


@blp.route("/admin/reload", methods=["POST"])
@blp.response(200, ReloadSchema)
def reload_model():
    """Load the version the registry's CURRENT pointer names now, in the worker that takes this call,
    also retrying a version refused before. Other workers follow within the reload interval."""
    store = current_app.extensions["recsvc"].store
    previous = store.bundle.version if store.bundle else None
    changed = store.refresh(retry_refused=True)
    return {"changed": changed, "model_version": store.bundle.version if store.bundle else None,
            "previous_version": previous, "last_load_failure": load_failure(store)}
