"""Alternating least squares for implicit feedback (implicit.als), served as latent factors."""

from __future__ import annotations

import numpy as np
from implicit.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from recsvc.scoring import FactorScorer
from training.strategies.base import Strategy, TrainingData


class ALSStrategy(Strategy):
    name = "als"
    defaults = {"factors": 32, "regularization": 1.0, "alpha": 1.0, "iterations": 15, "seed": 42}
    search_space = {
        "factors": [32, 64, 128],
        "regularization": [0.1, 1.0, 10.0, 30.0, 50.0, 100.0],
        "alpha": [1.0, 2.0, 5.0, 10.0, 20.0],
        "iterations": [15, 30],
    }

    def fit(self, data: TrainingData) -> FactorScorer:
        p = self.params
        # implicit runs its own threads; BLAS threads underneath would fight them (implicit checks this
        # when the model is built, so both steps sit inside the limit).
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(factors=int(p["factors"]), regularization=float(p["regularization"]),
                                            alpha=float(p["alpha"]), iterations=int(p["iterations"]),
                                            random_state=int(p["seed"]), calculate_training_loss=False)
            model.fit(data.matrix, show_progress=False)
        user_factors = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        item_factors = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        self.scorer = FactorScorer(user_factors, item_factors, regularization=float(p["regularization"]))
        return self.scorer
