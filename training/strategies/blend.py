"""EASE and ALS blended: a weighted sum of their scores, served as one blend scorer."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from recsvc.scoring import BlendScorer, Scorer
from training.strategies.als import ALSStrategy
from training.strategies.base import Strategy, TrainingData
from training.strategies.ease import EASEStrategy

PARTS = {"ease": EASEStrategy, "als": ALSStrategy}
SCALE_SAMPLE = 2000  # customers whose scores set each part's typical magnitude


class EASEALSStrategy(Strategy):
    """`weight_als` x ALS + (1 - weight_als) x EASE, each part's scores divided by their mean absolute
    value over a sample of training customers. EASE's and ALS's own parameters carry their prefix
    (ease_l2, als_factors, ...); EASE's item limit applies as it does alone."""

    name = "ease_als"
    parts: ClassVar[dict[str, type[Strategy]]] = PARTS
    defaults = {"weight_als": 0.8,
                **{f"ease_{key}": value for key, value in EASEStrategy.defaults.items()},
                **{f"als_{key}": value for key, value in ALSStrategy.defaults.items()}}
    search_space = {
        "weight_als": [0.5, 0.6, 0.7, 0.8, 0.9],
        "ease_l2": [200.0, 400.0, 700.0, 1000.0, 1500.0, 2500.0, 4000.0],
        "als_factors": [32, 64],
        "als_regularization": [30.0, 50.0, 100.0],
        "als_alpha": [5.0, 10.0, 20.0],
    }

    def __init__(self, **params):
        super().__init__(**params)
        for name, cls in self.parts.items():
            cls(**self.part_params(name))  # a part's bad value stops here, before any data is read
        self.fitted_parts: dict[str, Strategy] = {}

    def part_params(self, part: str) -> dict:
        prefix = f"{part}_"
        return {key[len(prefix):]: value for key, value in self.params.items() if key.startswith(prefix)}

    def weights(self) -> dict[str, float]:
        """Each part's weight in the blend."""
        weight = float(self.params["weight_als"])
        return {"ease": 1.0 - weight, "als": weight}

    def fit(self, data: TrainingData) -> BlendScorer:
        self.fitted_parts = {name: cls(**self.part_params(name)) for name, cls in self.parts.items()}
        parts = {name: part.fit(data) for name, part in self.fitted_parts.items()}
        scales = {name: typical_magnitude(part, data) for name, part in parts.items()}
        self.scorer = BlendScorer(parts, self.weights(), scales)
        return self.scorer

    def served_params(self) -> dict:
        """The parameters as the fitted parts apply them (ease_tag_weight 0 without tags), under their prefix."""
        applied = {f"{name}_{key}": value for name, part in self.fitted_parts.items()
                   for key, value in part.served_params().items()}
        return {key: applied.get(key, value) for key, value in self.params.items()}


def typical_magnitude(scorer: Scorer, data: TrainingData) -> float:
    """Mean absolute score over a fixed sample of customers with history (1.0 when there is none)."""
    matrix = data.matrix.tocsr()
    customers = np.flatnonzero(np.diff(matrix.indptr) > 0)
    if not len(customers):
        return 1.0
    sample = customers[np.linspace(0, len(customers) - 1, min(SCALE_SAMPLE, len(customers))).astype(np.int64)]
    magnitude = float(np.abs(scorer.scores_batch(sample, matrix[sample])).mean())
    return magnitude if magnitude > 0 else 1.0
