"""The Flask application factory."""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache

from flask import Flask, g, request

from recsvc import __version__, logs, metrics
from recsvc.cache import Cache, LocalCache, make_cache, make_local_cache
from recsvc.config import Settings
from recsvc.event_log import EventLog, RecentItems
from recsvc.event_log import from_settings as event_log_from_settings
from recsvc.experiments import ExperimentRouter
from recsvc.experiments import from_settings as experiments_from_settings
from recsvc.model_store import ModelStore
from recsvc.recommend import Recommender, check_serves, new_request_id

REQUEST_ID_HEADER = "X-Request-ID"
access_log = logging.getLogger("recsvc.access")
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")


class RecsvcFlask(Flask):
    """Flask that asks once per function whether it is a coroutine: Flask asks for every hook and view on
    every request, which costs more than some of the hooks themselves."""

    _is_async: dict = {}

    def ensure_sync(self, func):
        target = getattr(func, "__func__", func)  # a MethodView's bound method is new on every request
        is_async = self._is_async.get(target)
        if is_async is None:
            is_async = self._is_async[target] = inspect.iscoroutinefunction(func)
        return super().ensure_sync(func) if is_async else func

    def make_default_options_response(self):
        """OPTIONS: 204 and the Allow header, without Flask's empty text/html body."""
        response = super().make_default_options_response()
        response.status_code = 204
        del response.headers["Content-Type"]
        return response


@dataclass
class Service:
    """What a request handler can reach: one per app, shared by its threads."""

    settings: Settings
    store: ModelStore
    cache: Cache
    recommender: Recommender
    experiments: ExperimentRouter | None = None
    event_log: EventLog | None = None
    recent_items: RecentItems | None = None


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app. Settings come from RECSVC_* variables unless given (tests give them)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    settings = settings or Settings.from_env()
    logs.configure(os.environ.get("RECSVC_LOG_LEVEL", "info"))
    app = RecsvcFlask(__name__)
    app.url_map.merge_slashes = False  # "/v1//x" is a 404 in JSON, not werkzeug's HTML redirect to "/v1/x"
    app.config.update(
        API_TITLE="recsvc",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
    )
    store = ModelStore(settings.registry, settings.reload_interval, check=check_serves)
    store.refresh()  # load before serving; under gunicorn --preload workers inherit the mapped arrays
    cache = make_cache(settings)
    # Recent items live in shared memory for all workers: beside the lists without Redis, in a table of their
    # own with it (every worker must know them while Redis is down, full or refusing us).
    shared = cache if isinstance(cache, LocalCache) else make_local_cache(settings)
    event_log, recent_items = event_log_from_settings(settings, shared=shared)
    # A bad definitions file stops start-up here; a changed file is checked against the served model's strategies.
    router = experiments_from_settings(settings, event_log, lambda: store.bundle.scorers if store.bundle else None)
    store.also_check.append(router.refresh)  # a changed file is re-read at the reload interval
    recommender = Recommender(store, cache, settings.cache_ttl, experiments=router, recent_items=recent_items)
    app.extensions["recsvc"] = Service(settings, store, cache, recommender, router, event_log, recent_items)

    app.before_request(_assign_request_id)
    app.after_request(_echo_request_id)
    app.after_request(_record_request)
    from recsvc.api import auth, cors, init_app

    cors.init_app(app)  # before the key check: a browser's preflight carries no key
    auth.init_app(app)
    from recsvc.api.request_form import check_request_form

    app.before_request(check_request_form)  # after the key check: 401 comes first
    init_app(app)
    from recsvc.api.fast_path import RecommendationsFastPath

    app.wsgi_app = RecommendationsFastPath(app, app.wsgi_app)
    return app


def warm_up(app: Flask, rounds: int = 10) -> None:
    """Run requests of the usual kinds through the app in gunicorn's master, before it forks the workers.

    Code run for the first time writes to objects the workers would share with the master
    (Python 3.11 specialises bytecode in place; first requests build lazy state), so each
    worker would copy those pages; run in the master, they stay shared: 2-3 MiB less private
    memory per worker (docs/operations.md, Memory). It leaves no trace: a scratch cache, no
    experiments, recent items or rate-limit tokens, no access lines, metrics taken back.
    """
    service: Service = app.extensions["recsvc"]
    recommender = service.recommender
    saved = (service.cache, recommender.experiments, recommender.recent_items, recommender.computations)
    service.cache = recommender.cache = LocalCache(max_entries=64, max_bytes=256 * 1024)  # scratch, small
    recommender.experiments = recommender.recent_items = None
    access_log.disabled = True
    try:
        with metrics.taken_back():
            for _ in range(rounds):  # 3.11 specialises a function's bytecode after 8 calls
                _warm_up_requests(app, service)
    except Exception:  # noqa: BLE001 — a failed warm-up costs memory, never the start
        logging.getLogger(__name__).warning("warm-up before forking the workers failed", exc_info=True)
    finally:
        access_log.disabled = False
        service.cache = recommender.cache = saved[0]
        recommender.experiments, recommender.recent_items, recommender.computations = saved[1:]
        if app.extensions.get("recsvc.rate_limiter"):
            app.extensions["recsvc.rate_limiter"].clear()


def _warm_up_requests(app: Flask, service: Service) -> None:
    client = app.test_client()
    keys = sorted(service.settings.api_keys | service.settings.admin_keys)
    auth = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    bundle = service.store.current()
    known = bundle.customers.external(0) if bundle is not None and len(bundle.customers) else "warm-up"
    item = bundle.items.external(0) if bundle is not None and len(bundle.items) else "warm-up"
    client.get("/healthz")
    client.get("/readyz")
    if bundle is not None:  # without a model these would only log "no model version is loaded yet"
        for customer in (known, "warm-up-unknown-customer"):
            client.get(f"/v1/customers/{customer}/recommendations?limit=10", headers=auth)  # computed, then cached
            client.get(f"/v1/customers/{customer}/recommendations?limit=10", headers=auth)
        client.post(f"/v1/customers/{known}/recommendations", json={"limit": 5}, headers=auth)
        client.get(f"/v1/items/{item}/similar?limit=5", headers=auth)
    client.get(f"/v1/customers/{known}/recommendations?limit=0", headers=auth)  # 400
    if not service.settings.auth_disabled:
        client.get(f"/v1/customers/{known}/recommendations")  # 401 (with RECSVC_AUTH=off: a request like the above)


def request_id_for(supplied: str) -> str:
    """The client's X-Request-ID when it is a sensible id, else a new one."""
    return supplied if _CLIENT_REQUEST_ID.fullmatch(supplied) else new_request_id()


def record_request(endpoint: str | None, method: str, path: str, status: int, seconds: float) -> None:
    """Latency and status into the metrics, and one JSON access line (with the request id, see recsvc.logs)."""
    metrics.observe_request(endpoint, method, status, seconds)
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("%s %s %s", method, path, status,
                        extra={"status": status, "duration_ms": round(seconds * 1000, 3), "endpoint": endpoint})


def _assign_request_id() -> None:
    g.started = time.perf_counter()
    g.request_id = request_id_for(request.headers.get(REQUEST_ID_HEADER, ""))


@lru_cache(maxsize=None)  # one entry per route
def endpoint_label(rule: str) -> str:
    """The route template as the metrics and access lines name it, without converter names:
    "/v1/customers/<id:customer_id>/recommendations" is "/v1/customers/<customer_id>/recommendations"."""
    return _CONVERTER.sub("<", rule)


_CONVERTER = re.compile(r"<[^:<>]+:")


def _record_request(response):
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    endpoint = endpoint_label(request.url_rule.rule) if request.url_rule is not None else None
    record_request(endpoint, request.method, request.path, response.status_code, seconds)
    return response


def _echo_request_id(response):
    response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
    return response
