"""The HTTP API: one flask-smorest Api, one blueprint per resource."""

from __future__ import annotations

from flask import Flask

from recsvc.api import experiments, feedback, health, items, models, ops, recommendations
from recsvc.api.errors import RecsvcApi
from recsvc.api.schemas import PathIdConverter


def init_app(app: Flask) -> RecsvcApi:
    # Every operation needs a Bearer key unless it says otherwise (health and readiness do).
    app.config.setdefault("API_SPEC_OPTIONS", {"security": [{"bearer": []}]})
    app.url_map.converters["id"] = PathIdConverter  # before the blueprints' routes use it
    api = RecsvcApi(app)
    api.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer",
                                                   "description": "An API key; /v1/admin needs an admin key"})
    api.register_blueprint(health.blp)
    api.register_blueprint(recommendations.blp)
    api.register_blueprint(items.blp)
    api.register_blueprint(models.blp)
    api.register_blueprint(feedback.blp)
    api.register_blueprint(experiments.blp)
    ops.init_app(app)
    return api
