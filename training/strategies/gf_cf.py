"""GF-CF (Shen et al. 2021): a graph-filter item-item model, served as a dense item_similarity scorer."""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds
from threadpoolctl import threadpool_limits

from recsvc.errors import InvalidInput
from recsvc.scoring import ItemSimilarityScorer
from training.strategies.base import Strategy, TrainingData

# Peak bytes per item pair while fitting: two float64 items x items matrices and the float32 result.
BYTES_PER_PAIR = 8 + 8 + 4


class GFCFStrategy(Strategy):
    """S = graph_weight x R~'R~ + ideal_weight x D^-1/2 V'V D^1/2, with R~ = Du^-1/2 R Di^-1/2 the
    degree-normalised customers x items matrix (every interaction counts as 1), Di the items'
    customer counts and V the top `factors` right singular vectors of R~ (an ideal low-pass filter).

    Dense in the number of items, like EASE: above `max_items` the fit refuses with a message.
    """

    name = "gf_cf"
    defaults = {"graph_weight": 1.0, "ideal_weight": 0.1, "factors": 64, "max_items": 20_000, "seed": 42,
                "threads": 0}
    search_space = {"ideal_weight": [0.05, 0.1, 0.2, 0.3, 0.5, 1.0], "factors": [16, 32, 64, 128]}

    def __init__(self, **params):
        super().__init__(**params)
        weights = (float(self.params["graph_weight"]), float(self.params["ideal_weight"]))
        if min(weights) < 0 or max(weights) <= 0:
            raise InvalidInput(f"gf_cf: graph_weight and ideal_weight must be >= 0, one of them > 0, not {weights}")

    def fit(self, data: TrainingData) -> ItemSimilarityScorer:
        matrix = data.matrix.tocsr()
        n_items, limit = matrix.shape[1], int(self.params["max_items"])
        if n_items > limit:
            raise InvalidInput(f"gf_cf: {n_items} items need about {n_items**2 * BYTES_PER_PAIR / 2**20:,.1f} MiB "
                               f"to fit, over max_items = {limit}; raise it or use item_knn or als")
        with threadpool_limits(int(self.params["threads"]) or os.cpu_count() or 1, "blas"):
            self.scorer = ItemSimilarityScorer(self._filter(matrix).astype(np.float32))
        return self.scorer

    def _filter(self, matrix: sp.csr_matrix) -> np.ndarray:
        binary = (matrix != 0).astype(np.float64)
        customer_degree = _safe(np.asarray(binary.sum(axis=1)).ravel())
        item_degree = _safe(np.asarray(binary.sum(axis=0)).ravel())
        normalised = (sp.diags(customer_degree**-0.5) @ binary @ sp.diags(item_degree**-0.5)).tocsc()
        weights = float(self.params["graph_weight"]) * (normalised.T @ normalised).toarray()
        if float(self.params["ideal_weight"]) > 0:
            basis = _top_right_singular_vectors(normalised, int(self.params["factors"]), int(self.params["seed"]))
            ideal = (basis.T @ basis) * (item_degree[:, None] ** -0.5) * (item_degree[None, :] ** 0.5)
            weights += float(self.params["ideal_weight"]) * ideal
        return weights


def _safe(degree: np.ndarray) -> np.ndarray:
    """Degrees with zeros replaced by 1: an item or customer without interactions stays all zero."""
    return np.where(degree > 0, degree, 1.0)


def _top_right_singular_vectors(matrix: sp.csc_matrix, factors: int, seed: int) -> np.ndarray:
    """(factors x items) rows of V for the largest singular values; fewer when the matrix is that small."""
    factors = min(factors, min(matrix.shape) - 1)
    if factors < 1:
        return np.zeros((0, matrix.shape[1]))
    # A seeded start vector: the same data gives the same model on every run.
    start = np.random.default_rng(seed).random(min(matrix.shape))
    _u, _s, vt = svds(matrix, k=factors, v0=start)
    return vt
