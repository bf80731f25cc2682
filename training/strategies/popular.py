"""Popularity: the baseline every evaluation shows, the last step of the serving fallback chain, and trending."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsvc.scoring import PopularityScorer
from training.strategies.base import Strategy, TrainingData

SECONDS_PER_DAY = 86_400.0


class PopularStrategy(Strategy):
    """Items ranked by how many customers interacted with them."""

    name = "popular"

    def fit(self, data: TrainingData) -> PopularityScorer:
        self.scorer = PopularityScorer(_customers_per_item(data.matrix).astype(np.float32))
        return self.scorer


class TrendingStrategy(Strategy):
    """Items ranked by how many customers interacted with them in the last `window_days` before the
    newest interaction. Without timestamps it is plain popularity (window_days recorded as None).

    Only raw rows whose (customer, item) pair is in the training matrix count, so rows held out
    for evaluation never leak into the ranking. Ties (and items quiet in the window) are broken by
    all-time popularity, scaled below one customer so it never outranks a recent one.
    """

    name = "trending"
    defaults = {"window_days": 7.0}
    search_space = {"window_days": [1.0, 3.0, 7.0, 14.0, 30.0, 90.0]}

    def fit(self, data: TrainingData) -> PopularityScorer:
        overall = _customers_per_item(data.matrix).astype(np.float64)
        if data.timestamps is None or data.interactions is None or not len(data.timestamps):
            self.scorer = PopularityScorer(overall.astype(np.float32), window_days=None)
            return self.scorer
        window = float(self.params["window_days"])
        customer, item = (np.asarray(a, dtype=np.int64) for a in data.interactions)
        recent = data.timestamps >= np.nanmax(data.timestamps) - window * SECONDS_PER_DAY
        recent &= _in_matrix(data.matrix, customer, item)
        recent_counts = _customers_per_item(
            sp.csr_matrix((np.ones(recent.sum(), dtype=np.float32), (customer[recent], item[recent])),
                          shape=data.matrix.shape))
        tie_break = overall / (overall.max() + 1.0) if len(overall) else overall
        self.scorer = PopularityScorer((recent_counts + tie_break).astype(np.float32), window_days=window)
        return self.scorer

    def served_params(self) -> dict:
        """Without timestamps no window was applied: recorded as None, not the configured days."""
        if self.scorer is not None and self.scorer.window_days is None:
            return {**self.params, "window_days": None}
        return self.params


def _customers_per_item(matrix: sp.csr_matrix) -> np.ndarray:
    """Distinct customers per item (duplicate pairs count once)."""
    matrix = matrix.tocsr()
    matrix.sum_duplicates()
    return np.bincount(matrix.indices[matrix.data != 0], minlength=matrix.shape[1])


def _in_matrix(matrix: sp.csr_matrix, customer: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Per row: is (customer, item) a nonzero of `matrix`?"""
    coo = matrix.tocoo()
    present = np.unique(coo.row[coo.data != 0].astype(np.int64) * matrix.shape[1] + coo.col[coo.data != 0])
    keys = customer * matrix.shape[1] + item
    pos = np.minimum(np.searchsorted(present, keys), max(len(present) - 1, 0))
    return (present[pos] == keys) if len(present) else np.zeros(len(keys), dtype=bool)
