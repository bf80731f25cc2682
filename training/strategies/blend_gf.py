"""EASE, ALS and GF-CF's low-pass filter blended: a weighted sum of three scorers, served as one blend scorer."""

from __future__ import annotations

from training.strategies.als import ALSStrategy
from training.strategies.blend import EASEALSStrategy
from training.strategies.ease import EASEStrategy
from training.strategies.gf_cf import GFCFStrategy

PARTS = {"ease": EASEStrategy, "als": ALSStrategy, "gf": GFCFStrategy}


class EASEALSGFStrategy(EASEALSStrategy):
    """`weight_als` x ALS + (1 - weight_als) x EASE + `weight_gf` x GF-CF, each part's scores divided
    by their mean absolute value over a sample of training customers (as in ease_als). The GF-CF part
    is its ideal low-pass filter alone by default (gf_graph_weight = 0): a low-rank view of the
    item graph that neither EASE nor ALS gives. Parts' own parameters carry their prefix."""

    name = "ease_als_gf"
    parts = PARTS
    defaults = {**EASEALSStrategy.defaults, "weight_als": 0.7, "ease_l2": 1500.0, "als_factors": 32,
                "als_regularization": 50.0, "als_alpha": 10.0, "weight_gf": 0.05,
                **{f"gf_{key}": value for key, value in GFCFStrategy.defaults.items()},
                "gf_graph_weight": 0.0, "gf_ideal_weight": 1.0, "gf_factors": 32}
    search_space = {
        "weight_als": [0.6, 0.7, 0.8],
        "weight_gf": [0.0, 0.05, 0.1, 0.2],
        "gf_factors": [16, 32, 64],
    }

    def weights(self) -> dict[str, float]:
        return {**super().weights(), "gf": float(self.params["weight_gf"])}
