"""Items like a given one, for "customers who chose this also chose" on the agent's screen."""

from __future__ import annotations

from flask import current_app, g

from recsvc.api.parsing import Blueprint
from recsvc.api.schemas import SimilarArgsSchema, SimilarItemsSchema, path_id, path_id_parameter

blp = Blueprint("items", __name__, url_prefix="/v1", description="Similar items")


@blp.route("/items/<id:item_id>/similar", parameters=[path_id_parameter("item_id", "The item to find others like")])
@blp.arguments(SimilarArgsSchema(), location="query")
@blp.response(200, SimilarItemsSchema)
@blp.alt_response(404, description="The item is not in the current model")
def similar(args: dict, item_id: str):
    """Active items most like this one, by the strategy's item similarity (best first), topped up with popular
    ones when fewer have a positive similarity; the item itself and inactive items are never listed."""
    body = current_app.extensions["recsvc"].recommender.similar(path_id(item_id, "item_id"), args["limit"],
                                                                 args.get("strategy"),
                                                                 args.get("category"))
    return {"request_id": g.request_id, **body}
