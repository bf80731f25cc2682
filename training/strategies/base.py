"""The one interface every strategy honours: fit, recommend, similar, explain, save, load."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from recsvc.errors import InvalidInput
from recsvc.scoring import Scorer, load_scorer, top_k


@dataclass
class TrainingData:
    """What a strategy learns from: customers x items strengths, plus per-row times when known."""

    matrix: sp.csr_matrix
    timestamps: np.ndarray | None = None  # float64 Unix seconds aligned with `interactions` rows
    interactions: tuple[np.ndarray, np.ndarray] | None = None  # (customer, item) per raw row, for time-aware strategies
    item_tags: sp.csr_matrix | None = None  # items x tags from the catalog's tags column (ease's tag_weight)


# Checks of the numeric parameters by name, for every strategy (a blend's parts check their own): a wrong value
# stops the run before any data is read, with a message, instead of a traceback, garbage, or worse (implicit's
# item_knn crashes the process with neighbours = 0).
_WHOLE_AT_LEAST_1 = ("factors", "iterations", "neighbours", "ensemble", "max_items")
_WHOLE_AT_LEAST_0 = ("seed", "threads")
_AT_LEAST_0 = ("regularization", "bm25_k1", "graph_weight", "ideal_weight", "weight_gf", "tag_weight")
_ABOVE_0 = ("alpha", "learning_rate", "window_days", "l2", "max_memory_mb")
_FROM_0_TO_1 = ("bm25_b", "weight_als")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # NaN fails


def _parameter_problem(name: str, value) -> str | None:
    """Why `value` cannot be parameter `name`, or None."""
    if name in _WHOLE_AT_LEAST_1 + _WHOLE_AT_LEAST_0:
        least = 1 if name in _WHOLE_AT_LEAST_1 else 0
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            return f"must be a whole number of at least {least}"
    elif name in _AT_LEAST_0 and not (_is_number(value) and value >= 0):
        return "must be a number of at least 0"
    elif name in _ABOVE_0 and not (_is_number(value) and value > 0):
        return "must be a positive number"
    elif name in _FROM_0_TO_1 and not (_is_number(value) and 0 <= value <= 1):
        return "must be a number from 0 to 1"
    return None


class Strategy(ABC):
    """A named way to turn training data into a Scorer.

    `fit` is the only method that learns; the rest use the fitted scorer, exactly
    as the server will after `save` and `load`.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict] = {}
    search_space: ClassVar[dict[str, list]] = {}  # candidate values per parameter, for `recsvc-train tune`

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise InvalidInput(f"{self.name}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                               f"known: {', '.join(sorted(self.defaults)) or 'none'}")
        self.params = {**self.defaults, **params}
        for name, value in self.params.items():
            problem = _parameter_problem(name, value)
            if problem:
                raise InvalidInput(f"{self.name}: {name} {problem}, not {value!r}")
        self.scorer: Scorer | None = None

    @abstractmethod
    def fit(self, data: TrainingData) -> Scorer:
        """Learn from data; sets and returns self.scorer."""

    def served_params(self) -> dict:
        """The parameters as the fitted model applies them: what the manifest (and GET /v1/models) shows."""
        return self.params

    def _fitted(self) -> Scorer:
        if self.scorer is None:
            raise RuntimeError(f"{self.name} is not fitted")
        return self.scorer

    def recommend(self, customer: int | None, history: np.ndarray, n: int = 10,
                  filter_history: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-n (item positions, scores) for a customer; their history is left out unless asked for."""
        scores = self._fitted().scores(customer, history)
        return top_k(scores, n, history if filter_history else None)

    def similar(self, item: int, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-n items like `item`, itself excluded."""
        return top_k(self._fitted().similar(item).astype(np.float32, copy=True), n, np.array([item]))

    def explain(self, item: int, history: np.ndarray, n: int = 2) -> np.ndarray:
        """Up to n history items that speak most for `item`, strongest first (only positive ones)."""
        weights = self._fitted().contributions(item, history)
        order = np.argsort(-weights, kind="stable")[:n]
        return history[order[weights[order] > 0]]

    def save(self, directory: Path) -> None:
        self._fitted().save(Path(directory))

    @classmethod
    def load(cls, directory: Path, **params) -> "Strategy":
        strategy = cls(**params)
        strategy.scorer = load_scorer(Path(directory))
        return strategy
