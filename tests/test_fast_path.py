"""The fast path of the plain recommendations GET (recsvc/api/fast_path.py) answers exactly as Flask does, or leaves
the request to Flask."""

from __future__ import annotations

import dataclasses
import io
import logging
from urllib.parse import parse_qsl

import orjson
import pytest
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from werkzeug.test import Client

from recsvc.api.fast_path import ROUTE, parse_query
from recsvc.api.schemas import RecommendationArgsSchema
from recsvc.app import create_app
from recsvc.artifacts import load_current
from recsvc.event_log import EXPOSURE
from recsvc.logs import JsonFormatter
from tests.conftest import ADMIN_KEY, API_KEY
from tests.test_experiments import SERVED, stop_app, write_definitions

AUTH = {"Authorization": f"Bearer {API_KEY}"}


class FrozenClock:
    def __call__(self) -> float:
        return 1000.0


class Paths:
    """One app seen through both doors: `fast` goes through the middleware, `flask` straight to Flask."""

    def __init__(self, app):
        self.app = app
        self.fast = FlaskClient(app)
        self.flask = Client(app.wsgi_app.flask_app)
        self.middleware = app.wsgi_app

    def exchange(self, door: str, url: str, headers: dict | None = None) -> tuple:
        """(status, headers, body, answered by the fast path) of one GET through `door`."""
        answered = self.middleware.answered
        response = getattr(self, door).get(url, headers=headers or {})
        return (response.status_code, list(response.headers.items()), response.get_data(),
                self.middleware.answered - answered)

    def both(self, url: str, headers: dict | None = None, prime: bool = True) -> tuple[tuple, tuple]:
        """The same request through Flask, then through the fast path (after one request that caches the list)."""
        if prime:
            self.exchange("fast", url, headers)
        flask = self.exchange("flask", url, headers)
        return flask, self.exchange("fast", url, headers)


@pytest.fixture
def paths(app):
    return Paths(app)


@pytest.fixture(scope="module")
def bundle(trained_registry):
    return load_current(trained_registry)


def customer(bundle, index: int = 3) -> str:
    return bundle.customers.external(index)


def request_id(n: int) -> dict:
    return {**AUTH, "X-Request-ID": f"req-fast-path-{n:04d}"}


def plain_queries(bundle) -> list[str]:
    items = [bundle.items.external(i) for i in range(3)]
    category = str(bundle.catalog.category[0])
    return ["", "limit=5", "limit=1", "limit=100", "strategy=popular", "strategy=als&limit=3",
            f"exclude={items[0]}", f"exclude={','.join(items)}&limit=4", "include_owned=true", "include_owned=0",
            f"category={category}&limit=2&include_owned=false"]


def test_hits_are_answered_by_the_fast_path_exactly_as_flask_answers_them(paths, bundle):
    for n, query in enumerate(plain_queries(bundle)):
        url = f"/v1/customers/{customer(bundle)}/recommendations?{query}"
        flask, fast = paths.both(url, request_id(n))
        assert flask[0] == 200 and flask[3] == 0, query
        assert fast[3] == 1, f"not answered by the fast path: {query}"
        assert fast[:3] == flask[:3], query
        assert dict(fast[1])["X-Request-ID"] == f"req-fast-path-{n:04d}"


def test_without_a_client_request_id_each_answer_gets_a_new_one_in_header_and_body(paths, bundle):
    url = f"/v1/customers/{customer(bundle)}/recommendations"
    flask, fast = paths.both(url, {**AUTH, "X-Request-ID": "no spaces allowed"})
    ids = [dict(answer[1])["X-Request-ID"] for answer in (flask, fast)]
    assert fast[3] == 1 and ids[0] != ids[1] and all(len(i) == 32 for i in ids)
    assert [orjson.loads(answer[2])["request_id"] for answer in (flask, fast)] == ids
    assert fast[2].replace(ids[1].encode(), b"") == flask[2].replace(ids[0].encode(), b"")


def test_a_miss_is_computed_once_and_answered_as_flask_answers_it(paths, bundle):
    url = f"/v1/customers/{customer(bundle, 5)}/recommendations?limit=4"
    recommender, cache = paths.app.extensions["recsvc"].recommender, paths.app.extensions["recsvc"].cache
    computed = recommender.computations
    miss_fast = paths.exchange("fast", url, request_id(1))
    cache.invalidate_customer(customer(bundle, 5))
    miss_flask = paths.exchange("flask", url, request_id(1))
    assert miss_fast[3] == 1 and recommender.computations == computed + 2
    assert miss_fast[:3] == miss_flask[:3] and miss_fast[0] == 200


def test_a_failing_computation_is_left_to_flask_and_its_json_500(paths, bundle, monkeypatch):
    def broken(*_args):
        raise RuntimeError("scoring blew up")

    monkeypatch.setattr(paths.app.extensions["recsvc"].recommender, "compute", broken)
    flask, fast = paths.both(f"/v1/customers/{customer(bundle)}/recommendations", request_id(1), prime=False)
    assert fast[3] == 0 and fast == flask
    assert flask[0] == 500 and orjson.loads(flask[2])["error"]["code"] == "internal_error"


def test_without_a_model_the_503_comes_from_flask(paths, bundle, monkeypatch):
    monkeypatch.setattr(paths.app.extensions["recsvc"].store, "current", lambda: None)
    flask, fast = paths.both(f"/v1/customers/{customer(bundle)}/recommendations", request_id(1), prime=False)
    assert fast[3] == 0 and fast == flask and flask[0] == 503


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0000"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}, {"Authorization": "Bearer "}])
def test_missing_and_wrong_keys_get_flasks_401(paths, bundle, headers):
    url = f"/v1/customers/{customer(bundle)}/recommendations"
    paths.exchange("fast", url, AUTH)  # cached: a wrong key must not reach it
    flask, fast = paths.both(url, {**headers, "X-Request-ID": "req-fast-path-0001"}, prime=False)
    assert flask[0] == 401 and fast[3] == 0
    assert fast == flask


def test_an_admin_key_is_a_valid_key_here_too(paths, bundle):
    flask, fast = paths.both(f"/v1/customers/{customer(bundle)}/recommendations",
                             {"Authorization": f"Bearer {ADMIN_KEY}", "X-Request-ID": "req-fast-path-0001"})
    assert fast[3] == 1 and fast[:3] == flask[:3] and flask[0] == 200


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "limit=", "limit=010", "limit=5&limit=6",
                                   "exclude=a,,b", "exclude=" + ",".join(["i"] * 101), "exclude=" + "x" * 129,
                                   "strategy=nope", "strategy=" + "x" * 65, "category=" + "x" * 129,
                                   "include_owned=maybe", "include_owned=yes", "unknown=1", "limit=5&&", "limit=%35",
                                   "exclude=a%2Cb", "category=two+words", "limit=+5"])
def test_unusual_or_bad_queries_go_to_flask_and_get_its_answer(paths, bundle, query):
    url = f"/v1/customers/{customer(bundle)}/recommendations?{query}"
    paths.exchange("fast", url, request_id(0))  # whatever Flask caches for it
    flask, fast = paths.both(url, request_id(1), prime=False)
    assert fast[3] == 0
    assert fast == flask


@pytest.mark.parametrize("query", ["", "limit=7&strategy=popular&exclude=a,b&category=c&include_owned=1"])
def test_the_query_parser_agrees_with_the_schema(query):
    expected = RecommendationArgsSchema().load(dict(parse_qsl(query)))
    parsed = parse_query(query)
    assert {**parsed, "exclude": list(parsed["exclude"])} == expected


@pytest.mark.parametrize("method, url", [("HEAD", "/v1/customers/{c}/recommendations"),
                                         ("GET", "/v1/customers/{c}/recommendations/"),
                                         ("GET", "/v1//customers/{c}/recommendations"),
                                         ("GET", "/v1/customers/{c}/recommendations/extra"),
                                         ("POST", "/v1/customers/{c}/recommendations")])
def test_other_requests_on_and_around_the_route_go_to_flask(paths, bundle, method, url):
    url = url.format(c=customer(bundle))
    paths.exchange("fast", f"/v1/customers/{customer(bundle)}/recommendations", AUTH)
    answers = []
    for door in ("flask", "fast"):
        answered = paths.middleware.answered
        response = getattr(paths, door).open(url, method=method, headers=request_id(1))
        answers.append((response.status_code, list(response.headers.items()), response.get_data(),
                        paths.middleware.answered - answered))
    assert answers[1][3] == 0 and answers[0] == answers[1]


def test_rate_limit_counts_each_request_once_hit_or_miss_and_refusals_come_from_flask(settings, bundle):
    answers = {}
    for door in ("flask", "fast"):
        app = create_app(dataclasses.replace(settings, rate_limit=1.0, rate_burst=3))
        app.extensions["recsvc.rate_limiter"].clock = FrozenClock()  # no refill during the test
        paths = Paths(app)
        url = f"/v1/customers/{customer(bundle)}/recommendations?limit=3"
        # A miss, two hits, then refusals: one token per request.
        answers[door] = [paths.exchange(door, url, request_id(n)) for n in range(5)]
        app.extensions["recsvc"].store.stop()
    assert [a[0] for a in answers["fast"]] == [200, 200, 200, 429, 429]
    assert [a[3] for a in answers["fast"]] == [1, 1, 1, 0, 0]
    assert [a[:3] for a in answers["fast"]] == [a[:3] for a in answers["flask"]]


def _sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_a_fast_answer_as_flask_counts_its_own(paths, bundle):
    url = f"/v1/customers/{customer(bundle)}/recommendations"
    paths.exchange("fast", url, AUTH)
    counted = {}
    for door in ("flask", "fast"):
        before = [_sample("recsvc_request_seconds_count", endpoint=ROUTE, method="GET"),
                  _sample("recsvc_responses_total", endpoint=ROUTE, status="200"),
                  _sample("recsvc_cache_lookups_total", result="hit"),
                  _sample("recsvc_cache_lookups_total", result="miss")]
        paths.exchange(door, url, AUTH)
        after = [_sample("recsvc_request_seconds_count", endpoint=ROUTE, method="GET"),
                 _sample("recsvc_responses_total", endpoint=ROUTE, status="200"),
                 _sample("recsvc_cache_lookups_total", result="hit"),
                 _sample("recsvc_cache_lookups_total", result="miss")]
        counted[door] = [b - a for a, b in zip(before, after)]
    assert counted["fast"] == counted["flask"] == [1, 1, 1, 0]


def test_the_access_line_is_the_same_with_the_request_id(paths, bundle):
    access = logging.getLogger("recsvc.access")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        flask, fast = paths.both(f"/v1/customers/{customer(bundle)}/recommendations?limit=2", request_id(7))
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()][-2:]
    assert fast[3] == 1 and all(line.pop("time") and line.pop("duration_ms") >= 0 for line in lines)
    assert lines[0] == lines[1] == {"level": "info", "logger": "recsvc.access", "request_id": "req-fast-path-0007",
                                    "message": f"GET /v1/customers/{customer(bundle)}/recommendations 200",
                                    "status": 200, "endpoint": ROUTE}


@pytest.fixture
def experiment_app(settings, redis_url, redis_client, tmp_path):
    app = create_app(dataclasses.replace(settings, redis_url=redis_url, spool_dir=tmp_path / "spool",
                                         experiments_path=write_definitions(tmp_path / "experiments.json", SERVED)))
    yield app
    stop_app(app)


def test_with_an_experiment_running_hits_name_the_variant_and_record_the_exposure(experiment_app, bundle):
    paths = Paths(experiment_app)
    event_log = experiment_app.extensions["recsvc"].event_log
    expected = []
    for n in range(6):
        url = f"/v1/customers/{customer(bundle, n)}/recommendations"
        paths.exchange("fast", url, request_id(100 + n))  # caches the list
        flask = paths.exchange("flask", url, request_id(200 + n))
        fast = paths.exchange("fast", url, request_id(300 + n))
        assert fast[3] == 1 and fast[0] == flask[0] == 200
        assert fast[2].replace(b"req-fast-path-03", b"req-fast-path-02") == flask[2]
        variant = orjson.loads(fast[2])["experiment"]["variant"]
        expected += [(f"req-fast-path-{k + n:04d}", customer(bundle, n), variant) for k in (100, 200, 300)]
    # Every answer, cached or not, through either path, is one exposure with its own request id.
    assert sorted((r["request_id"], r["customer_id"], r["variant"]) for r in event_log.read(EXPOSURE)) == \
        sorted(expected)


def test_new_events_invalidate_the_cached_list_for_the_fast_path_too(experiment_app, bundle):
    paths = Paths(experiment_app)
    recommender = experiment_app.extensions["recsvc"].recommender
    url = f"/v1/customers/{customer(bundle)}/recommendations?limit=3&strategy=als"
    first = paths.exchange("fast", url, AUTH)
    computed = recommender.computations
    assert paths.exchange("fast", url, AUTH)[3] == 1 and recommender.computations == computed  # a hit
    top = orjson.loads(first[2])["items"][0]["item_id"]
    response = paths.fast.post("/v1/events", headers=AUTH,
                               json=[{"customer_id": customer(bundle), "item_id": top, "event_type": "purchase"}])
    assert response.status_code == 202
    after = paths.exchange("fast", url, AUTH)
    assert recommender.computations == computed + 1  # the cached list was dropped
    assert after[3] == 1 and top not in [item["item_id"] for item in orjson.loads(after[2])["items"]]
    assert paths.exchange("fast", url, AUTH)[3] == 1 and recommender.computations == computed + 1
