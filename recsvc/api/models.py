"""The served model version, and the operator's reload."""

from __future__ import annotations

import datetime as dt

from flask import current_app

from recsvc.api.parsing import Blueprint
from recsvc.api.schemas import ModelSchema, ReloadSchema
from recsvc.model_store import without_paths

blp = Blueprint("models", __name__, url_prefix="/v1", description="Model versions")


def iso_time(seconds: float | None) -> str | None:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="seconds") if seconds else None


def load_failure(store) -> dict | None:
    failure = store.last_failure
    return {"version": failure.version, "reason": failure.reason, "at": iso_time(failure.at)} if failure else None


def experiments_state(router) -> dict | None:
    """The experiment definitions this worker uses and the refused file, if any; None without RECSVC_EXPERIMENTS."""
    source = router.source if router is not None else None
    if source is None:
        return None
    failure = source.last_failure
    return {"digest": source.digest, "loaded_at": iso_time(source.loaded_at),
            "last_failure": {"reason": without_paths(failure.reason), "at": iso_time(failure.at)} if failure else None}


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
    also retrying a version refused before, and re-read the experiments file (RECSVC_EXPERIMENTS).
    Other workers follow within the reload interval."""
    service = current_app.extensions["recsvc"]
    store = service.store
    previous = store.bundle.version if store.bundle else None
    changed = store.refresh(retry_refused=True)
    experiments_changed = service.experiments.refresh(force=True) if service.experiments else False
    experiments = experiments_state(service.experiments)
    return {"changed": changed, "model_version": store.bundle.version if store.bundle else None,
            "previous_version": previous, "last_load_failure": load_failure(store),
            "experiments": experiments and {"changed": experiments_changed, **experiments}}
