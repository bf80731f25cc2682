"""Request and response schemas of the API; they validate input and generate the OpenAPI document."""

from __future__ import annotations

import re

import marshmallow as ma
from marshmallow import validate
from webargs.fields import DelimitedList
from webargs.flaskparser import abort
from werkzeug.routing import PathConverter

MAX_ID = 128
MAX_LIST = 100
MAX_LIMIT = 100  # items in one list
DEFAULT_LIMIT = 10
MAX_STRATEGY = 64  # characters of a strategy name

class IdField(ma.fields.String):
    """An id as the trainer reads it: whitespace around it is not part of it (" C1 " is C1)."""

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).strip()


class WholeMatch(validate.Regexp):
    """A pattern the whole value must match. The pattern also goes into the OpenAPI document, so write it in the
    syntax Python and ECMA-262 (JSON Schema's regexes) share, anchored with ^ and $ (no \\Z): matched with
    fullmatch, "$" does not let a final newline through as re.match would."""

    def __call__(self, value):
        if self.regex.fullmatch(value) is None:
            raise ma.ValidationError(self._format_error(value))
        return value


# No id holds one, wherever it is sent (path, query, body); the trainer drops rows whose ids do.
CONTROL_CHARACTERS = r"\x00-\x1f\x7f"
NO_CONTROL_CHARACTERS = f"^[^{CONTROL_CHARACTERS}]*$"
_ID_VALIDATORS = [validate.Length(min=1, max=MAX_ID),
                  WholeMatch(NO_CONTROL_CHARACTERS, error="holds a control character (such as a newline or NUL), "
                                                          "which no id may hold")]
Id = lambda **kw: IdField(validate=_ID_VALIDATORS, **kw)  # noqa: E731
_PATH_ID = Id()


def path_id(raw: str, name: str) -> str:
    """An id from the path, read like a body's id (Id): trimmed, 1 to MAX_ID characters; a malformed one is the
    same 400 as a malformed body field, naming `name` under details.fields."""
    try:
        return _PATH_ID.deserialize(raw)
    except ma.ValidationError as error:
        abort(422, message=f"{name} must have 1 to {MAX_ID} characters besides surrounding spaces",
              messages={"path": {name: error.messages}})


class PathIdConverter(PathConverter):
    """`<id:name>`: an id in the path, which may hold '/' (sent as %2F, which gunicorn and werkzeug decode before
    routing). Whatever lies between the route's fixed parts is the id, a leading, trailing or doubled '/'
    included (werkzeug's `path` takes none at the start); path_id then reads it. Every route with an id ends in a
    fixed part (/recommendations, /similar), so the id's end is never in doubt."""

    regex = r"[\s\S]+?"  # a newline too: request_form answers a control character with its 400, not a 404
    part_isolating = False  # werkzeug would take a regex without '/' in it for one that matches no '/'


def path_id_parameter(name: str, description: str) -> dict:
    """The OpenAPI description of an id in the path, as path_id reads it (werkzeug's converter says only
    minLength 1)."""
    return {"in": "path", "name": name,
            "description": f"{description}; surrounding whitespace is not part of it, and a '/' in it is sent as %2F",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": NO_CONTROL_CHARACTERS}}


class QueryInteger(ma.fields.Integer):
    """A whole number written in ASCII digits. marshmallow's Integer takes what int() takes, which includes
    "1_0", "+5", " 5" and other scripts' digits ("\u0665")."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) and not _DIGITS.fullmatch(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


_DIGITS = re.compile(r"-?[0-9]{1,12}")


class BodySchema(ma.Schema):
    """A JSON body, or an entry of one: an object (marshmallow's own word for anything else is "Invalid input
    type.")."""

    error_messages = {"type": "expected a JSON object"}


class RecommendationArgsSchema(ma.Schema):
    """Query string of GET /v1/customers/{customer_id}/recommendations."""

    limit = QueryInteger(load_default=DEFAULT_LIMIT, validate=validate.Range(min=1, max=MAX_LIMIT),
                         metadata={"description": "How many items to return (1-100)"})
    strategy = ma.fields.String(validate=validate.Length(min=1, max=MAX_STRATEGY),
                                metadata={"description": "A strategy of the current model; default: the model's best"})
    exclude = DelimitedList(Id(), load_default=list, validate=validate.Length(max=MAX_LIST),
                            metadata={"description": "Comma list of item ids never to suggest"})
    category = ma.fields.String(validate=validate.Length(min=1, max=MAX_ID),
                                metadata={"description": "Only items of this catalog category"})
    include_owned = ma.fields.Boolean(load_default=False,
                                      metadata={"description": "Also suggest items the customer already has"})


MAX_BATCH = 50  # customers in one batch call: bounds the time one request can hold a worker

_LIMIT = dict(load_default=DEFAULT_LIMIT, validate=validate.Range(min=1, max=MAX_LIMIT),
              metadata={"description": "How many items to return (1-100)"})
_STRATEGY = dict(validate=validate.Length(min=1, max=64),
                 metadata={"description": "A strategy of the current model; default: the model's best"})
_CATEGORY = dict(validate=validate.Length(min=1, max=MAX_ID),
                 metadata={"description": "Only items of this catalog category"})


class RecommendationBodySchema(BodySchema):
    """Body of POST /v1/customers/{customer_id}/recommendations."""

    limit = ma.fields.Integer(strict=True, **_LIMIT)  # a JSON number: 2.5 is an error, not 2
    strategy = ma.fields.String(**_STRATEGY)
    exclude = ma.fields.List(Id(), load_default=list, validate=validate.Length(max=MAX_LIST),
                             metadata={"description": "Item ids never to suggest"})
    category = ma.fields.String(**_CATEGORY)
    context_items = ma.fields.List(Id(), load_default=list, validate=validate.Length(max=MAX_LIST),
                                   metadata={"description": "Items the customer is looking at or talking about now; "
                                                            "they steer suggestions for a customer the model "
                                                            "does not know yet"})
    include_owned = ma.fields.Boolean(load_default=False,
                                      metadata={"description": "Also suggest items the customer already has"})


class BatchRequestItemSchema(RecommendationBodySchema):
    customer_id = Id(required=True)


class BatchRequestSchema(BodySchema):
    """Body of POST /v1/recommendations/batch."""

    requests = ma.fields.List(ma.fields.Nested(BatchRequestItemSchema), required=True,
                              validate=validate.Length(min=1, max=MAX_BATCH),
                              metadata={"description": f"One entry per customer (at most {MAX_BATCH})"})


class SimilarArgsSchema(ma.Schema):
    """Query string of GET /v1/items/{item_id}/similar."""

    limit = QueryInteger(**_LIMIT)
    strategy = ma.fields.String(**_STRATEGY)
    category = ma.fields.String(**_CATEGORY)


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
    model_loaded_at = ma.fields.String(allow_none=True, metadata={"description": "When this worker loaded it"})
    model_age_seconds = ma.fields.Float(allow_none=True, metadata={"description": "Seconds since it was trained"})
    cache = ma.fields.Dict(required=True)
    last_load_failure = ma.fields.Dict(allow_none=True, metadata={
        "description": "The last version refused (failed to load or validate) while the served one kept serving"})
    experiments = ma.fields.Dict(allow_none=True, metadata={
        "description": "The experiment definitions this worker uses (digest, loaded_at) and the refused "
                       "experiments file (last_failure) while they keep serving; null without RECSVC_EXPERIMENTS"})


class BatchResponseSchema(ma.Schema):
    request_id = ma.fields.String(required=True)
    results = ma.fields.List(ma.fields.Nested(RecommendationsSchema), required=True,
                             metadata={"description": "One answer per request entry, in the same order"})


class SimilarItemsSchema(ma.Schema):
    item_id = ma.fields.String(required=True)
    request_id = ma.fields.String(required=True)
    model_version = ma.fields.String(required=True)
    strategy = ma.fields.String(required=True)
    items = ma.fields.List(ma.fields.Nested(RecommendedItemSchema), required=True)


class ModelSchema(ma.Schema):
    model_version = ma.fields.String(required=True)
    created_at = ma.fields.String(allow_none=True, required=True)
    loaded_at = ma.fields.String(allow_none=True, required=True, metadata={"description": "When this server loaded it"})
    default_strategy = ma.fields.String(required=True)
    strategies = ma.fields.Dict(required=True, metadata={"description": "Per strategy: parameters and offline metrics"})
    evaluation = ma.fields.Dict(allow_none=True, metadata={"description": "How the offline metrics were measured"})
    data = ma.fields.Dict(allow_none=True, metadata={"description": "Counts of the training data"})


class ReloadSchema(ma.Schema):
    changed = ma.fields.Boolean(required=True, metadata={"description": "A new version was swapped in"})
    model_version = ma.fields.String(allow_none=True, required=True)
    previous_version = ma.fields.String(allow_none=True, required=True)
    last_load_failure = ma.fields.Dict(allow_none=True, required=True)
    experiments = ma.fields.Dict(allow_none=True, required=True, metadata={
        "description": "The experiments file, re-read now: changed (new definitions swapped in), digest, loaded_at, "
                       "last_failure; null without RECSVC_EXPERIMENTS"})
