"""Recommendations for the customer on the line."""

from __future__ import annotations

from flask import Response, current_app, g
from flask.views import MethodView
from flask_smorest import Blueprint

from recsvc.api.schemas import MAX_ID, RecommendationArgsSchema, RecommendationsSchema
from recsvc.errors import InvalidInput
from recsvc.recommend import RecommendationQuery

blp = Blueprint("recommendations", __name__, url_prefix="/v1", description="Suggestions for a customer")


def _customer_id(customer_id: str) -> str:
    if not 0 < len(customer_id) <= MAX_ID:
        raise InvalidInput(f"customer_id must have 1 to {MAX_ID} characters")
    return customer_id


@blp.route("/customers/<customer_id>/recommendations")
class CustomerRecommendations(MethodView):
    @blp.arguments(RecommendationArgsSchema, location="query")
    @blp.response(200, RecommendationsSchema)
    def get(self, args: dict, customer_id: str):
        """Suggestions for one customer: personal, else from context, else popular; never an empty list
        while the catalog has anything left to suggest."""
        query = RecommendationQuery(customer_id=_customer_id(customer_id), limit=args["limit"],
                                    strategy=args.get("strategy"), exclude=tuple(args["exclude"]),
                                    category=args.get("category"), include_owned=args["include_owned"])
        body, _hit = current_app.extensions["recsvc"].recommender.recommend(query, g.request_id)
        return Response(body, mimetype="application/json")
