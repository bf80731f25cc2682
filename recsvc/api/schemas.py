"""Request and response schemas of the API; they validate input and generate the OpenAPI document."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import validate
from webargs.fields import DelimitedList

MAX_ID = 128
MAX_LIST = 100

Id = lambda **kw: ma.fields.String(validate=validate.Length(min=1, max=MAX_ID), **kw)  # noqa: E731


class RecommendationArgsSchema(ma.Schema):
    """Query string of GET /v1/customers/{customer_id}/recommendations."""

    limit = ma.fields.Integer(load_default=10, validate=validate.Range(min=1, max=100),
                              metadata={"description": "How many items to return (1-100)"})
    strategy = ma.fields.String(validate=validate.Length(min=1, max=64),
                                metadata={"description": "A strategy of the current model; default: the model's best"})
    exclude = DelimitedList(Id(), load_default=list, validate=validate.Length(max=MAX_LIST),
                            metadata={"description": "Comma list of item ids never to suggest"})
    category = ma.fields.String(validate=validate.Length(min=1, max=MAX_ID),
                                metadata={"description": "Only items of this catalog category"})
    include_owned = ma.fields.Boolean(load_default=False,
                                      metadata={"description": "Also suggest items the customer already has"})


class ExperimentRefSchema(ma.Schema):
    name = ma.fields.String(required=True)
    variant = ma.fields.String(required=True)


class RecommendedItemSchema(ma.Schema):
    item_id = ma.fields.String(required=True)
    score = ma.fields.Float(required=True)
    title = ma.fields.String()
    category = ma.fields.String()
    reasons = ma.fields.List(ma.fields.String(), required=True,
                             metadata={"description": "Why this item, in words an agent can say aloud"})


class RecommendationsSchema(ma.Schema):
    customer_id = ma.fields.String(required=True)
    request_id = ma.fields.String(required=True)
    model_version = ma.fields.String(required=True)
    strategy = ma.fields.String(required=True)
    source = ma.fields.String(required=True, validate=validate.OneOf(["personal", "context", "popular"]),
                              metadata={"description": "Which step of the fallback chain answered first"})
    experiment = ma.fields.Nested(ExperimentRefSchema, allow_none=True, required=True)
    items = ma.fields.List(ma.fields.Nested(RecommendedItemSchema), required=True)


class HealthSchema(ma.Schema):
    status = ma.fields.String(required=True)


class ReadinessSchema(ma.Schema):
    status = ma.fields.String(required=True)
    model_version = ma.fields.String(allow_none=True, required=True)
    cache = ma.fields.Dict(required=True)
    last_load_failure = ma.fields.Dict(allow_none=True)
