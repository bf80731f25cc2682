"""The HTTP API: one flask-smorest Api, one blueprint per resource."""

from __future__ import annotations

from flask import Flask

from recsvc.api import experiments, feedback, health, items, models, ops, recommendations
from recsvc.api.errors import RecsvcApi


def init_app(app: Flask) -> RecsvcApi:
    api = RecsvcApi(app)
    api.register_blueprint(health.blp)
    api.register_blueprint(recommendations.blp)
    api.register_blueprint(items.blp)
    api.register_blueprint(models.blp)
    api.register_blueprint(feedback.blp)
    api.register_blueprint(experiments.blp)
    ops.init_app(app)
    return api
