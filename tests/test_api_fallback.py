"""The fallback chain personal -> context -> popular, exactly, on a hand-made model with two taste groups."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc import artifacts
from recsvc.app import create_app
from recsvc.artifacts import Catalog, IdIndex, ModelBundle
from recsvc.config import Settings
from recsvc.scoring import FactorScorer, ItemSimilarityScorer, PopularityScorer
from tests.conftest import ADMIN_KEY, API_KEY

# Items i0-i2 are one taste ("Phones"), i3-i5 the other ("Fibre"); i6 is inactive but would win everywhere.
ITEMS = ["i0", "i1", "i2", "i3", "i4", "i5", "i6"]
ITEM_FACTORS = [[1.1, 0], [1.0, 0.1], [0.9, 0.3], [0, 1.0], [0.1, 0.9], [0.3, 0.8], [2.0, 2.0]]
POPULARITY = [1, 2, 3, 4, 5, 6, 100]
CATEGORIES = ["Phones"] * 3 + ["Fibre"] * 3 + ["Phones"]
# Item-KNN weights (row: the item the customer has, column: the item it speaks for).
KNN_WEIGHTS = {(0, 2): 0.6, (0, 1): 0.3, (3, 4): 0.9, (0, 6): 5.0}
# c0 owns i0 and likes phones; c1 is known to the model but owns nothing.
CUSTOMERS = {"c0": ([1.0, -0.5], [0]), "c1": ([0.0, 0.0], [])}


def tiny_bundle(version: str = "v1", window_days: float | None = None) -> ModelBundle:
    """The hand-made model; `window_days` makes its popularity a recent one (trending)."""
    owned = sp.lil_matrix((len(CUSTOMERS), len(ITEMS)), dtype=np.float32)
    for row, (_vector, items) in enumerate(CUSTOMERS.values()):
        for item in items:
            owned[row, item] = 1.0
    popularity = PopularityScorer(np.asarray(POPULARITY, dtype=np.float32), window_days=window_days)
    return ModelBundle(
        manifest={"version": version, "default_strategy": "als", "created_at": "2026-11-01T00:00:00+00:00",
                  "strategies": {"als": {"metrics": {"ndcg@10": 0.3}}, "knn": {"metrics": {"ndcg@10": 0.2}},
                                 "popular": {"metrics": {"ndcg@10": 0.1}}}},
        customers=IdIndex(artifacts.encode_ids(CUSTOMERS)),
        items=IdIndex(artifacts.encode_ids(ITEMS)),
        owned=owned.tocsr(),
        catalog=Catalog(np.array([f"Item {i[1:]}" for i in ITEMS]), np.array(CATEGORIES),
                        np.array([True] * 6 + [False])),
        scorers={"als": FactorScorer(np.asarray([v for v, _ in CUSTOMERS.values()], dtype=np.float32),
                                     np.asarray(ITEM_FACTORS, dtype=np.float32), regularization=0.1),
                 "knn": ItemSimilarityScorer(_knn_matrix()),
                 "popular": popularity},
    )


def _knn_matrix() -> sp.csr_matrix:
    rows, cols = zip(*KNN_WEIGHTS)
    return sp.csr_matrix((np.asarray(list(KNN_WEIGHTS.values()), dtype=np.float32), (rows, cols)),
                         shape=(len(ITEMS), len(ITEMS)))


def publish(registry, bundle: ModelBundle) -> None:
    artifacts.write_version(registry, bundle)
    artifacts.set_current(registry, bundle.version)


def tiny_settings(registry, **changes) -> Settings:
    """Settings for a hand-made registry (no trained model needed)."""
    return Settings(registry=registry, api_keys=frozenset({API_KEY}), admin_keys=frozenset({ADMIN_KEY}), **changes)


@pytest.fixture
def tiny_client(tmp_path):
    publish(tmp_path, tiny_bundle())
    app = create_app(tiny_settings(tmp_path))
    yield app.test_client()
    app.extensions["recsvc"].store.stop()


def ask(client, auth, customer: str, **body) -> dict:
    response = client.post(f"/v1/customers/{customer}/recommendations", json=body, headers=auth)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def ids(body: dict) -> list[str]:
    return [item["item_id"] for item in body["items"]]


def test_known_customer_is_answered_personally_with_reasons_naming_their_items(tiny_client, auth):
    body = ask(tiny_client, auth, "c0", limit=2)
    assert body["source"] == "personal" and ids(body) == ["i1", "i2"]
    assert [item["score"] for item in body["items"]] == pytest.approx([0.95, 0.75])
    assert body["items"][0]["reasons"] == ["Because the customer has Item 0 (i0)"]
    assert body["items"][0]["title"] == "Item 1" and body["items"][0]["category"] == "Phones"


def test_a_short_personal_list_is_topped_up_with_popular_items(tiny_client, auth):
    body = ask(tiny_client, auth, "c0", limit=4)
    assert body["source"] == "personal" and ids(body) == ["i1", "i2", "i5", "i4"]
    assert body["items"][2]["reasons"] == ["Popular with customers"]
    # Popularity (6, 5 customers) is scaled below the personal scores: the list's scores never increase.
    assert [item["score"] for item in body["items"]] == pytest.approx([0.95, 0.75, 0.75, 0.625])


def test_a_filter_that_empties_the_personal_step_leaves_it_to_popular(tiny_client, auth):
    body = ask(tiny_client, auth, "c0", limit=2, category="Fibre")
    assert body["source"] == "popular" and ids(body) == ["i5", "i4"]


def test_unknown_customer_with_context_items_is_answered_from_the_context(tiny_client, auth):
    body = ask(tiny_client, auth, "walk-in", limit=3, context_items=["i3"])
    # i4, i5 go with i3; i3 itself is on screen already, so the third place goes to the most popular left.
    assert body["source"] == "context" and ids(body) == ["i4", "i5", "i2"]
    assert body["items"][0]["reasons"] == ["Goes with Item 3 (i3), which the customer is looking at"]
    assert body["items"][2]["reasons"] == ["Popular with customers"]
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_context_items_unknown_to_the_model_fall_through_to_popular(tiny_client, auth):
    body = ask(tiny_client, auth, "walk-in", limit=2, context_items=["not-in-model"])
    assert body["source"] == "popular" and ids(body) == ["i5", "i4"]


def test_unknown_customer_without_context_gets_popular_items(tiny_client, auth):
    body = ask(tiny_client, auth, "walk-in", limit=3)
    assert body["source"] == "popular" and ids(body) == ["i5", "i4", "i3"]


def test_known_customer_without_items_gets_popular_items(tiny_client, auth):
    assert ask(tiny_client, auth, "c1", limit=1)["source"] == "popular"


def test_exclude_and_include_owned(tiny_client, auth):
    assert ids(ask(tiny_client, auth, "c0", limit=2, exclude=["i1"])) == ["i2", "i5"]
    assert ids(ask(tiny_client, auth, "c0", limit=1, include_owned=True)) == ["i0"]


def test_a_popularity_counted_over_the_last_week_says_so(tmp_path, auth):
    publish(tmp_path, tiny_bundle(window_days=7))
    app = create_app(tiny_settings(tmp_path))
    body = ask(app.test_client(), auth, "walk-in", limit=1)
    app.extensions["recsvc"].store.stop()
    assert body["items"][0]["reasons"] == ["Popular this week"]


def test_an_item_no_one_took_in_the_window_is_not_popular_this_week(tmp_path, auth):
    # Trending scores customers in the window plus all-time popularity below one: i3 (0.5) had no one this week.
    bundle = tiny_bundle()
    bundle.scorers["popular"] = PopularityScorer(np.asarray([1, 2, 3, 0.5, 5, 6, 100], dtype=np.float32), window_days=7)
    publish(tmp_path, bundle)
    app = create_app(tiny_settings(tmp_path))
    body = ask(app.test_client(), auth, "walk-in", limit=6)
    similar = app.test_client().get("/v1/items/i0/similar?category=Fibre", headers=auth).get_json()
    app.extensions["recsvc"].store.stop()
    assert ids(body) == ["i5", "i4", "i2", "i1", "i0", "i3"]
    assert [item["reasons"] for item in body["items"]] == [["Popular this week"]] * 5 + [["Popular with customers"]]
    assert ids(similar) == ["i5", "i4", "i3"] and similar["items"][2]["reasons"] == ["Popular with customers"]


def test_similar_items_by_item_factors(tiny_client, auth):
    body = tiny_client.get("/v1/items/i0/similar?limit=5", headers=auth).get_json()
    # By cosine; i3 (cosine 0) is not like i0 at all: the popular step fills its place, with its own reason and a
    # score scaled below the last similar one. Neither i0 itself nor the inactive i6 appear.
    assert ids(body) == ["i1", "i2", "i5", "i4", "i3"] and body["item_id"] == "i0" and body["strategy"] == "als"
    assert body["items"][0]["reasons"] == ["Often chosen together with Item 0 (i0)"]
    assert body["items"][4]["reasons"] == ["Popular with customers"]
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True) and scores[4] > 0
    assert body["request_id"]


def test_item_knn_neighbours_are_the_reasons(tiny_client, auth):
    body = ask(tiny_client, auth, "c0", limit=3, strategy="knn")
    # i2 and i1 are i0's neighbours (i6 is, too, but inactive); no other item has evidence: popular tops up.
    assert body["strategy"] == "knn" and ids(body) == ["i2", "i1", "i5"]
    assert [item["score"] for item in body["items"][:2]] == pytest.approx([0.6, 0.3])
    assert body["items"][0]["reasons"] == ["Because the customer has Item 0 (i0)"]
    assert body["items"][2]["reasons"] == ["Popular with customers"]
    context = ask(tiny_client, auth, "walk-in", limit=1, strategy="knn", context_items=["i3"])
    assert ids(context) == ["i4"] and context["source"] == "context"


def test_similar_items_by_item_knn_weights(tiny_client, auth):
    body = tiny_client.get("/v1/items/i0/similar?strategy=knn", headers=auth).get_json()
    assert ids(body) == ["i2", "i1", "i5", "i4", "i3"]  # i0's neighbours (i6 is inactive), then popular ones
    assert [item["reasons"] for item in body["items"][1:3]] == [["Often chosen together with Item 0 (i0)"],
                                                                ["Popular with customers"]]


def test_similar_items_are_never_empty_while_the_category_has_items(tiny_client, auth):
    # i3's neighbours are all Fibre: among Phones nothing is like it, so the popular Phones items answer.
    body = tiny_client.get("/v1/items/i3/similar?strategy=knn&category=Phones", headers=auth).get_json()
    assert ids(body) == ["i2", "i1", "i0"]
    assert all(item["reasons"] == ["Popular with customers"] for item in body["items"])


def test_an_owned_item_asked_for_is_not_its_own_reason(tiny_client, auth):
    # c0 owns only i0: include_owned suggests i0 itself, and "because the customer has Item 0" says nothing for it.
    body = ask(tiny_client, auth, "c0", limit=1, include_owned=True)
    assert ids(body) == ["i0"] and body["items"][0]["reasons"] == ["Matches this customer's history"]
    context = ask(tiny_client, auth, "walk-in", limit=2, context_items=["i3"], include_owned=True)
    assert ids(context) == ["i3", "i4"]
    assert context["items"][0]["reasons"] == ["Fits what the customer is looking at"]
    assert context["items"][1]["reasons"] == ["Goes with Item 3 (i3), which the customer is looking at"]
