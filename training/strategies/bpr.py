"""Bayesian personalised ranking (implicit.bpr), served as latent factors."""

from __future__ import annotations

import numpy as np
from implicit.bpr import BayesianPersonalizedRanking
from threadpoolctl import threadpool_limits

from recsvc.scoring import FactorScorer
from training.strategies.base import Strategy, TrainingData


class BPRStrategy(Strategy):
    """Pairwise ranking factors. implicit appends an item-bias column (and a constant 1 to every
    customer vector), so the factor dot product already includes the bias."""

    name = "bpr"
    defaults = {"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "iterations": 100, "seed": 42,
                "threads": 0}
    search_space = {
        "factors": [32, 64, 128],
        "learning_rate": [0.005, 0.01, 0.03, 0.05],
        "regularization": [0.001, 0.01, 0.05],
        "iterations": [50, 100, 200],
    }

    def fit(self, data: TrainingData) -> FactorScorer:
        p = self.params
        # threads=0 uses every core; with more than one thread the SGD updates race, so runs differ slightly.
        with threadpool_limits(1, "blas"):
            model = BayesianPersonalizedRanking(factors=int(p["factors"]), learning_rate=float(p["learning_rate"]),
                                                regularization=float(p["regularization"]),
                                                iterations=int(p["iterations"]), random_state=int(p["seed"]),
                                                num_threads=int(p["threads"]))
            model.fit(data.matrix, show_progress=False)
        model = model.to_cpu() if hasattr(model, "to_cpu") else model
        user_factors = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        item_factors = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        self.scorer = FactorScorer(user_factors, item_factors, regularization=1.0)
        return self.scorer
