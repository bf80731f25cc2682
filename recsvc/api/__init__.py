"""The HTTP API: one flask-smorest Api, one blueprint per resource."""

from __future__ import annotations

from flask import Flask

from recsvc.api import health, recommendations
from recsvc.api.errors import RecsvcApi


def init_app(app: Flask) -> RecsvcApi:
    api = RecsvcApi(app)
    api.register_blueprint(health.blp)
    api.register_blueprint(recommendations.blp)
    return api
