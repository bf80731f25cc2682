"""Hyper-parameter search for one strategy on a validation split carved from the training part only."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import tomlkit
from tomlkit.exceptions import TOMLKitError

from recsvc.errors import InvalidInput
from recsvc.files import write_atomically
from training.config import TrainConfig
from training.evaluate import METRICS, check_k, evaluate, split
from training.pipeline import PreparedData, holdout_split, load_prepared
from training.runlog import RunLog
from training.strategies import STRATEGIES, TrainingData

SEARCHES = ("random", "grid")
LEADERBOARD_METRICS = ("ndcg", "precision", "recall", "map")


@dataclass
class Trial:
    params: dict  # only the searched parameters
    metrics: dict[str, float]
    seconds: float
    current: bool = False  # the parameters the config already had


@dataclass
class TuneResult:
    strategy: str
    metric: str
    trials: list[Trial]  # best first
    folds: int = 1

    @property
    def best(self) -> Trial:
        return self.trials[0]


def parse_metric(metric: str) -> tuple[str, int]:
    """("ndcg", 10) from "ndcg@10"; InvalidInput for anything else."""
    name, _, k = metric.partition("@")
    choices = [m for m in METRICS if m != "coverage"]
    if name not in choices or not k.isdigit() or int(k) < 1:
        raise InvalidInput(f"metric {metric!r} is not one of {', '.join(f'{m}@K' for m in choices)} "
                           "(K a positive number)")
    return name, int(k)


def tuning_splits(data: PreparedData, config: TrainConfig) -> tuple[list[tuple[sp.csr_matrix, sp.csr_matrix]],
                                                                     sp.csr_matrix]:
    """([(fit part, validation)] per fold, test). The test split is the one `fit` evaluates on (random
    or time holdout) and is never used here: each fold's validation is carved from the training part
    by a per-customer random split ([tuning] validation_fraction, else the holdout's fraction) with
    the holdout's seed + 1, + 2, ..."""
    train, test = holdout_split(data, config)
    fraction = config.tuning.validation_fraction or config.holdout.fraction
    folds = [split(train, replace(config.holdout, kind="random", fraction=fraction, seed=config.holdout.seed + fold))
             for fold in range(1, config.tuning.folds + 1)]
    return folds, test


def candidates(space: dict[str, list], trials: int, search: str, seed: int) -> list[dict]:
    """Up to `trials` distinct parameter sets: the grid in order, or a seeded random sample of it."""
    names = sorted(space)
    grid = [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]
    if search == "grid" or trials >= len(grid):
        return grid[:trials]
    picks = np.random.default_rng(seed).choice(len(grid), size=trials, replace=False)
    return [grid[int(i)] for i in picks]


def tune(data: PreparedData, strategy: str, config: TrainConfig, trials: int, metric: str = "ndcg@10",
         search: str = "random", seed: int = 42, log: Callable[[str], None] = print) -> TuneResult:
    """Fit `strategy` once per candidate (plus the config's current parameters) on the fit part,
    score each on the validation split, and rank them by `metric`, best first."""
    cls = _strategy_class(strategy)
    if search not in SEARCHES:
        raise InvalidInput(f"search must be one of {', '.join(SEARCHES)}, not {search!r}")
    name, k = parse_metric(metric)
    check_k(k, data.matrix.shape[1], setting=f"the K of --metric {metric}")
    folds, _test = tuning_splits(data, config)
    base = {**cls.defaults, **config.params.get(strategy, {})}
    space = search_space(strategy, config)
    current = {p: base[p] for p in space}
    runs = [current, *(c for c in candidates(space, trials, search, seed) if c != current)]
    for params in runs:  # a wrong value in the space stops the search before the first trial, not during it
        cls(**{**base, **params})
    results = []
    for number, params in enumerate(runs):
        started = time.perf_counter()
        scores = _cross_validate(data, cls(**{**base, **params}), folds, k)
        results.append(Trial(params, scores, time.perf_counter() - started, current=number == 0))
        log(f"trial {number + 1}/{len(runs)}: {_describe(params)} -> {metric} {scores[metric]:.4f}")
    results.sort(key=lambda t: -t.metrics[metric])
    return TuneResult(strategy, metric, results, folds=len(folds))


def search_space(strategy: str, config: TrainConfig) -> dict[str, list]:
    """The config's [tuning.space.<strategy>] when given, else the strategy's own; InvalidInput for
    a parameter the strategy does not have."""
    cls = _strategy_class(strategy)
    space = config.tuning.space.get(strategy) or cls.search_space
    unknown = sorted(set(space) - set(cls.defaults))
    if unknown:
        raise InvalidInput(f"tuning.space.{strategy}: {', '.join(unknown)} not among {strategy}'s parameters "
                           f"({', '.join(sorted(cls.defaults))})")
    if not space:
        raise InvalidInput(f"{strategy} has no parameters to tune")
    return space


def _cross_validate(data: PreparedData, strategy, folds: list[tuple[sp.csr_matrix, sp.csr_matrix]],
                    k: int) -> dict[str, float]:
    """The strategy fitted on each fold's fit part and scored on its validation: metrics averaged over folds."""
    per_fold = []
    for fit_part, validation in folds:
        # Raw rows let trending see times; it keeps only rows whose pair is in the fit part.
        training = TrainingData(fit_part, timestamps=data.interactions.timestamp,
                                interactions=(data.interactions.customer, data.interactions.item),
                                item_tags=data.catalog.tags)
        per_fold.append(evaluate(strategy.fit(training), fit_part, validation, k=k))
    return {name: float(np.mean([scores[name] for scores in per_fold])) for name in per_fold[0]}


def _strategy_class(strategy: str):
    if strategy not in STRATEGIES:
        raise InvalidInput(f"unknown strategy {strategy!r}; choose from {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[strategy]


def _describe(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def run(interactions_files: Path | Sequence[Path], strategy: str, config: TrainConfig, trials: int, metric: str,
        search: str = "random", seed: int = 42, log: Callable[[str], None] = print,
        catalog_path: Path | None = None) -> TuneResult:
    """Read and prepare the interactions exactly as `fit` does (weights, decay, filters) and tune on them; the
    catalog's tags reach the strategies as in `fit` (ease's tag_weight)."""
    search_space(strategy, config)  # a wrong name or space fails before the data is read
    parse_metric(metric)
    data = load_prepared(interactions_files, config, catalog_path, RunLog(sink=log))
    return tune(data, strategy, config, trials, metric, search, seed, log=log)


def format_leaderboard(result: TuneResult) -> str:
    """Rank, metrics on the validation split, seconds and parameters; the config's current set is marked."""
    k = parse_metric(result.metric)[1]
    columns = [f"{m}@{k}" for m in LEADERBOARD_METRICS]
    header = ["rank", *columns, "seconds", "parameters"]
    rows = [[str(rank), *(f"{t.metrics[c]:.4f}" for c in columns), f"{t.seconds:.1f}",
             _describe(t.params) + ("  (current)" if t.current else "")]
            for rank, t in enumerate(result.trials, start=1)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == len(header) - 1 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([f"{result.strategy}: {len(result.trials)} trials ranked by {result.metric}, the mean over "
                      f"{result.folds} validation fold(s) carved from the training part",
                      *lines])


def write_best(path: Path, result: TuneResult) -> None:
    """Put the best parameters under [strategies.<name>] of a TOML (or .json) config, keeping the
    rest of the file (TOML comments and layout included) and its permissions; creates the file when missing.

    The new text replaces the file in one rename: a full disk leaves the old config whole, never cut.
    """
    path = Path(path)
    best = {k: v.item() if isinstance(v, np.generic) else v for k, v in result.best.params.items()}
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        if path.suffix == ".json":
            raw = json.loads(text or "{}")
            raw.setdefault("strategies", {}).setdefault(result.strategy, {}).update(best)
            updated = json.dumps(raw, indent=2) + "\n"
        else:
            document = tomlkit.parse(text)
            strategies = document.setdefault("strategies", tomlkit.table(is_super_table=True))
            if result.strategy in strategies:
                strategies[result.strategy].update(best)
            else:
                table = tomlkit.table()
                table.update(best)
                strategies[result.strategy] = table.add(tomlkit.nl())  # a blank line before the next table
            updated = tomlkit.dumps(document)
    except (ValueError, AttributeError, TypeError, TOMLKitError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidInput(f"{path}: cannot update the configuration: {exc}") from exc
    write_atomically(path, updated)  # OSError: exit 2 for the path (permission), 1 for the machine (disk full)
