"""Alternating least squares for implicit feedback (implicit.als), served as latent factors."""

from __future__ import annotations

import numpy as np
from implicit.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from recsvc.scoring import FactorScorer
from training.strategies.base import Strategy, TrainingData


class ALSStrategy(Strategy):
    """implicit's ALS. With `ensemble` = n > 1, n models from seeds seed, seed + 1, ... are averaged:
    served as one factor model whose columns are the n models' side by side (customer factors divided
    by n), so a request still costs one product and the average smooths out one seed's luck."""

    name = "als"
    defaults = {"factors": 32, "regularization": 1.0, "alpha": 1.0, "iterations": 15, "seed": 42, "ensemble": 1}
    search_space = {
        "factors": [32, 64, 128],
        "regularization": [0.1, 1.0, 10.0, 30.0, 50.0, 100.0],
        "alpha": [1.0, 2.0, 5.0, 10.0, 20.0],
        "iterations": [15, 30],
    }

    def fit(self, data: TrainingData) -> FactorScorer:
        p = self.params
        n = int(p["ensemble"])
        users, items = zip(*(self._fit_one(data, int(p["seed"]) + i) for i in range(n)))
        # One model is kept as it is: no copy of arrays that can take gigabytes.
        user_factors = users[0] if n == 1 else np.hstack(users) / np.float32(n)
        item_factors = items[0] if n == 1 else np.hstack(items)
        self.scorer = FactorScorer(np.ascontiguousarray(user_factors, dtype=np.float32),
                                   np.ascontiguousarray(item_factors, dtype=np.float32),
                                   regularization=float(p["regularization"]))
        return self.scorer

    def _fit_one(self, data: TrainingData, seed: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        # implicit runs its own threads; BLAS threads underneath would fight them (implicit checks this
        # when the model is built, so both steps sit inside the limit).
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(factors=int(p["factors"]), regularization=float(p["regularization"]),
                                            alpha=float(p["alpha"]), iterations=int(p["iterations"]),
                                            random_state=seed, calculate_training_loss=False)
            model.fit(data.matrix, show_progress=False)
        return np.asarray(model.user_factors, dtype=np.float32), np.asarray(model.item_factors, dtype=np.float32)
