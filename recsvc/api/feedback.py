"""What happened to suggestions (POST /v1/feedback) and new customer interactions (POST /v1/events)."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict

import marshmallow as ma
from flask import current_app
from flask.views import MethodView
from marshmallow import validate

from recsvc.api.parsing import Blueprint
from recsvc.api.schemas import BodySchema, Id, WholeMatch
from recsvc.event_log import EVENT, EVENT_TIME_MAX_AHEAD_SECONDS, FEEDBACK, parse_event_time
from recsvc.experiment_report import ACTIONS

blp = Blueprint("feedback", __name__, url_prefix="/v1", description="Feedback on suggestions and real-time events")

MAX_EVENTS = 500  # per call; the body limit (RECSVC_MAX_BODY_BYTES) applies as well


class Timestamp(ma.fields.Field):
    """ISO-8601 (UTC when no zone is given) or Unix seconds; at most a day ahead of this server's clock, as the
    trainer would drop it otherwise."""

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            seconds = parse_event_time(value)
        except ValueError as exc:
            raise ma.ValidationError(str(exc)) from None
        if seconds > time.time() + EVENT_TIME_MAX_AHEAD_SECONDS:
            raise ma.ValidationError("more than a day in the future of this server's clock")
        return seconds


class Number(ma.fields.Float):
    """A JSON number (marshmallow's Float would also take "2.5" and " 2" as text); finite."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


# A key the client makes up (feedback's request_id, an event's event_id): what a retry repeats to count once.
CLIENT_KEY = WholeMatch(r"^[A-Za-z0-9._-]{1,64}$", error="use 1-64 letters, digits, '.', '_' or '-'")
MAX_WEIGHT = 1e9


class FeedbackSchema(BodySchema):
    request_id = ma.fields.String(
        required=True, metadata={"description": "The request_id of the recommendations response"}, validate=CLIENT_KEY)
    customer_id = Id(required=True)
    item_id = Id(required=True)
    action = ma.fields.String(required=True, validate=validate.OneOf(ACTIONS))
    agent_id = Id(metadata={"description": "The agent who offered the suggestion"})


class EventSchema(BodySchema):
    customer_id = Id(required=True)
    item_id = Id(required=True)
    event_type = ma.fields.String(load_default=None, validate=validate.Length(min=1, max=64),
                                  metadata={"description": "e.g. view, click, add_to_cart, purchase; optional, as in "
                                                           "an interactions file"})
    timestamp = Timestamp(metadata={"description": "ISO-8601 or Unix seconds; default: when received",
                                    "oneOf": [{"type": "string"}, {"type": "number"}]})
    weight = Number(validate=validate.Range(min=0, max=MAX_WEIGHT, min_inclusive=False),
                    metadata={"description": "Positive, at most 1e9; multiplies the event type's weight in training, "
                                             "as an interactions file's weight column does (default 1)",
                              "exclusiveMinimum": True})  # OpenAPI 3.0's form; apispec leaves it out
    event_id = ma.fields.String(validate=CLIENT_KEY, metadata={
        "description": "The client's id of this event, unique across all events (a UUID, say): an event posted again "
                       "with the same event_id, a retry, is kept once. Default: a new id, so every post counts"})


class EventsSchema(BodySchema):
    events = ma.fields.List(ma.fields.Nested(EventSchema), required=True,
                            validate=validate.Length(min=1, max=MAX_EVENTS))

    @ma.pre_load
    def accept_bare_list(self, data, **_kw):
        return {"events": data} if isinstance(data, list) else data


class AcceptedSchema(ma.Schema):
    accepted = ma.fields.Integer(required=True, metadata={"description": "Records kept for good"})


@blp.route("/feedback")
class Feedback(MethodView):
    @blp.arguments(FeedbackSchema)
    @blp.response(202, AcceptedSchema)
    @blp.alt_response(503, description="Neither Redis nor the local spool could keep it; retry")
    def post(self, feedback: dict):
        """Record what happened to a suggestion. Kept durably (Redis Stream, or a local spool while Redis is
        down); posting the same request_id, customer, item and action again counts once."""
        record = {"kind": FEEDBACK, **feedback, "time": round(time.time(), 3)}
        current_app.extensions["recsvc"].event_log.append(record)
        return {"accepted": 1}


@blp.route("/events")
class Events(MethodView):
    @blp.arguments(EventsSchema)
    @blp.response(202, AcceptedSchema)
    @blp.alt_response(503, description="Neither Redis nor the local spool could keep them; retry")
    def post(self, body: dict):
        """New customer interactions (a list, or {"events": [...]}). Kept durably; their items count as the
        customer's own for suggestions straight away, and the customer's cached lists are dropped."""
        service = current_app.extensions["recsvc"]
        received = round(time.time(), 3)
        items_by_customer: dict[str, set[str]] = defaultdict(set)
        for event in body["events"]:
            # A client's event_id replaces the fresh one: a retry then has the natural key of the first post.
            record = {"kind": EVENT, "event_id": uuid.uuid4().hex, "timestamp": None, **event, "time": received}
            service.event_log.append(record)
            items_by_customer[event["customer_id"]].add(event["item_id"])
        for customer_id, items in items_by_customer.items():
            service.recent_items.add(customer_id, items)
            service.cache.invalidate_customer(customer_id)
        return {"accepted": len(body["events"])}
