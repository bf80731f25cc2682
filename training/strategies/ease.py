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

    With `tag_weight` w > 0 and a catalog with tags (TrainingData.item_tags, items x tags G), the tags are
    extra inputs (Ning & Karypis's SSLIM, in EASE's closed form): the model reads Z = X [I, w G] (the
    customer's items, and w times how many of them carry each tag) and reconstructs X, so
    P = (Z'Z + Lambda)^-1 over items and tags, B = -P[:, items] / diag(P)[items] with a zero item diagonal,
    and the served item-item matrix is B_items + w G B_tags (a customer's tag counts are linear in their
    items), with a zero diagonal. Without tags it is plain EASE (served_params then shows tag_weight 0).

    The fit needs memory quadratic in the number of items (and tags). Above `max_items` or the
    `max_memory_mb` budget it refuses (over_limit = "refuse") or keeps only the most-interacted
    items that fit (over_limit = "top_items"); the others then score zero, so the serving
    fallback chain fills in for them.
    """

    name = "ease"
    defaults = {"l2": 500.0, "dropout": 0.0, "tag_weight": 0.0, "max_items": 20_000, "max_memory_mb": 4096,
                "over_limit": "refuse", "threads": 0}
    search_space = {"l2": [50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 700.0, 1000.0, 2000.0],
                    "dropout": [0.0, 0.1, 0.25, 0.4, 0.55, 0.7]}

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["over_limit"] not in OVER_LIMIT:
            raise InvalidInput(f"ease: over_limit must be one of {', '.join(OVER_LIMIT)}, "
                               f"not {self.params['over_limit']!r}")
        if not 0 <= float(self.params["dropout"]) < 1:
            raise InvalidInput(f"ease: dropout must be at least 0 and below 1, not {self.params['dropout']!r}")
        self.tags_used = 0  # tags the fitted model read (0: plain EASE)

    def item_limit(self) -> int:
        """The most items one fit may take: max_items, or fewer when the memory budget says so."""
        budget = float(self.params["max_memory_mb"]) * 2**20
        return max(1, min(int(self.params["max_items"]), int(np.sqrt(budget / BYTES_PER_PAIR))))

    def kept_items(self, matrix: sp.csr_matrix, n_tags: int = 0) -> np.ndarray:
        """Item positions the model covers (all of them when under the limit, less `n_tags` input tags), in
        ascending order."""
        n_items, limit = matrix.shape[1], max(1, self.item_limit() - n_tags)
        if n_items <= limit:
            return np.arange(n_items)
        if self.params["over_limit"] == "refuse":
            need_mb = n_items**2 * BYTES_PER_PAIR / 2**20
            raise InvalidInput(
                f"ease: {n_items} items need about {need_mb:,.1f} MiB to fit, over the limit of {limit} items "
                f"(max_items = {self.params['max_items']}, max_memory_mb = {self.params['max_memory_mb']}"
                f"{f', less {n_tags} input tags' if n_tags else ''}). "
                'Set over_limit = "top_items" to restrict EASE to the most-interacted items, raise the limits, '
                "or use item_knn or als.")
        customers_per_item = np.bincount(matrix.indices, minlength=n_items)
        return np.sort(np.argsort(-customers_per_item, kind="stable")[:limit])

    def fit(self, data: TrainingData) -> ItemSimilarityScorer:
        matrix = data.matrix.tocsr()
        tags = data.item_tags if float(self.params["tag_weight"]) > 0 else None
        kept = self.kept_items(matrix, 0 if tags is None else int(np.count_nonzero(tags.getnnz(axis=0))))
        if tags is not None:
            tags = tags.tocsr()[kept]
            tags = tags[:, np.flatnonzero(tags.getnnz(axis=0))]  # a tag none of the items carries is no input
        self.tags_used = 0 if tags is None else tags.shape[1]
        weights = self._solve(matrix[:, kept], float(self.params["l2"]), float(self.params["dropout"]),
                              tags if self.tags_used else None, float(self.params["tag_weight"]))
        if len(kept) == matrix.shape[1]:
            self.scorer = ItemSimilarityScorer(weights)
        else:
            self.scorer = ItemSimilarityScorer(_embed(weights, kept, matrix.shape[1]))
        return self.scorer

    def served_params(self) -> dict:
        """tag_weight as applied: 0 when the data had no tags to read."""
        if self.scorer is not None and not self.tags_used:
            return {**self.params, "tag_weight": 0.0}
        return self.params

    def _solve(self, matrix: sp.csr_matrix, l2: float, dropout: float, tags: sp.csr_matrix | None = None,
               tag_weight: float = 0.0) -> np.ndarray:
        n_items = matrix.shape[1]
        # Unlike implicit, nothing else runs threads here: BLAS may use every core (threads = 0).
        with threadpool_limits(int(self.params["threads"]) or os.cpu_count() or 1, "blas"):
            matrix = matrix.astype(np.float64)
            gram = (matrix.T @ matrix).toarray()
            if tags is not None:  # Z'Z for Z = X [I, w G]: [[A, w A G], [w G'A, w^2 G'A G]]
                spread = tag_weight * np.asarray(tags.T.astype(np.float64) @ gram).T  # w A G (A is symmetric)
                gram = np.block([[gram, spread], [spread.T, tag_weight * (tags.T.astype(np.float64) @ spread)]])
                del spread
            gram[np.diag_indices_from(gram)] *= 1.0 / (1.0 - dropout)  # G_ii + dropout / (1 - dropout) G_ii
            gram[np.diag_indices_from(gram)] += l2
            inverse = np.linalg.inv(gram)
            del gram
            weights = inverse[:, :n_items]
            weights /= -np.diag(inverse)[:n_items]  # column j divided by -P[j, j]
            weights[np.arange(n_items), np.arange(n_items)] = 0.0
            if tags is not None:  # B_items + w G B_tags: the tag inputs folded back onto the items that carry them
                weights = weights[:n_items] + tag_weight * np.asarray(tags.astype(np.float64) @ weights[n_items:])
                np.fill_diagonal(weights, 0.0)
        return np.ascontiguousarray(weights, dtype=np.float32)


def _embed(block: np.ndarray, kept: np.ndarray, n_items: int) -> sp.csr_matrix:
    """The kept items' weights placed in the full item space, as a sparse matrix."""
    rows, cols = np.nonzero(block)
    return sp.csr_matrix((block[rows, cols], (kept[rows], kept[cols])), shape=(n_items, n_items), dtype=np.float32)
