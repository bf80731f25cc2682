"""The strategy contract, run against every strategy in STRATEGIES on a small block matrix with exact answers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.artifacts import ModelBundle
from recsvc.errors import InvalidInput
from recsvc.scoring import ItemSimilarityScorer, Scorer
from training.strategies import STRATEGIES, TrainingData

# Two tastes: customers 0-11 like items 0-5 (block A), customers 12-15 like items 6-9 (block B).
# Each customer lacks exactly one item of their block, so the one right suggestion is known, and
# block A is more popular, so even the popularity baseline gets block-A customers right.
BLOCK_A, BLOCK_B = np.arange(0, 6), np.arange(6, 10)
N_CUSTOMERS, N_ITEMS = 16, 10

# Parameters sized for a 16 x 10 matrix (the defaults are sized for real catalogues).
SMALL_PARAMS = {
    "als": {"factors": 4, "regularization": 0.01, "iterations": 30, "threads": None},
    "bpr": {"factors": 4, "learning_rate": 0.05, "regularization": 0.001, "iterations": 300, "threads": 1},
    "item_knn": {"neighbours": 20, "threads": 1},  # implicit counts the item itself among its neighbours
    "ease": {"l2": 1.0},
    "ease_als": {"ease_l2": 1.0, "als_factors": 4, "als_regularization": 0.01, "als_iterations": 30, "weight_als": 0.5},
    "gf_cf": {"factors": 4},
    "ease_als_gf": {"ease_l2": 1.0, "als_factors": 4, "als_regularization": 0.01, "als_iterations": 30,
                    "weight_als": 0.5, "gf_factors": 4, "weight_gf": 0.2},
}


def block_of(customer: int) -> np.ndarray:
    return BLOCK_A if customer < 12 else BLOCK_B


def missing_item(customer: int) -> int:
    block = block_of(customer)
    return int(block[customer % len(block)])


def block_matrix() -> sp.csr_matrix:
    rows, cols = [], []
    for customer in range(N_CUSTOMERS):
        for item in block_of(customer):
            if item != missing_item(customer):
                rows.append(customer)
                cols.append(item)
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(N_CUSTOMERS, N_ITEMS))


def history(matrix: sp.csr_matrix, customer: int) -> np.ndarray:
    return matrix.indices[matrix.indptr[customer] : matrix.indptr[customer + 1]]


def make(name: str):
    params = {k: v for k, v in SMALL_PARAMS.get(name, {}).items() if k in STRATEGIES[name].defaults and v is not None}
    return STRATEGIES[name](**params)


@pytest.fixture(scope="module")
def matrix() -> sp.csr_matrix:
    return block_matrix()


@pytest.fixture(scope="module", params=sorted(STRATEGIES))
def fitted(request, matrix):
    strategy = make(request.param)
    scorer = strategy.fit(TrainingData(matrix))
    return strategy, scorer


class TestContract:
    """What every strategy promises, whatever its arithmetic."""

    def test_fit_returns_a_scorer_that_fits_the_matrix(self, fitted, matrix):
        strategy, scorer = fitted
        assert isinstance(scorer, Scorer) and strategy.scorer is scorer
        scorer.check(N_CUSTOMERS, N_ITEMS, strategy.name)  # raises ArtifactError when wrong
        assert scorer.scores(0, history(matrix, 0)).shape == (N_ITEMS,)

    def test_recommend_excludes_history_and_finds_the_missing_item(self, fitted, matrix):
        strategy, scorer = fitted
        for customer in range(N_CUSTOMERS):
            owned = history(matrix, customer)
            items, scores = strategy.recommend(customer, owned, n=3)
            assert len(items) == 3 and not set(items.tolist()) & set(owned.tolist())
            assert np.all(np.diff(scores) <= 0), "best first"
            if customer < 12 or scorer.personal:
                assert items[0] == missing_item(customer), f"{strategy.name}: customer {customer} got {items}"
                assert scores[0] > scores[1], "the right item wins outright, not by a tie"

    def test_recommend_can_keep_history_when_asked(self, fitted, matrix):
        strategy, _ = fitted
        items, _ = strategy.recommend(0, history(matrix, 0), n=N_ITEMS, filter_history=False)
        assert set(history(matrix, 0).tolist()) <= set(items.tolist())

    def test_a_new_customer_is_scored_from_their_items(self, fitted, matrix):
        strategy, scorer = fitted
        # Popularity ranks every customer alike: only block-A customers get their missing item from it.
        for customer in (0, 13) if scorer.personal else (0,):
            items, _ = strategy.recommend(None, history(matrix, customer), n=1)
            assert items[0] == missing_item(customer), f"{strategy.name}: folded-in customer {customer} got {items}"

    def test_similar_excludes_the_item_and_stays_in_its_block(self, fitted):
        strategy, scorer = fitted
        for item in (0, 7):
            items, _ = strategy.similar(item, n=3)
            assert len(items) == 3 and item not in items.tolist()
            if scorer.personal:
                block = BLOCK_A if item < 6 else BLOCK_B
                assert set(items.tolist()) <= set(block.tolist()), f"{strategy.name}: similar({item}) = {items}"

    def test_explain_names_history_items(self, fitted, matrix):
        strategy, scorer = fitted
        for customer in (1, 14):
            owned = history(matrix, customer)
            reasons = strategy.explain(missing_item(customer), owned, n=2)
            assert set(reasons.tolist()) <= set(owned.tolist())
            assert len(reasons) == (2 if scorer.personal else 0), f"{strategy.name}: {reasons}"

    def test_save_load_round_trip_gives_identical_scores(self, fitted, matrix, tmp_path):
        strategy, scorer = fitted
        strategy.save(tmp_path / strategy.name)
        loaded = type(strategy).load(tmp_path / strategy.name, **strategy.params)
        assert loaded.scorer.kind == scorer.kind
        for customer in range(N_CUSTOMERS):
            owned = history(matrix, customer)
            np.testing.assert_array_equal(loaded.scorer.scores(customer, owned), scorer.scores(customer, owned))
            np.testing.assert_array_equal(loaded.recommend(customer, owned, n=5)[0],
                                          strategy.recommend(customer, owned, n=5)[0])
        np.testing.assert_array_equal(loaded.scorer.similar(3), scorer.similar(3))

    def test_scores_batch_agrees_with_scores(self, fitted, matrix):
        _, scorer = fitted
        customers = np.arange(N_CUSTOMERS)
        batch = scorer.scores_batch(customers, matrix[customers])
        assert batch.shape == (N_CUSTOMERS, N_ITEMS)
        for customer in customers:
            np.testing.assert_allclose(batch[customer], scorer.scores(customer, history(matrix, customer)),
                                       rtol=1e-5, atol=1e-6)

    def test_unknown_parameters_are_refused(self, fitted):
        strategy, _ = fitted
        with pytest.raises(InvalidInput, match="unknown parameter"):
            type(strategy)(no_such_parameter=1)


def test_every_strategy_has_a_search_space_of_known_parameters():
    for name, cls in STRATEGIES.items():
        assert set(cls.search_space) <= set(cls.defaults), name
        assert all(len(values) >= 1 for values in cls.search_space.values()), name


@pytest.mark.parametrize("similarity", ["bm25", "cosine", "tfidf"])
def test_item_knn_similarities_are_sparse_and_find_the_missing_item(similarity, matrix):
    strategy = STRATEGIES["item_knn"](similarity=similarity, neighbours=20, threads=1)
    scorer = strategy.fit(TrainingData(matrix))
    assert isinstance(scorer, ItemSimilarityScorer) and not scorer.dense
    assert scorer.matrix.diagonal().sum() == 0
    for customer in range(N_CUSTOMERS):
        items, scores = strategy.recommend(customer, history(matrix, customer), n=2)
        assert items[0] == missing_item(customer) and scores[0] > scores[1]


def test_item_knn_refuses_an_unknown_similarity():
    with pytest.raises(InvalidInput, match="similarity must be one of bm25, cosine, tfidf"):
        STRATEGIES["item_knn"](similarity="jaccard")


def test_ease_is_dense_with_a_zero_diagonal(matrix):
    scorer = STRATEGIES["ease"](l2=1.0).fit(TrainingData(matrix))
    assert scorer.dense and scorer.matrix.dtype == np.float32
    assert np.all(np.diag(scorer.matrix) == 0)
    assert np.all(scorer.matrix[np.ix_(BLOCK_A, BLOCK_B)] == 0), "no weight between tastes nobody mixed"


def test_ease_refuses_above_its_item_limit_with_a_clear_message(matrix):
    with pytest.raises(InvalidInput, match=r"ease: 10 items .* limit of 8 items .*over_limit = \"top_items\""):
        STRATEGIES["ease"](max_items=8).fit(TrainingData(matrix))


def test_ease_refuses_above_its_memory_budget(matrix):
    # 1e-4 MiB allows sqrt(104.8 / 20) = 2 items.
    with pytest.raises(InvalidInput, match="limit of 2 items"):
        STRATEGIES["ease"](max_memory_mb=1e-4).fit(TrainingData(matrix))


def test_ease_restricted_to_the_most_interacted_items(matrix):
    # Block A items are held by 10 customers each, block B items by 3: the six A items are kept.
    strategy = STRATEGIES["ease"](l2=1.0, max_items=6, over_limit="top_items")
    scorer = strategy.fit(TrainingData(matrix))
    assert isinstance(scorer, ItemSimilarityScorer) and scorer.matrix.shape == (N_ITEMS, N_ITEMS)
    assert sp.issparse(scorer.matrix) and set(np.unique(scorer.matrix.nonzero()).tolist()) <= set(BLOCK_A.tolist())
    full = STRATEGIES["ease"](l2=1.0).fit(TrainingData(matrix)).matrix
    np.testing.assert_allclose(scorer.matrix.toarray()[np.ix_(BLOCK_A, BLOCK_A)], full[np.ix_(BLOCK_A, BLOCK_A)],
                               rtol=1e-5, atol=1e-6)
    assert strategy.recommend(2, history(matrix, 2), n=1)[0][0] == missing_item(2)


def test_ease_refuses_bad_options():
    with pytest.raises(InvalidInput, match="over_limit must be one of refuse, top_items"):
        STRATEGIES["ease"](over_limit="shrink")
    with pytest.raises(InvalidInput, match="l2 must be a positive number"):
        STRATEGIES["ease"](l2=0)
    for dropout in (-0.1, 1.0):
        with pytest.raises(InvalidInput, match="dropout must be at least 0 and below 1"):
            STRATEGIES["ease"](dropout=dropout)


@pytest.mark.parametrize("blend", ["ease_als", "ease_als_gf"])
def test_blends_refuse_a_bad_part_parameter_when_built(blend):
    with pytest.raises(InvalidInput, match="ease: dropout must be at least 0 and below 1, not 1.5"):
        STRATEGIES[blend](ease_dropout=1.5)


def test_edlae_dropout_is_an_l2_that_grows_with_item_popularity():
    # Customer c holds items c, c + 1 and c + 2 (mod 6): every item has 3 customers, so EDLAE's
    # penalty l2 + dropout / (1 - dropout) x 3 is the same for every item, and EASE with that l2 agrees.
    rows = np.repeat(np.arange(6), 3)
    cols = (rows + np.tile(np.arange(3), 6)) % 6
    circulant = sp.csr_matrix((np.ones(18, dtype=np.float32), (rows, cols)), shape=(6, 6))
    edlae = STRATEGIES["ease"](l2=1.0, dropout=0.5).fit(TrainingData(circulant)).matrix
    ease = STRATEGIES["ease"](l2=4.0).fit(TrainingData(circulant)).matrix
    np.testing.assert_allclose(edlae, ease, rtol=1e-6, atol=1e-7)
    assert not np.allclose(edlae, STRATEGIES["ease"](l2=1.0).fit(TrainingData(circulant)).matrix, atol=1e-3)



def test_trending_ranks_recent_items_first_and_ignores_held_out_rows():
    day = 86_400.0
    # Item 0: three customers long ago. Item 1: one customer yesterday. Item 2: two customers
    # yesterday, but one of those rows is held out (not in the training matrix), so it counts once.
    customer = np.array([0, 1, 2, 3, 4, 5])
    item = np.array([0, 0, 0, 1, 2, 2])
    timestamps = np.array([0, 0, 0, 99, 99, 100], dtype=np.float64) * day
    train = sp.csr_matrix((np.ones(5, dtype=np.float32), (customer[:5], item[:5])), shape=(6, 3))
    data = TrainingData(train, timestamps=timestamps, interactions=(customer, item))
    scorer = STRATEGIES["trending"](window_days=7).fit(data)
    assert scorer.window_days == 7
    ranking = np.argsort(-scorer.scores(None, np.empty(0, dtype=np.int64)), kind="stable")
    assert ranking.tolist() == [1, 2, 0] or ranking.tolist() == [2, 1, 0]
    popularity = scorer.popularity
    assert popularity[1] == pytest.approx(popularity[2], abs=1.0), "the held-out row must not count"
    assert min(popularity[1], popularity[2]) >= 1 > popularity[0]
    assert popularity[1] < popularity[2] + 1 and popularity[2] - popularity[1] < 1


def test_trending_without_timestamps_is_popularity(matrix):
    strategy = STRATEGIES["trending"]()
    trending = strategy.fit(TrainingData(matrix))
    popular = STRATEGIES["popular"]().fit(TrainingData(matrix))
    assert trending.window_days is None
    # The parameters the manifest (and GET /v1/models) shows are those served: no window, not the default 7 days.
    assert strategy.served_params() == {"window_days": None}
    np.testing.assert_array_equal(trending.popularity, popular.popularity)


def test_fitted_strategies_can_be_bundled_together(matrix):
    """Every scorer kind passes the bundle's cross-check, as the server will run it."""
    from recsvc.artifacts import Catalog, IdIndex, encode_ids

    scorers = {name: make(name).fit(TrainingData(matrix)) for name in STRATEGIES}
    bundle = ModelBundle(manifest={"version": "v1", "default_strategy": "ease"},
                         customers=IdIndex(encode_ids(f"c{i:02d}" for i in range(N_CUSTOMERS))),
                         items=IdIndex(encode_ids(f"i{i:02d}" for i in range(N_ITEMS))),
                         owned=matrix, catalog=Catalog.empty(N_ITEMS), scorers=scorers)
    bundle.validate()


def test_ease_als_scores_are_the_weighted_sum_of_its_parts(matrix):
    strategy = make("ease_als")
    scorer = strategy.fit(TrainingData(matrix))
    ease, als = scorer.parts["ease"], scorer.parts["als"]
    assert ease.kind == "item_similarity" and als.kind == "factors"
    assert scorer.weights == {"ease": 0.5, "als": 0.5} and all(s > 0 for s in scorer.scales.values())
    owned = history(matrix, 3)
    expected = 0.5 * ease.scores(3, owned) / scorer.scales["ease"] + 0.5 * als.scores(3, owned) / scorer.scales["als"]
    np.testing.assert_allclose(scorer.scores(3, owned), expected, rtol=1e-5, atol=1e-6)


def test_ease_als_with_no_als_weight_ranks_as_ease_does(matrix):
    blend = STRATEGIES["ease_als"](weight_als=0.0, ease_l2=1.0, als_factors=4).fit(TrainingData(matrix))
    ease = STRATEGIES["ease"](l2=1.0).fit(TrainingData(matrix))
    for customer in range(N_CUSTOMERS):
        owned = history(matrix, customer)
        np.testing.assert_array_equal(np.argsort(-blend.scores(customer, owned), kind="stable"),
                                      np.argsort(-ease.scores(customer, owned), kind="stable"))


@pytest.mark.slow
def test_published_strategies_score_the_same_through_the_api(demo_paths, tmp_path):
    """What bench-quality proves on MovieLens, on demo data: the API's answers give the offline metrics."""
    from bench.quality import served_metrics, serving_view
    from recsvc import artifacts
    from training.config import TrainConfig
    from training.evaluate import Holdout, evaluate, split
    from training.pipeline import fit_and_publish

    holdout = Holdout(fraction=0.25, seed=42, max_customers=None)
    config = TrainConfig(strategies=["ease", "item_knn", "ease_als", "trending"], holdout=holdout,
                         params={"ease_als": {"als_factors": 8, "als_iterations": 5}})
    fit_and_publish(demo_paths["interactions"], tmp_path / "registry", config, log=lambda _line: None)
    bundle = artifacts.load_current(tmp_path / "registry")
    train, test = split(bundle.owned, holdout)
    view = serving_view(bundle, train, tmp_path / "view")
    # Every strategy, popular and trending included, is served with its own arrays.
    for name in ("ease", "item_knn", "ease_als", "popular", "trending"):
        offline = evaluate(bundle.scorers[name], train, test, k=10)
        served = served_metrics(view, bundle, test, name, tmp_path / "spool")
        assert served["customers"] == offline["customers"] > 500
        for metric in ("ndcg@10", "precision@10"):
            assert served[metric] == pytest.approx(offline[metric], abs=0.002), (name, metric)


def test_an_als_ensemble_scores_the_mean_of_its_seeds_models_with_one_product(matrix):
    params = {"factors": 4, "iterations": 5, "regularization": 0.1, "seed": 7}
    members = [STRATEGIES["als"](**{**params, "seed": seed}) for seed in (7, 8, 9)]
    expected = np.mean([m.fit(TrainingData(matrix)).scores(2, history(matrix, 2)) for m in members], axis=0)
    ensemble = STRATEGIES["als"](**params, ensemble=3).fit(TrainingData(matrix))
    assert ensemble.item_factors.shape == (matrix.shape[1], 12)
    np.testing.assert_allclose(ensemble.scores(2, history(matrix, 2)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ensemble", [0, -2, 1.5, "3", True])
def test_an_als_ensemble_that_is_not_a_count_is_refused_before_fitting(ensemble):
    with pytest.raises(InvalidInput, match="ensemble must be a whole number of at least 1"):
        STRATEGIES["als"](factors=4, iterations=1, ensemble=ensemble)  # no data needed: refused when built


@pytest.mark.parametrize("strategy, params, message", [
    ("item_knn", {"neighbours": 0}, "item_knn: neighbours must be a whole number of at least 1, not 0"),  # crashed
    ("item_knn", {"neighbours": "x"}, "neighbours must be a whole number of at least 1, not 'x'"),
    ("als", {"factors": -3}, "als: factors must be a whole number of at least 1, not -3"),
    ("als", {"factors": 0}, "factors must be a whole number of at least 1"),  # BLAS complained, garbage came out
    ("als", {"factors": "64"}, "factors must be a whole number of at least 1, not '64'"),
    ("als", {"factors": 64.5}, "factors must be a whole number of at least 1"),
    ("als", {"iterations": True}, "iterations must be a whole number of at least 1"),
    ("als", {"regularization": "x"}, "regularization must be a number of at least 0, not 'x'"),
    ("als", {"alpha": -1.0}, "alpha must be a positive number, not -1.0"),
    ("als", {"seed": -1}, "seed must be a whole number of at least 0"),
    ("bpr", {"factors": -1}, "bpr: factors must be a whole number of at least 1"),
    ("bpr", {"learning_rate": float("nan")}, "learning_rate must be a positive number"),
    ("trending", {"window_days": -1}, "trending: window_days must be a positive number"),
    ("ease", {"l2": 0}, "ease: l2 must be a positive number"),
    ("item_knn", {"bm25_b": 1.5}, "bm25_b must be a number from 0 to 1"),
    ("ease_als", {"weight_als": 2}, "ease_als: weight_als must be a number from 0 to 1"),
    ("ease_als", {"als_factors": 0}, "als: factors must be a whole number of at least 1"),  # a blend's part
    ("ease_als_gf", {"weight_gf": -0.1}, "ease_als_gf: weight_gf must be a number of at least 0"),
    ("gf_cf", {"factors": 0}, "gf_cf: factors must be a whole number of at least 1"),
])
def test_a_numeric_parameter_out_of_its_range_is_refused_before_fitting(strategy, params, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        STRATEGIES[strategy](**params)


# --- ease with the catalog's tags as inputs (tag_weight) ---

def _tagged_data(seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    matrix = sp.csr_matrix((rng.random((40, 12)) < 0.3).astype(np.float32))
    tags = sp.csr_matrix((rng.random((12, 3)) < 0.5).astype(np.float32))
    return matrix, tags


def test_ease_with_tags_is_the_closed_form_over_items_and_tags():
    matrix, tags = _tagged_data()
    weight, l2, dropout = 0.7, 2.0, 0.2
    # Independently: the inputs Z = [X, w X G] written out, EDLAE's penalty on Z'Z, outputs the items only.
    x, g = matrix.toarray().astype(np.float64), tags.toarray().astype(np.float64)
    z = np.hstack([x, weight * x @ g])
    gram = z.T @ z
    gram += np.diag(np.diag(gram) * dropout / (1 - dropout) + l2)
    p = np.linalg.inv(gram)
    n = x.shape[1]
    b = -p[:, :n] / np.diag(p)[:n]
    b[np.arange(n), np.arange(n)] = 0.0
    expected = x @ b[:n] + (weight * x @ g) @ b[n:]  # each customer's scores from items and tag counts
    strategy = STRATEGIES["ease"](l2=l2, dropout=dropout, tag_weight=weight)
    scorer = strategy.fit(TrainingData(matrix, item_tags=tags))
    assert scorer.dense and np.all(np.diag(scorer.matrix) == 0)
    scores = x @ scorer.matrix
    off_history = x == 0  # an item's score on itself is dropped (zero diagonal): it is never suggested to its owner
    np.testing.assert_allclose(scores[off_history], expected[off_history], rtol=1e-4, atol=1e-5)
    assert strategy.served_params()["tag_weight"] == weight
    plain = STRATEGIES["ease"](l2=l2, dropout=dropout).fit(TrainingData(matrix)).matrix
    assert not np.allclose(scorer.matrix, plain, atol=1e-4), "the tags changed the model"


def test_tags_lift_a_little_known_item_that_shares_a_customers_tags():
    # Items 0-3 carry tag "a", 4-7 tag "b"; item 3 and item 7 are each held by one customer only. A customer with
    # items 0-2 gets item 3 (same tag) ranked above item 7 once the tags are inputs.
    rows = [[0, 1, 2], [0, 1, 2], [4, 5, 6], [4, 5, 6], [0, 4], [1, 5], [2, 6], [3], [7]]
    matrix = sp.csr_matrix((np.ones(sum(map(len, rows)), dtype=np.float32),
                            (np.repeat(np.arange(len(rows)), [len(r) for r in rows]), np.concatenate(rows))),
                           shape=(len(rows), 8))
    tags = sp.csr_matrix(np.repeat(np.eye(2, dtype=np.float32), 4, axis=0))
    customer = np.array([0, 1, 2])
    plain = STRATEGIES["ease"](l2=1.0).fit(TrainingData(matrix, item_tags=tags)).scores(None, customer)
    tagged = STRATEGIES["ease"](l2=1.0, tag_weight=1.0).fit(TrainingData(matrix, item_tags=tags)).scores(None, customer)
    assert plain[3] == pytest.approx(plain[7], abs=1e-6), "without tags nothing links item 3 to the others"
    assert tagged[3] > tagged[7] + 0.01


def test_tag_weight_without_tags_is_plain_ease_and_the_manifest_says_so():
    matrix, tags = _tagged_data(1)
    strategy = STRATEGIES["ease"](l2=2.0, tag_weight=0.5)
    untagged = strategy.fit(TrainingData(matrix))
    np.testing.assert_array_equal(untagged.matrix, STRATEGIES["ease"](l2=2.0).fit(TrainingData(matrix)).matrix)
    assert strategy.served_params()["tag_weight"] == 0.0
    blend = STRATEGIES["ease_als_gf"](ease_l2=2.0, ease_tag_weight=0.5, als_factors=4, gf_factors=2)
    blend.fit(TrainingData(matrix))
    assert blend.served_params()["ease_tag_weight"] == 0.0
    blend.fit(TrainingData(matrix, item_tags=tags))
    assert blend.served_params()["ease_tag_weight"] == 0.5
    with pytest.raises(InvalidInput, match="tag_weight must be a number of at least 0"):
        STRATEGIES["ease"](tag_weight=-1.0)


def test_ease_counts_its_input_tags_in_its_item_limit():
    matrix, tags = _tagged_data(2)
    strategy = STRATEGIES["ease"](l2=1.0, tag_weight=1.0, max_items=10, over_limit="top_items")
    scorer = strategy.fit(TrainingData(matrix, item_tags=tags))
    assert len(np.unique(scorer.matrix.nonzero()[0])) <= 10 - 3  # three tags take three of the ten places
    with pytest.raises(InvalidInput,
                       match=r"limit of 9 items \(max_items = 12, max_memory_mb = 4096, less 3 input tags\)"):
        STRATEGIES["ease"](l2=1.0, tag_weight=1.0, max_items=12).fit(TrainingData(matrix, item_tags=tags))
