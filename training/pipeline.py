"""The fit chain: ingest -> split -> fit each strategy -> evaluate -> write a version -> switch CURRENT."""

from __future__ import annotations

import datetime as dt
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from recsvc import artifacts
from recsvc.artifacts import Catalog, IdIndex, ModelBundle
from recsvc.errors import InvalidInput
from training.config import TrainConfig
from training.evaluate import evaluate, split
from training.ingest import Interactions, load_catalog, load_interactions
from training.strategies import STRATEGIES, TrainingData

LIBRARIES = ("numpy", "scipy", "implicit", "pyarrow", "recsvc")


@dataclass
class FitResult:
    version: str
    path: Path
    metrics: dict[str, dict[str, float]]
    default_strategy: str
    published: bool
    timings: dict[str, float] = field(default_factory=dict)


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def resolve_strategies(names: list[str]) -> list[str]:
    """Validated strategy names, with the popularity baseline always present."""
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise InvalidInput(f"unknown strategy {', '.join(unknown)}; choose from {', '.join(sorted(STRATEGIES))}")
    return list(dict.fromkeys([*names, "popular"]))


def choose_default(metrics: dict[str, dict[str, float]], primary: str) -> str:
    """The best personal strategy by the primary metric; popular only when it is the only one."""
    personal = [name for name in metrics if name != "popular"] or ["popular"]
    return max(personal, key=lambda name: metrics[name].get(primary, float("-inf")))


def fit_and_publish(interactions_path: Path, registry: Path, config: TrainConfig,
                    catalog_path: Path | None = None, log: Callable[[str], None] = print) -> FitResult:
    """Train every configured strategy, evaluate it on a holdout and publish a new current version."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    names = resolve_strategies(config.strategies)
    interactions = load_interactions(interactions_path, config.ingest)
    if interactions.report.bad_rows:
        log(interactions.report.summary())
    catalog = load_catalog(catalog_path, interactions.items) if catalog_path else Catalog.empty(len(interactions.items))
    matrix = interactions.matrix()
    timings["ingest"] = time.perf_counter() - started
    log(f"{len(interactions)} interactions, {matrix.shape[0]} customers, {matrix.shape[1]} items")

    train, test = split(matrix, config.holdout)
    inactive = np.flatnonzero(~catalog.active)
    scorers, metrics, params = {}, {}, {}
    for name in names:
        strategy = STRATEGIES[name](**config.params.get(name, {}))
        t0 = time.perf_counter()
        # Raw rows with their times let time-aware strategies (trending) rank recent interest;
        # they keep only rows whose pair is in `train`, so held-out rows never leak.
        scorers[name] = strategy.fit(TrainingData(train, timestamps=interactions.timestamp,
                                                  interactions=(interactions.customer, interactions.item)))
        timings[f"fit.{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics[name] = evaluate(scorers[name], train, test, k=config.k, exclude_items=inactive)
        timings[f"evaluate.{name}"] = time.perf_counter() - t0
        params[name] = strategy.params
        log(f"{name}: fitted in {timings[f'fit.{name}']:.1f}s")

    default = choose_default(metrics, config.primary_metric)
    manifest = _manifest(interactions, matrix.nnz, names, params, metrics, default, config, timings)
    bundle = ModelBundle(manifest=manifest, customers=IdIndex(interactions.customers),
                         items=IdIndex(interactions.items), owned=matrix, catalog=catalog, scorers=scorers)
    path = artifacts.write_version(registry, bundle)
    artifacts.set_current(registry, bundle.version)
    timings["total"] = time.perf_counter() - started
    return FitResult(bundle.version, path, metrics, default, published=True, timings=timings)


def _manifest(interactions: Interactions, pairs: int, names: list[str], params: dict, metrics: dict,
              default: str, config: TrainConfig, timings: dict) -> dict:
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "version": artifacts.new_version_id(interactions.fingerprint, now),
        "created_at": now.isoformat(timespec="seconds"),
        "data": {
            "fingerprint": interactions.fingerprint,
            "rows": interactions.report.total_rows,
            "bad_rows": interactions.report.as_dict(),
            "interactions": len(interactions),
            "customer_item_pairs": int(pairs),
            "customers": int(len(interactions.customers)),
            "items": int(len(interactions.items)),
        },
        "strategies": {name: {"params": params[name], "metrics": metrics[name],
                              "train_seconds": round(timings[f"fit.{name}"], 3)} for name in names},
        "default_strategy": default,
        "evaluation": {"holdout": config.holdout.as_dict(), "k": config.k, "primary_metric": config.primary_metric},
        "libraries": _library_versions(),
    }
