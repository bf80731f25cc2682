"""EASE (Steck 2019), optionally EDLAE's dropout emphasis (Steck 2020): closed-form item-item, served dense."""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsvc.errors import InvalidInput
from recsvc.scoring import ItemSimilarityScorer
from training.strategies.base import Strategy, TrainingData

OVER_LIMIT = ("refuse", "top_items")
# Peak bytes per item pair while fitting: the float64 Gram matrix, its float64 inverse and the float32 result.
BYTES_PER_PAIR = 8 + 8 + 4


class EASEStrategy(Strategy):
    """B = I - P diagMat(1 / diag(P)), P = (X'X + Lambda)^-1, with a zero diagonal and
    Lambda = l2 I + dropout / (1 - dropout) diagMat(diag(X'X)): with dropout > 0 this is EDLAE
    (Steck 2020, "Autoencoders that don't overfit towards the identity"), whose penalty grows with
    an item's popularity, as training with that input dropout rate would; dropout = 0 is plain EASE.

    The fit needs memory quadratic in the number of items. Above `max_items` or the
    `max_memory_mb` budget it refuses (over_limit = "refuse") or keeps only the most-interacted
    items that fit (over_limit = "top_items"); the others then score zero, so the serving
    fallback chain fills in for them.
    """

    name = "ease"
    defaults = {"l2": 500.0, "dropout": 0.0, "max_items": 20_000, "max_memory_mb": 4096, "over_limit": "refuse",
                "threads": 0}
    search_space = {"l2": [50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 700.0, 1000.0, 2000.0],
                    "dropout": [0.0, 0.1, 0.25, 0.4, 0.55, 0.7]}

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["over_limit"] not in OVER_LIMIT:
            raise InvalidInput(f"ease: over_limit must be one of {', '.join(OVER_LIMIT)}, "
                               f"not {self.params['over_limit']!r}")
        if not 0 <= float(self.params["dropout"]) < 1:
            raise InvalidInput(f"ease: dropout must be at least 0 and below 1, not {self.params['dropout']!r}")

    def item_limit(self) -> int:
        """The most items one fit may take: max_items, or fewer when the memory budget says so."""
        budget = float(self.params["max_memory_mb"]) * 2**20
        return max(1, min(int(self.params["max_items"]), int(np.sqrt(budget / BYTES_PER_PAIR))))

    def kept_items(self, matrix: sp.csr_matrix) -> np.ndarray:
        """Item positions the model covers (all of them when under the limit), in ascending order."""
        n_items, limit = matrix.shape[1], self.item_limit()
        if n_items <= limit:
            return np.arange(n_items)
        if self.params["over_limit"] == "refuse":
            need_mb = n_items**2 * BYTES_PER_PAIR / 2**20
            raise InvalidInput(
                f"ease: {n_items} items need about {need_mb:,.1f} MiB to fit, over the limit of {limit} items "
                f"(max_items = {self.params['max_items']}, max_memory_mb = {self.params['max_memory_mb']}). "
                'Set over_limit = "top_items" to restrict EASE to the most-interacted items, raise the limits, '
                "or use item_knn or als.")
        customers_per_item = np.bincount(matrix.indices, minlength=n_items)
        return np.sort(np.argsort(-customers_per_item, kind="stable")[:limit])

    def fit(self, data: TrainingData) -> ItemSimilarityScorer:
        matrix = data.matrix.tocsr()
        kept = self.kept_items(matrix)
        weights = self._solve(matrix[:, kept], float(self.params["l2"]), float(self.params["dropout"]))
        if len(kept) == matrix.shape[1]:
            self.scorer = ItemSimilarityScorer(weights)
        else:
            self.scorer = ItemSimilarityScorer(_embed(weights, kept, matrix.shape[1]))
        return self.scorer

    def _solve(self, matrix: sp.csr_matrix, l2: float, dropout: float) -> np.ndarray:
        # Unlike implicit, nothing else runs threads here: BLAS may use every core (threads = 0).
        with threadpool_limits(int(self.params["threads"]) or os.cpu_count() or 1, "blas"):
            matrix = matrix.astype(np.float64)
            gram = (matrix.T @ matrix).toarray()
            gram[np.diag_indices_from(gram)] *= 1.0 / (1.0 - dropout)  # G_ii + dropout / (1 - dropout) G_ii
            gram[np.diag_indices_from(gram)] += l2
            inverse = np.linalg.inv(gram)
            del gram
            inverse /= -np.diag(inverse)  # column j divided by -P[j, j]
        np.fill_diagonal(inverse, 0.0)
        return inverse.astype(np.float32)


def _embed(block: np.ndarray, kept: np.ndarray, n_items: int) -> sp.csr_matrix:
    """The kept items' weights placed in the full item space, as a sparse matrix."""
    rows, cols = np.nonzero(block)
    return sp.csr_matrix((block[rows, cols], (kept[rows], kept[cols])), shape=(n_items, n_items), dtype=np.float32)
