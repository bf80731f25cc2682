"""Recommendations for the customer on the line, one at a time or several in one call."""

from __future__ import annotations

from flask import Response, current_app, g, request
from flask.views import MethodView

from recsvc.api.parsing import Blueprint
from recsvc.api.schemas import (
    BatchRequestSchema,
    BatchResponseSchema,
    RecommendationArgsSchema,
    RecommendationBodySchema,
    RecommendationsSchema,
    path_id,
    path_id_parameter,
)
from recsvc.recommend import RecommendationQuery

blp = Blueprint("recommendations", __name__, url_prefix="/v1", description="Suggestions for a customer")


def _query(customer_id: str, args: dict) -> RecommendationQuery:
    return RecommendationQuery(customer_id=customer_id, limit=args["limit"], strategy=args.get("strategy"),
                               exclude=tuple(args["exclude"]), category=args.get("category"),
                               context_items=tuple(args.get("context_items", ())),
                               include_owned=args["include_owned"])


def _json(body: bytes) -> Response:
    # The Recommender hands over finished JSON bytes (cached ones untouched): no re-serialisation here.
    return Response(body, mimetype="application/json")


@blp.route("/customers/<id:customer_id>/recommendations",
           parameters=[path_id_parameter("customer_id", "The customer on the line")])
class CustomerRecommendations(MethodView):
    @blp.arguments(RecommendationArgsSchema(), location="query")
    @blp.response(200, RecommendationsSchema)
    def get(self, args: dict, customer_id: str):
        """Suggestions for one customer: personal, else from context, else popular; never an empty list
        while the catalog has anything left to suggest."""
        body, _hit = current_app.extensions["recsvc"].recommender.recommend(
            _query(path_id(customer_id, "customer_id"), args), g.request_id, expose=request.method != "HEAD")
        return _json(body)

    @blp.arguments(RecommendationBodySchema(), required=False)  # no body: every field has its default
    @blp.response(200, RecommendationsSchema)
    def post(self, args: dict, customer_id: str):
        """The same with a JSON body, which can also carry `context_items`: what the customer is looking at
        now. A customer the model does not know gets suggestions from those items (`source: context`)."""
        body, _hit = current_app.extensions["recsvc"].recommender.recommend(
            _query(path_id(customer_id, "customer_id"), args), g.request_id)
        return _json(body)


@blp.route("/recommendations/batch")
class BatchRecommendations(MethodView):
    @blp.arguments(BatchRequestSchema())
    @blp.response(200, BatchResponseSchema)
    def post(self, args: dict):
        """Suggestions for several customers in one call (at most 50), answered in the order asked."""
        queries = [_query(entry["customer_id"], entry) for entry in args["requests"]]
        return _json(current_app.extensions["recsvc"].recommender.recommend_batch(queries, g.request_id))
