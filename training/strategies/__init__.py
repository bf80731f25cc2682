"""Every strategy recsvc-train can fit, by name."""

from training.strategies.als import ALSStrategy
from training.strategies.base import Strategy, TrainingData
from training.strategies.blend import EASEALSStrategy
from training.strategies.blend_gf import EASEALSGFStrategy
from training.strategies.bpr import BPRStrategy
from training.strategies.ease import EASEStrategy
from training.strategies.gf_cf import GFCFStrategy
from training.strategies.item_knn import ItemKNNStrategy
from training.strategies.popular import PopularStrategy, TrendingStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (ALSStrategy, BPRStrategy, ItemKNNStrategy, EASEStrategy, EASEALSStrategy, GFCFStrategy,
                              EASEALSGFStrategy, PopularStrategy, TrendingStrategy)
}

__all__ = ["STRATEGIES", "Strategy", "TrainingData"]
