"""The ranking path (sampled-threshold top-k, per-version filters, reused score buffers, reasons in one product)
against a straightforward reference: full scores, a full mask, a stable argsort."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc import artifacts, ranking, scoring
from recsvc.artifacts import Catalog, IdIndex, ModelBundle
from recsvc.recommend import MAX_REASON_ITEMS, RecommendationQuery, Recommender, fallback_scorer, popular_reason_text
from recsvc.scoring import BlendScorer, FactorScorer, ItemSimilarityScorer, PopularityScorer, top_k

CATEGORIES = ["Phones", "Fibre", "TV", ""]
KINDS = ["factors", "dense", "sparse", "popularity", "blend"]


@contextlib.contextmanager
def small_sample():
    """Make the sampled path run on a few dozen items (by default it starts at 8,192): its thresholds are
    then taken on every call, with several candidates instead of hundreds."""
    saved = scoring.SAMPLE_SIZE, scoring.MIN_CANDIDATES
    scoring.SAMPLE_SIZE, scoring.MIN_CANDIDATES = 4, 1
    try:
        yield
    finally:
        scoring.SAMPLE_SIZE, scoring.MIN_CANDIDATES = saved


# --- top_k on its own --------------------------------------------------------------------------------


def reference_top_k(scores, k, exclude=None, blocked=None, among=None):
    """Every eligible finite score sorted, best first, equal scores by position."""
    eligible = np.isfinite(scores)
    if exclude is not None:
        eligible[exclude] = False
    if blocked is not None:
        eligible &= ~blocked
    if among is not None:
        eligible &= np.isin(np.arange(len(scores)), among)
    order = np.argsort(-scores, kind="stable")
    order = order[eligible[order]][:k]
    return order, scores[order]


@st.composite
def score_arrays(draw):
    n = draw(st.integers(0, 120))
    kind = draw(st.sampled_from(["normal", "ties", "sorted", "holes"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "ties":
        return rng.integers(-2, 3, n).astype(np.float32)
    scores = rng.standard_normal(n).astype(np.float32)
    if kind == "sorted":  # the strided sample then sees the scores in item order
        return np.sort(scores)
    if kind == "holes":
        scores[rng.random(n) < 0.6] = -np.inf
        scores[rng.random(n) < 0.05] = np.nan
        scores[rng.random(n) < 0.02] = np.inf
    return scores


@settings(max_examples=400, deadline=None)
@given(scores=score_arrays(), k=st.integers(0, 30), data=st.data())
def test_top_k_equals_sorting_every_eligible_item(scores, k, data):
    n = len(scores)
    positions = st.integers(0, max(n - 1, 0))
    exclude = np.array(data.draw(st.lists(positions, max_size=10) if n else st.just([])), dtype=np.int64)
    blocked = data.draw(st.none()
                        | st.lists(st.booleans(), min_size=n, max_size=n).map(lambda b: np.array(b, dtype=bool)))
    among = data.draw(st.none() | st.sets(positions, max_size=n).map(lambda s: np.array(sorted(s), dtype=np.int64)))
    expected = reference_top_k(scores.copy(), k, exclude, blocked, among)
    for sampled in (small_sample, contextlib.nullcontext):
        with sampled():
            got = top_k(scores.copy(), k, exclude, blocked=blocked, among=among)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("values", ["normal", "few distinct", "ascending", "mostly blocked"])
def test_top_k_at_full_size_is_exact(values):
    """100,000 items with the default sample: the threshold path and its fallbacks, ties at the cut included."""
    rng = np.random.default_rng(3)
    n = 100_000
    scores = {"normal": rng.standard_normal(n), "few distinct": rng.integers(0, 40, n),
              "ascending": np.arange(n), "mostly blocked": rng.standard_normal(n)}[values].astype(np.float32)
    blocked = rng.random(n) < (0.999 if values == "mostly blocked" else 0.02)
    exclude = rng.integers(0, n, 30)
    for k in (1, 10, 100):
        got = top_k(scores.copy(), k, exclude, blocked=blocked)
        expected = reference_top_k(scores.copy(), k, exclude, blocked)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


# --- the personal step's candidates for one customer -----------------------------------------------------


def reference_candidates(scores, limit, margin):
    """Every position scoring at least the limit-th best (a partition of every score, NaN above all numbers)
    less margin; every finite one when there are no more than `limit` scores or that score is not finite."""
    if len(scores) > limit:
        kth = np.partition(scores, len(scores) - limit)[len(scores) - limit]
        if np.isfinite(kth):
            return np.flatnonzero(scores >= kth - margin)
    found = np.flatnonzero(np.isfinite(scores))
    return found if len(found) else np.full(1, -1)


def one_row_candidates(scores, limit, margin):
    return ranking._candidates(scores[None, :], limit, np.array([margin]))[0]


@settings(max_examples=400, deadline=None)
@given(scores=score_arrays(), limit=st.integers(1, 30), margin=st.sampled_from([0.0, 1e-6, 0.5, 3.0]))
def test_one_customers_candidates_equal_a_partition_of_every_score(scores, limit, margin):
    expected = reference_candidates(scores, limit, margin)
    for sampled in (small_sample, contextlib.nullcontext):
        with sampled():
            np.testing.assert_array_equal(one_row_candidates(scores, limit, margin), expected)


@pytest.mark.parametrize("values", ["normal", "few distinct", "ascending", "mostly excluded", "some nan"])
def test_one_customers_candidates_at_full_size(values):
    """100,000 items with the default sample, as the server ranks them: the sampled threshold and its fallbacks."""
    rng = np.random.default_rng(5)
    n = 100_000
    scores = {"normal": rng.standard_normal(n), "few distinct": rng.integers(0, 40, n), "ascending": np.arange(n),
              "mostly excluded": rng.standard_normal(n), "some nan": rng.standard_normal(n)}[values].astype(np.float32)
    if values == "mostly excluded":
        scores[rng.random(n) < 0.9995] = -np.inf
    if values == "some nan":
        scores[rng.integers(0, n, 5)] = np.nan
    for limit in (1, 10, 100):
        for margin in (0.0, 1e-5, 0.3):
            np.testing.assert_array_equal(one_row_candidates(scores, limit, margin),
                                          reference_candidates(scores, limit, margin))


@pytest.mark.parametrize("items", [2_000, 5_000, 40_000])  # a group size of each range (ranking._block)
@pytest.mark.parametrize("values", ["normal", "few distinct", "mostly excluded"])
def test_a_batchs_candidates_equal_a_partition_of_every_score(items, values):
    """The cache warm-up's path (many customers, groups of items): each row's candidates are the same set."""
    rng = np.random.default_rng(7)
    shape = (40, items)
    scores = {"normal": rng.standard_normal(shape), "few distinct": rng.integers(0, 40, shape),
              "mostly excluded": rng.standard_normal(shape)}[values].astype(np.float32)
    if values == "mostly excluded":
        scores[rng.random(shape) < 0.995] = -np.inf
    for limit in (1, 10, 100):
        for margin in (0.0, 1e-5, 0.3):
            found = ranking._candidates(scores, limit, np.full(len(scores), margin))
            for row, expected in zip(found, (reference_candidates(s, limit, margin) for s in scores)):
                np.testing.assert_array_equal(np.sort(row[row >= 0]), expected)


# --- whole answers: Recommender.compute against a reference chain ----------------------------------------


def exact_values(rng, shape, zeros: float = 0.0) -> np.ndarray:
    """Multiples of 1/4 in [-2, 2]: every sum of products is exact in float32 whatever the order of the
    additions (so scores and reason weights can be compared bit for bit), and ties are frequent."""
    values = rng.integers(-8, 9, shape).astype(np.float32) / 4
    values[rng.random(shape) < zeros] = 0
    return values


def make_scorer(kind: str, rng, n_customers: int, n_items: int):
    if kind == "factors":
        return FactorScorer(exact_values(rng, (n_customers, 3)), exact_values(rng, (n_items, 3)))
    if kind == "dense":
        return ItemSimilarityScorer(exact_values(rng, (n_items, n_items), zeros=0.5))
    if kind == "sparse":
        return ItemSimilarityScorer(sp.csr_matrix(exact_values(rng, (n_items, n_items), zeros=0.8)))
    if kind == "popularity":
        return PopularityScorer(rng.integers(0, 6, n_items).astype(np.float32))
    return BlendScorer({"a": make_scorer("factors", rng, n_customers, n_items),
                        "b": make_scorer("sparse", rng, n_customers, n_items)},
                       weights={"a": 0.5, "b": 0.5}, scales={"a": 2.0, "b": 1.0})


def random_bundle(kind: str, seed: int, n_items: int, n_customers: int = 6) -> ModelBundle:
    rng = np.random.default_rng(seed)
    owned = sp.csr_matrix((rng.random((n_customers, n_items)) < 0.2).astype(np.float32))
    scorers = {"main": make_scorer(kind, rng, n_customers, n_items),
               "popular": PopularityScorer(rng.integers(0, 6, n_items).astype(np.float32))}
    if rng.random() < 0.5:
        scorers["trending"] = PopularityScorer(rng.integers(0, 6, n_items).astype(np.float32), window_days=7)
    titles = np.array([f"Item {i}" if i % 3 else "" for i in range(n_items)])
    return ModelBundle(
        manifest={"version": f"v{seed}", "default_strategy": "main", "strategies": {name: {} for name in scorers}},
        customers=IdIndex(artifacts.encode_ids(f"c{i}" for i in range(n_customers))),
        items=IdIndex(artifacts.encode_ids(f"i{i:03d}" for i in range(n_items))),
        owned=owned,
        catalog=Catalog(titles, rng.choice(CATEGORIES, n_items), rng.random(n_items) > 0.15),
        scorers=scorers,
    )


def reference_compute(bundle: ModelBundle, strategy: str, query: RecommendationQuery) -> dict:
    """The answer as the chain defines it, by brute force: full scores, a full mask, a stable argsort. The
    personal step ranks by the exact (float64, fixed-order) scores of every item, as recsvc.ranking
    defines it for the server and the cache warm-up alike."""
    customer = bundle.customers.position(query.customer_id)
    owned = bundle.owned_items(customer)
    context = np.asarray(bundle.items.positions(query.context_items), dtype=np.int64)
    blocked = ~np.asarray(bundle.catalog.active, dtype=bool)
    blocked[bundle.items.positions(query.exclude)] = True
    if query.category is not None:
        blocked |= np.asarray(bundle.catalog.category) != query.category
    if not query.include_owned:
        blocked[owned] = blocked[context] = True
    scorer = bundle.scorers[strategy]
    fallback = scorer if not scorer.personal else fallback_scorer(bundle)
    steps = []
    if customer is not None and scorer.personal and len(owned):
        every_item = np.arange(len(bundle.items))[None, :]
        steps.append(("personal", scorer.exact_scores(np.array([customer]), owned[None, :], every_item)[0], True))
    if len(context) and scorer.personal:
        steps.append(("context", scorer.scores(None, context), True))
    steps.append(("popular", fallback.scores(None, owned), False))
    chosen = []  # (position, score, source)
    for source, scores, positive_only in steps:
        scores = np.where(blocked, -np.inf, scores)
        order = np.argsort(-scores, kind="stable")
        order = order[np.isfinite(scores[order])][: query.limit]
        if positive_only:
            order = order[scores[order] > 0]
        reported = [round(float(scores[p]), 6) if source == "personal" else float(scores[p]) for p in order]
        if chosen and reported and reported[0] > chosen[-1][1]:  # scaled below the last score before them
            floor, top = chosen[-1][1], reported[0]
            reported = [min(score * (floor / top) if floor > 0 else score, floor) for score in reported]
        for position, score in zip(order, reported):
            if len(chosen) < query.limit and all(position != p for p, _, _ in chosen):
                chosen.append((int(position), score, source))
    items = []
    for position, score, source in chosen:
        item = {"item_id": bundle.items.external(position), "score": round(score, 6),
                "reasons": reference_reasons(bundle, scorer, fallback, position, source, owned, context)}
        if bundle.catalog.title[position]:
            item["title"] = str(bundle.catalog.title[position])
        if bundle.catalog.category[position]:
            item["category"] = str(bundle.catalog.category[position])
        items.append(item)
    return {"customer_id": query.customer_id, "model_version": bundle.version, "strategy": strategy,
            "source": chosen[0][2] if chosen else "popular", "items": items}


def reference_reasons(bundle, scorer, fallback, position, source, owned, context) -> list[str]:
    """One scorer.contributions call per item, as the reasons were computed before they were batched."""
    if source == "popular":
        return [popular_reason_text(fallback, position)]
    basis = owned if source == "personal" else context
    weights = np.where(basis == position, -np.inf, scorer.contributions(position, basis))  # never the item itself
    order = np.argsort(-weights, kind="stable")[:MAX_REASON_ITEMS]
    labels = []
    for i in order:
        if weights[i] > 0:
            item = int(basis[i])
            title = str(bundle.catalog.title[item])
            labels.append(f"{title} ({bundle.items.external(item)})" if title else bundle.items.external(item))
    if not labels:
        return ["Matches this customer's history" if source == "personal" else "Fits what the customer is looking at"]
    if source == "personal":
        return [f"Because the customer has {label}" for label in labels]
    return [f"Goes with {label}, which the customer is looking at" for label in labels]


@st.composite
def queries(draw, bundle: ModelBundle):
    n_items, n_customers = len(bundle.items), len(bundle.customers)
    item_ids = st.sampled_from([bundle.items.external(i) for i in range(n_items)] + ["unknown-item"])
    return RecommendationQuery(
        customer_id=draw(st.sampled_from([f"c{i}" for i in range(n_customers)] + ["new-customer"])),
        limit=draw(st.integers(1, 12)),
        exclude=tuple(draw(st.lists(item_ids, max_size=4))),
        category=draw(st.none() | st.sampled_from(CATEGORIES + ["Unknown"])),
        context_items=tuple(draw(st.lists(item_ids, max_size=3))),
        include_owned=draw(st.booleans()),
    )


def computed(bundle: ModelBundle, strategy: str, query: RecommendationQuery) -> dict:
    return Recommender(store=None, cache=None, cache_ttl=0).compute(bundle, strategy, query)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1), n_items=st.integers(1, 60),
       strategy=st.sampled_from(["main", "popular"]), data=st.data())
def test_answers_equal_the_brute_force_chain(kind, seed, n_items, strategy, data):
    bundle = random_bundle(kind, seed, n_items)
    query = data.draw(queries(bundle))
    expected = reference_compute(bundle, strategy, query)
    with small_sample():
        assert computed(bundle, strategy, query) == expected
    assert computed(bundle, strategy, query) == expected


@pytest.mark.parametrize("category", [None, "TV"])
def test_a_large_float_factor_model_ranks_exactly(category):
    """Gaussian factors on 20,000 items with the default sample: the same items, scores and sources as full
    scores sorted (reasons are left out: their weights may differ in the last bit between one product for
    all items and one per item)."""
    rng = np.random.default_rng(11)
    bundle = random_bundle("popularity", 5, 20_000, n_customers=40)
    bundle.scorers["main"] = FactorScorer(rng.standard_normal((40, 16), dtype=np.float32),
                                          rng.standard_normal((20_000, 16), dtype=np.float32))
    for customer in range(40):
        query = RecommendationQuery(f"c{customer}", limit=20, category=category, exclude=("i00012",))
        got, expected = computed(bundle, "main", query), reference_compute(bundle, "main", query)
        assert ([(i["item_id"], i["score"]) for i in got["items"]]
                == [(i["item_id"], i["score"]) for i in expected["items"]])
        assert got["source"] == expected["source"] == "personal"


def test_reused_score_buffers_give_the_same_scores_as_fresh_arrays():
    bundle = random_bundle("blend", 2, 50)
    rng = np.random.default_rng(0)
    factors = FactorScorer(rng.standard_normal((6, 8), dtype=np.float32),
                           rng.standard_normal((50, 8), dtype=np.float32))
    for scorer in [*bundle.scorers.values(), factors]:
        for customer, history in ((1, bundle.owned_items(1)), (None, np.array([3, 4]))):
            out = np.full(50, np.nan, dtype=np.float32)
            assert scorer.scores(customer, history, out) is out
            np.testing.assert_array_equal(out, scorer.scores(customer, history))


def test_a_float64_model_keeps_its_own_arithmetic():
    rng = np.random.default_rng(0)
    scorer = FactorScorer(rng.standard_normal((3, 4)), rng.standard_normal((10, 4)))
    out = np.zeros(10, dtype=np.float32)
    scores = scorer.scores(0, np.array([1]), out)
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(scores, scorer.scores(0, np.array([1])))


@pytest.mark.parametrize("kind", KINDS)
def test_contributions_of_many_items_are_those_of_each_item(kind):
    bundle = random_bundle(kind, 4, 30)
    scorer, history, items = bundle.scorers["main"], np.array([2, 5, 7, 11]), np.array([0, 3, 29, 3])
    together = scorer.contributions_batch(items, np.broadcast_to(history, (len(items), len(history))))
    assert together.shape == (4, 4)
    for row, item in zip(together, items):
        np.testing.assert_allclose(row, scorer.contributions(int(item), history), rtol=1e-6, atol=1e-7)
    # The server's call for one customer's items (its own gather for factor models) gives the very same bits.
    np.testing.assert_array_equal(scorer.contributions_to(items, history), together)


def test_category_filters_are_built_once_per_loaded_version(tmp_path):
    bundle = random_bundle("factors", 1, 40)
    artifacts.write_version(tmp_path, bundle)
    loaded = artifacts.load_version(tmp_path, bundle.version)
    assert {"_active_by_category", "inactive_positions"} <= set(vars(loaded.catalog))  # built at load: before
    # gunicorn forks its workers
    np.testing.assert_array_equal(loaded.catalog.inactive_positions, np.flatnonzero(~bundle.catalog.active))
    for category in CATEGORIES:
        expected = np.flatnonzero((np.asarray(bundle.catalog.category) == category) & bundle.catalog.active)
        np.testing.assert_array_equal(loaded.catalog.active_in(category), expected)
    assert len(loaded.catalog.active_in("Unknown")) == 0
    np.testing.assert_array_equal(loaded.catalog.active_in("TV\x00"), loaded.catalog.active_in("TV"))


class FixedStore:
    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle

    def current(self) -> ModelBundle:
        return self.bundle


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("category", [None, "Phones"])  # an unknown one is a 400: tests/test_api.py
def test_similar_items_equal_the_brute_force_ranking(kind, category):
    bundle = random_bundle(kind, 8, 50)
    recommender = Recommender(store=FixedStore(bundle), cache=None, cache_ttl=0)
    scorer = bundle.scorers["main"]
    for item in range(0, 50, 7):
        similarity = np.array(scorer.similar(item), dtype=np.float32)
        blocked = ~np.asarray(bundle.catalog.active, dtype=bool)
        blocked[item] = True
        if category is not None:
            blocked |= np.asarray(bundle.catalog.category) != category
        similarity[blocked] = -np.inf
        order = np.argsort(-similarity, kind="stable")
        order = order[np.isfinite(similarity[order])][:6]
        if scorer.personal:
            order = order[similarity[order] > 0]
        expected = [(int(p), float(similarity[p])) for p in order]
        if len(expected) < 6:  # topped up by the popular step, scaled below the last similar item
            popularity = np.where(blocked, -np.inf, fallback_scorer(bundle).scores(None, np.empty(0, np.int64)))
            top = np.argsort(-popularity, kind="stable")
            top = top[np.isfinite(popularity[top])][:6]
            reported = [float(popularity[p]) for p in top]
            if expected and reported and reported[0] > expected[-1][1]:
                floor = expected[-1][1]
                reported = [min(score * (floor / reported[0]) if floor > 0 else score, floor) for score in reported]
            for p, score in zip(top.tolist(), reported):
                if len(expected) < 6 and p not in dict(expected):
                    expected.append((p, score))
        for sampled in (small_sample, contextlib.nullcontext):
            with sampled():
                answer = recommender.similar(bundle.items.external(item), 6, "main", category)
            assert [i["item_id"] for i in answer["items"]] == [bundle.items.external(p) for p, _ in expected]
            assert [i["score"] for i in answer["items"]] == [round(score, 6) for _, score in expected]
