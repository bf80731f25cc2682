"""GF-CF and the EASE + ALS + GF-CF blend, beyond the shared contract (tests/test_strategies.py)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.errors import InvalidInput
from tests.test_strategies import block_matrix, history, make
from training.strategies import STRATEGIES, TrainingData


def test_graph_part_is_the_degree_normalised_item_graph():
    matrix = block_matrix()
    scorer = STRATEGIES["gf_cf"](graph_weight=1.0, ideal_weight=0.0).fit(TrainingData(matrix))
    dense = matrix.toarray()
    normalised = dense / np.sqrt(dense.sum(axis=1, keepdims=True)) / np.sqrt(dense.sum(axis=0, keepdims=True))
    np.testing.assert_allclose(scorer.matrix, normalised.T @ normalised, rtol=1e-5, atol=1e-6)


def test_ideal_filter_with_one_factor_is_popularity():
    # R~'s top singular value is 1 with right vector proportional to sqrt(item degree), so
    # D^-1/2 V'V D^1/2 has every row equal to the items' share of all interactions (on a connected
    # graph; the block matrix has two components, hence two singular values of 1).
    matrix = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0]],
                                    dtype=np.float32))
    scorer = STRATEGIES["gf_cf"](graph_weight=0.0, ideal_weight=1.0, factors=1).fit(TrainingData(matrix))
    degree = np.asarray(matrix.sum(axis=0)).ravel()
    np.testing.assert_allclose(scorer.matrix, np.tile(degree / degree.sum(), (4, 1)), rtol=1e-4, atol=1e-6)


def test_gf_cf_is_deterministic():
    first = STRATEGIES["gf_cf"](factors=4).fit(TrainingData(block_matrix())).matrix
    second = STRATEGIES["gf_cf"](factors=4).fit(TrainingData(block_matrix())).matrix
    np.testing.assert_array_equal(first, second)


def test_gf_cf_refuses_above_its_item_limit_and_bad_weights():
    with pytest.raises(InvalidInput, match=r"gf_cf: 10 items need about .* over max_items = 8"):
        STRATEGIES["gf_cf"](max_items=8).fit(TrainingData(block_matrix()))
    with pytest.raises(InvalidInput, match="graph_weight and ideal_weight"):
        STRATEGIES["gf_cf"](graph_weight=0.0, ideal_weight=0.0)


def test_blend_scores_are_the_weighted_sum_of_its_three_parts():
    matrix = block_matrix()
    scorer = make("ease_als_gf").fit(TrainingData(matrix))
    assert {n: p.kind for n, p in scorer.parts.items()} == {"ease": "item_similarity", "als": "factors",
                                                            "gf": "item_similarity"}
    assert scorer.weights == {"ease": 0.5, "als": 0.5, "gf": 0.2}
    owned = history(matrix, 3)
    expected = sum(scorer.weights[n] * p.scores(3, owned) / scorer.scales[n] for n, p in scorer.parts.items())
    np.testing.assert_allclose(scorer.scores(3, owned), expected, rtol=1e-5, atol=1e-6)


def test_blend_without_gf_weight_ranks_as_ease_als_does():
    matrix = block_matrix()
    shared = {"ease_l2": 1.0, "als_factors": 4, "als_regularization": 0.01, "als_iterations": 30, "als_alpha": 1.0,
              "weight_als": 0.5}
    three = STRATEGIES["ease_als_gf"](**shared, weight_gf=0.0, gf_factors=4).fit(TrainingData(matrix))
    two = STRATEGIES["ease_als"](**shared).fit(TrainingData(matrix))
    np.testing.assert_allclose(three.scores_batch(np.arange(16), matrix), two.scores_batch(np.arange(16), matrix),
                               rtol=1e-5, atol=1e-6)
