"""Every strategy recsvc-train can fit, by name."""

from training.strategies.als import ALSStrategy
from training.strategies.base import Strategy, TrainingData
from training.strategies.popular import PopularStrategy

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (ALSStrategy, PopularStrategy)}

__all__ = ["STRATEGIES", "Strategy", "TrainingData"]
