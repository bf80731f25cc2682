"""POST /v1/feedback and POST /v1/events: validation, durability, idempotency, and owned items in real time."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import pytest

from recsvc.cache import event_stream_key
from recsvc.event_log import EVENT, FEEDBACK
from recsvc.experiment_report import report_for
from recsvc.experiments import load_experiments
from tests.test_experiments import SERVED, start_app, stop_app, write_definitions

GOOD = {"request_id": "0123456789abcdef", "customer_id": "c-1", "item_id": "SKU-1", "action": "accepted"}


@pytest.fixture
def redis_app(settings, redis_url, redis_client, tmp_path):
    app = start_app(dataclasses.replace(settings, redis_url=redis_url, spool_dir=tmp_path / "spool"))
    yield app
    stop_app(app)


def stream(redis_client, kind: str) -> list[dict]:
    import orjson

    return [orjson.loads(fields[b"r"]) for _id, fields in redis_client.xrange(event_stream_key(kind))]


def test_feedback_is_answered_202_and_kept_in_the_stream(redis_app, redis_client, auth):
    response = redis_app.test_client().post("/v1/feedback", headers=auth, json={**GOOD, "agent_id": "agent-7"})
    assert response.status_code == 202 and response.get_json() == {"accepted": 1}
    [record] = stream(redis_client, FEEDBACK)
    assert {k: record[k] for k in (*GOOD, "agent_id", "kind")} == {**GOOD, "agent_id": "agent-7", "kind": FEEDBACK}


def test_the_same_feedback_posted_twice_is_kept_once(redis_app, redis_client, auth):
    client = redis_app.test_client()
    for body in (GOOD, GOOD, {**GOOD, "action": "purchased"}):
        assert client.post("/v1/feedback", headers=auth, json=body).status_code == 202
    assert [r["action"] for r in stream(redis_client, FEEDBACK)] == ["accepted", "purchased"]


@pytest.mark.parametrize("body, field", [
    ({**GOOD, "action": "liked"}, "action"),
    ({k: v for k, v in GOOD.items() if k != "customer_id"}, "customer_id"),
    ({**GOOD, "item_id": "x" * 129}, "item_id"),
    ({**GOOD, "request_id": "has spaces"}, "request_id"),
    ({**GOOD, "colour": "red"}, "colour"),
])
def test_bad_feedback_is_a_400_naming_the_field(redis_app, redis_client, auth, body, field):
    response = redis_app.test_client().post("/v1/feedback", headers=auth, json=body)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request" and field in error["details"]["fields"]
    assert stream(redis_client, FEEDBACK) == []


def test_feedback_that_is_not_json_or_has_no_key_is_refused(redis_app, auth):
    client = redis_app.test_client()
    response = client.post("/v1/feedback", headers={**auth, "Content-Type": "application/json"}, data="{oops")
    assert response.status_code == 400 and set(response.get_json()) == {"error"}
    assert client.post("/v1/feedback", json=GOOD).status_code == 401


def test_without_redis_and_without_a_writable_spool_feedback_is_a_503_not_a_false_202(settings, tmp_path, auth):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x", encoding="utf-8")
    app = start_app(dataclasses.replace(settings, spool_dir=blocker / "spool"))
    try:
        response = app.test_client().post("/v1/feedback", headers=auth, json=GOOD)
    finally:
        stop_app(app)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "event_log_unavailable"


def test_without_redis_the_spool_is_the_log_and_the_report_reads_it(settings, tmp_path, auth):
    definitions = write_definitions(tmp_path / "experiments.json", SERVED)
    app = start_app(dataclasses.replace(settings, spool_dir=tmp_path / "spool", experiments_path=definitions))
    client = app.test_client()
    try:
        body = client.get("/v1/customers/c-9/recommendations", headers=auth).get_json()
        client.post("/v1/feedback", headers=auth, json={**GOOD, "request_id": body["request_id"],
                                                         "customer_id": "c-9"})
        client.post("/v1/feedback", headers=auth, json={**GOOD, "request_id": "unknown-request"})
        report = client.get("/v1/experiments/als-vs-pop/report", headers=auth).get_json()
    finally:
        stop_app(app)
    [row] = [r for r in report["variants"] if r["name"] == body["experiment"]["variant"]]
    assert (row["customers_exposed"], row["customers_accepted"]) == (1, 1)
    assert report["feedback_unmatched"] == 1
    service_log = app.extensions["recsvc"].event_log
    offline = report_for(load_experiments(definitions).get("als-vs-pop"), service_log.read("exposure"),
                         service_log.read(FEEDBACK))
    assert offline["variants"] == report["variants"]


def test_report_of_an_unknown_experiment_is_a_404(redis_app, auth):
    response = redis_app.test_client().get("/v1/experiments/nope/report", headers=auth)
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "not_found"


# --- events ------------------------------------------------------------------


def test_events_are_kept_as_a_bare_list_or_under_events(redis_app, redis_client, auth):
    client = redis_app.test_client()
    bare = [{"customer_id": "c-1", "item_id": "SKU-1", "event_type": "view", "timestamp": "2026-11-01T10:00:00Z"},
            {"customer_id": "c-1", "item_id": "SKU-2", "event_type": "click", "timestamp": 1_790_000_000}]
    assert client.post("/v1/events", headers=auth, json=bare).get_json() == {"accepted": 2}
    wrapped = {"events": [{"customer_id": "c-2", "item_id": "SKU-3", "event_type": "purchase"}]}
    assert client.post("/v1/events", headers=auth, json=wrapped).status_code == 202
    untyped = [{"customer_id": "c-3", "item_id": "SKU-4"}]  # event_type is optional, as in an interactions file
    assert client.post("/v1/events", headers=auth, json=untyped).get_json() == {"accepted": 1}
    records = stream(redis_client, EVENT)
    iso = dt.datetime(2026, 11, 1, 10, tzinfo=dt.timezone.utc).timestamp()
    assert [(r["customer_id"], r["item_id"], r["event_type"], r["timestamp"]) for r in records] == [
        ("c-1", "SKU-1", "view", iso), ("c-1", "SKU-2", "click", 1_790_000_000.0), ("c-2", "SKU-3", "purchase", None),
        ("c-3", "SKU-4", None, None)]
    assert len({r["event_id"] for r in records}) == 4


@pytest.mark.parametrize("body", [
    [{"customer_id": "c-1", "item_id": "SKU-1", "event_type": "view", "timestamp": "last tuesday"}],
    [{"customer_id": "c-1", "item_id": "SKU-1", "timestamp": time.time() + 2 * 86_400}],  # the trainer would drop it
    [{"customer_id": "c-1", "item_id": "SKU-1", "event_type": "view", "timestamp": True}],
    [{"customer_id": "c-1", "event_type": "view"}],
    [{"customer_id": "c-1", "item_id": "SKU-1", "event_type": ""}],
    [],
    [{"customer_id": "c-1", "item_id": "SKU-1", "event_type": "view"}] * 501,
    {"events": "nope"},
    *([{"customer_id": "c-1", "item_id": "SKU-1", "weight": weight}] for weight in (0, -1, "2", True, 1e10, None)),
    *([{"customer_id": "c-1", "item_id": "SKU-1", "event_id": event_id}] for event_id in ("", "has spaces", "x" * 65,
                                                                                         "e\n", 7)),
])
def test_bad_events_are_a_400_and_nothing_is_kept(redis_app, redis_client, auth, body):
    response = redis_app.test_client().post("/v1/events", headers=auth, json=body)
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_request"
    assert stream(redis_client, EVENT) == []


def test_an_event_makes_the_item_owned_for_suggestions_straight_away(redis_app, auth, demo_paths):
    client = redis_app.test_client()
    customer = demo_paths["interactions"].read_text().splitlines()[1].split(",")[0].strip('"')
    url = f"/v1/customers/{customer}/recommendations?limit=5"
    before = [i["item_id"] for i in client.get(url, headers=auth).get_json()["items"]]
    client.get(url, headers=auth)  # cached now
    response = client.post("/v1/events", headers=auth,
                           json=[{"customer_id": customer, "item_id": before[0], "event_type": "purchase"}])
    assert response.status_code == 202
    after = [i["item_id"] for i in client.get(url, headers=auth).get_json()["items"]]
    assert before[0] not in after and len(after) == 5


def test_recent_items_are_shared_through_redis_by_every_instance(redis_app, settings, redis_url, tmp_path, auth):
    redis_app.test_client().post("/v1/events", headers=auth,
                                 json=[{"customer_id": "c-5", "item_id": "SKU-9", "event_type": "view"}])
    other = start_app(dataclasses.replace(settings, redis_url=redis_url, spool_dir=tmp_path / "other"))
    try:
        assert other.extensions["recsvc"].recent_items.get("c-5") == {"SKU-9"}
    finally:
        stop_app(other)


def test_an_event_posted_again_with_its_event_id_is_kept_once(redis_app, redis_client, auth):
    client = redis_app.test_client()
    event = {"customer_id": "c-1", "item_id": "SKU-1", "event_type": "add_to_cart", "weight": 2.5,
             "event_id": "7f3e2a10-retry.1"}
    for _attempt in range(2):  # the client did not get the first answer and retries
        assert client.post("/v1/events", headers=auth, json=[event]).get_json() == {"accepted": 1}
    anonymous = {"customer_id": "c-1", "item_id": "SKU-1", "event_type": "view"}
    for _post in range(2):  # no event_id: two posts are two events, as before
        assert client.post("/v1/events", headers=auth, json=[anonymous]).status_code == 202
    records = stream(redis_client, EVENT)
    assert [(r["event_id"], r["event_type"], r.get("weight")) for r in records[:1]] == [
        ("7f3e2a10-retry.1", "add_to_cart", 2.5)]
    assert [r["event_type"] for r in records] == ["add_to_cart", "view", "view"]
    assert len({r["event_id"] for r in records}) == 3
