"""Popularity: the baseline every evaluation shows, and the last step of the serving fallback chain."""

from __future__ import annotations

import numpy as np

from recsvc.scoring import PopularityScorer
from training.strategies.base import Strategy, TrainingData


class PopularStrategy(Strategy):
    """Items ranked by how many customers interacted with them."""

    name = "popular"

    def fit(self, data: TrainingData) -> PopularityScorer:
        customers_per_item = np.bincount(data.matrix.indices, minlength=data.matrix.shape[1])
        self.scorer = PopularityScorer(customers_per_item.astype(np.float32))
        return self.scorer
