"""The Flask application factory."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from flask import Flask, g, request

from recsvc import __version__
from recsvc.cache import Cache, make_cache
from recsvc.config import Settings
from recsvc.model_store import ModelStore
from recsvc.recommend import Recommender, new_request_id

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


@dataclass
class Service:
    """What a request handler can reach: one per app, shared by its threads."""

    settings: Settings
    store: ModelStore
    cache: Cache
    recommender: Recommender


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app. Settings come from RECSVC_* variables unless given (tests give them)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(
        API_TITLE="recsvc",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
    )
    store = ModelStore(settings.registry, settings.reload_interval)
    store.refresh()  # load before serving; under gunicorn --preload workers inherit the mapped arrays
    cache = make_cache(settings.redis_url, settings.redis_timeout, settings.local_cache_entries)
    app.extensions["recsvc"] = Service(settings, store, cache, Recommender(store, cache, settings.cache_ttl))

    app.before_request(_assign_request_id)
    app.after_request(_echo_request_id)
    from recsvc.api import auth, init_app

    auth.init_app(app)
    init_app(app)
    return app


def _assign_request_id() -> None:
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = supplied if _CLIENT_REQUEST_ID.match(supplied) else new_request_id()


def _echo_request_id(response):
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    return response
