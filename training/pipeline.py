"""The fit chain: ingest -> prepare -> split -> fit and evaluate each strategy -> quality gate -> publish."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from recsvc import artifacts
from recsvc.artifacts import Catalog, IdIndex, ModelBundle
from recsvc.errors import ArtifactError, InvalidInput, RecsvcError
from recsvc.scoring import Scorer
from training.config import TrainConfig
from training.evaluate import check_k, evaluate, split, split_by_time
from training.ingest import FileFingerprints, Interactions, load_catalog, load_interactions
from training.prepare import PrepareReport, prepare
from training.registry import apply_retention, make_current, remove_version, sweep_leftovers
from training.runlog import RunLog
from training.strategies import STRATEGIES, Strategy, TrainingData

LIBRARIES = ("numpy", "scipy", "implicit", "pyarrow", "recsvc")


@dataclass
class GateDecision:
    """Whether the quality gate lets a new model become current, and why."""

    passed: bool
    reason: str
    metric: str
    new_value: float
    current_version: str | None = None
    current_value: float | None = None
    threshold: float | None = None
    forced: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    version: str
    path: Path | None  # None when the gate refused: nothing was written
    metrics: dict[str, dict[str, float]]
    default_strategy: str
    published: bool
    gate: GateDecision
    timings: dict[str, float] = field(default_factory=dict)
    removed_versions: list[str] = field(default_factory=list)


@dataclass
class PreparedData:
    interactions: Interactions
    prepare_report: PrepareReport
    catalog: Catalog
    matrix: sp.csr_matrix
    held_out: int | None = None  # customer-item pairs in the evaluation's test split, once split


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


def choose_default(metrics: dict[str, dict[str, float]], primary: str, scorers: dict[str, Scorer]) -> str:
    """The best personal strategy by the primary metric; a non-personal one (popular, trending) only
    when nothing else was trained, since the fallback chain already ends in popularity."""
    personal = [name for name in metrics if scorers[name].personal] or list(metrics)
    return max(personal, key=lambda name: metrics[name].get(primary, float("-inf")))


def evaluation_basis(config: TrainConfig) -> dict:
    """What must match for two models' offline metrics to be comparable: the holdout definition,
    k, the primary metric and the population filters (they decide who and what is tested)."""
    return {"holdout": config.holdout.as_dict(), "k": config.k, "primary_metric": config.primary_metric,
            "population": {"min_items_per_customer": config.ingest.min_items_per_customer,
                           "min_customers_per_item": config.ingest.min_customers_per_item}}


def config_digest(config: TrainConfig, fingerprint: str, catalog_fingerprint: str | None) -> str:
    """Digest of everything that decides a trained model: data, catalog, strategies, parameters and options."""
    basis = {"data": fingerprint, "catalog": catalog_fingerprint, "strategies": config.strategies,
             "params": config.params, "ingest": asdict(config.ingest), "evaluation": evaluation_basis(config)}
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()


def build_strategies(names: list[str], config: TrainConfig) -> dict[str, Strategy]:
    """Unfitted strategies with the configured parameters; a wrong parameter is the user's input error,
    reported before any data is read."""
    try:
        return {name: STRATEGIES[name](**config.params.get(name, {})) for name in names}
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"invalid strategy parameters: {exc}") from exc


def load_prepared(interactions_files: Path | Sequence[Path], config: TrainConfig, catalog_path: Path | None,
                  log: RunLog, fingerprints: FileFingerprints | None = None) -> PreparedData:
    """Read, validate, decay and filter the interactions (one file, or several files and glob patterns read as
    one: training.ingest.interactions_files); InvalidInput for unusable input. `fingerprints`: files hashed
    already in this run (nightly's up-to-date check)."""
    interactions = load_interactions(interactions_files, config.ingest,
                                     need_timestamps=config.holdout.kind == "time", fingerprints=fingerprints)
    if interactions.report.bad_rows:
        # the counts as fields, flat as in the refusal's error line: bad_rows, total_rows, by_reason
        log.warning(interactions.report.summary(), **interactions.report.as_dict())
    interactions, report = prepare(interactions, config.ingest)
    log.info(report.summary(), prepare=report.as_dict())
    catalog = (load_catalog(catalog_path, interactions.items, warn=log.warning) if catalog_path
               else Catalog.empty(len(interactions.items)))
    matrix = interactions.matrix()
    log.info(f"{len(interactions)} interactions, {matrix.shape[0]} customers, {matrix.shape[1]} items",
             interactions=len(interactions), customers=matrix.shape[0], items=matrix.shape[1])
    return PreparedData(interactions, report, catalog, matrix)


def holdout_split(data: PreparedData, config: TrainConfig) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(train, test) by the configured holdout kind."""
    if config.holdout.kind == "random":
        return split(data.matrix, config.holdout)
    events = data.interactions
    if events.timestamp is None:
        raise InvalidInput("the time-based holdout needs a timestamp column in the interactions file")
    return split_by_time(data.matrix, events.customer, events.item, events.strength, events.timestamp, config.holdout)


def fit_strategies(data: PreparedData, train: sp.csr_matrix, test: sp.csr_matrix, strategies: dict[str, Strategy],
                   config: TrainConfig, log: RunLog) -> tuple[dict[str, Scorer], dict, dict]:
    """Fit and evaluate each strategy on the same split: (scorers, metrics, parameters) by name."""
    inactive = np.flatnonzero(~data.catalog.active)
    # Raw rows with their times let time-aware strategies (trending) rank recent interest;
    # they keep only rows whose pair is in `train`, so held-out rows never leak.
    training = TrainingData(train, timestamps=data.interactions.timestamp,
                            interactions=(data.interactions.customer, data.interactions.item),
                            item_tags=data.catalog.tags)
    from implicit.recommender_base import ModelFitError

    scorers, metrics, params = {}, {}, {}
    for name, strategy in strategies.items():
        with log.step(f"fit.{name}"):
            try:
                scorers[name] = strategy.fit(training)
            except ModelFitError as exc:  # NaN factors: no model to publish, and no traceback to read
                raise RecsvcError(f"{name} could not be fitted ({exc}); lower its learning rate or regularisation, "
                                  "or look for extreme weights in the data") from exc
        with log.step(f"evaluate.{name}"):
            metrics[name] = evaluate(scorers[name], train, test, k=config.k, exclude_items=inactive)
        params[name] = strategy.served_params()
    return scorers, metrics, params


def gate_decision(registry: Path, config: TrainConfig, new_value: float, force: bool = False,
                  measured: bool = True) -> GateDecision:
    """Compare the new default strategy's primary metric with the current model's, recorded in its
    manifest, when both were measured on the same evaluation basis (see docs/training.md)."""
    metric = config.primary_metric
    decision = GateDecision(passed=True, reason="", metric=metric, new_value=new_value, forced=force)
    current = artifacts.current_version(registry)
    if current is None:
        decision.reason = "no current model: the first model is published"
        return decision
    decision.current_version = current
    if not measured:  # every metric is 0 then: 0 >= (1 - tolerance) x 0 would pass any model
        return _refuse(decision, "the holdout is empty, so the new model could not be measured against the "
                                 f"current model {current}", force)
    try:
        manifest = artifacts.read_manifest(artifacts.versions_root(registry) / current)
        basis = manifest.get("evaluation", {}).get("basis")
        recorded = manifest["strategies"][manifest["default_strategy"]]["metrics"][metric]
    except (ArtifactError, KeyError, TypeError) as exc:
        return _refuse(decision, f"the current model {current} has no comparable {metric} ({exc})", force)
    if basis != evaluation_basis(config):
        return _refuse(decision, f"the current model {current} was evaluated on a different basis "
                                 f"({json.dumps(basis, sort_keys=True)}); the metrics are not comparable", force)
    decision.current_value = float(recorded)
    decision.threshold = (1 - config.gate.tolerance) * decision.current_value
    if new_value >= decision.threshold:
        decision.reason = (f"{metric} {new_value:.4f} >= {decision.threshold:.4f} "
                           f"(current {current}: {decision.current_value:.4f}, tolerance {config.gate.tolerance:.0%})")
        return decision
    return _refuse(decision, f"{metric} {new_value:.4f} < {decision.threshold:.4f} = (1 - {config.gate.tolerance:g}) x "
                             f"the current model's {decision.current_value:.4f} ({current})", force)


def _refuse(decision: GateDecision, reason: str, force: bool) -> GateDecision:
    decision.passed = force
    decision.reason = f"{reason}; published anyway (--force)" if force else reason
    return decision


def fit_and_publish(interactions_files: Path | Sequence[Path], registry: Path, config: TrainConfig,
                    catalog_path: Path | None = None, log: RunLog | Callable[[str], None] | None = print,
                    force: bool = False, fingerprints: FileFingerprints | None = None) -> FitResult:
    """Train every configured strategy, evaluate it on a holdout and, when the quality gate passes
    (or `force`), publish a new current version and apply retention. `fingerprints`: the input files (and
    catalog) hashed already in this run, so that nightly reads each file's bytes to hash it once."""
    started = time.perf_counter()
    log = RunLog.of(log)
    fingerprints = fingerprints or FileFingerprints()
    names = resolve_strategies(config.strategies)
    strategies = build_strategies(names, config)
    with log.steps(total=3 + 2 * len(names)):
        data, scorers, metrics, params = _train_and_evaluate(interactions_files, config, catalog_path, log, strategies,
                                                             fingerprints=fingerprints)
        default = choose_default(metrics, config.primary_metric, scorers)
        gate = gate_decision(registry, config, metrics[default].get(config.primary_metric, 0.0), force,
                             measured=bool(data.held_out))
        manifest = _manifest(data, names, params, metrics, default, config, log.seconds, gate,
                             fingerprints.file(catalog_path) if catalog_path else None)
        if not gate.passed:
            log.seconds["total"] = time.perf_counter() - started
            return FitResult(manifest["version"], None, metrics, default, False, gate, dict(log.seconds))
        with log.step("publish"):
            sweep_leftovers_step(registry, log)
            path, removed = publish(registry, data, scorers, manifest, config.keep_versions)
    log.seconds["total"] = time.perf_counter() - started
    return FitResult(manifest["version"], path, metrics, default, True, gate, dict(log.seconds), removed)


def publish(registry: Path, data: PreparedData, scorers: dict[str, Scorer], manifest: dict,
            keep_versions: int) -> tuple[Path, list[str]]:
    """Write the version, switch CURRENT to it, then apply retention: (version path, removed version ids)."""
    bundle = ModelBundle(manifest=manifest, customers=IdIndex(data.interactions.customers),
                         items=IdIndex(data.interactions.items), owned=data.matrix, catalog=data.catalog,
                         scorers=scorers)
    path = artifacts.write_version(registry, bundle)
    try:
        make_current(registry, bundle.version)
    except BaseException:  # SIGTERM too (training.cli.Terminated)
        with contextlib.suppress(OSError, RecsvcError):
            if artifacts.current_version(registry) != bundle.version:  # never current: no server maps it
                remove_version(registry, bundle.version)
        raise
    return path, apply_retention(registry, keep_versions)


def sweep_leftovers_step(registry: Path, log: RunLog) -> None:
    """Remove the hidden staging and deleting directories that killed runs left (a whole model each)."""
    swept = sweep_leftovers(registry)
    if swept:
        log.warning(f"removed what interrupted runs left in {registry}: {', '.join(swept)}", swept=swept)


def _manifest(data: PreparedData, names: list[str], params: dict, metrics: dict, default: str,
              config: TrainConfig, seconds: dict, gate: GateDecision, catalog_fingerprint: str | None) -> dict:
    interactions = data.interactions
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "version": artifacts.new_version_id(interactions.fingerprint, now),
        "created_at": now.isoformat(timespec="seconds"),
        "data": {
            "fingerprint": interactions.fingerprint,
            "files": interactions.files,
            "catalog_fingerprint": catalog_fingerprint,
            "rows": interactions.report.total_rows,
            "bad_rows": interactions.report.as_dict(),
            "prepare": data.prepare_report.as_dict(),
            "interactions": len(interactions),
            "customer_item_pairs": int(data.matrix.nnz),
            "customers": int(len(interactions.customers)),
            "items": int(len(interactions.items)),
        },
        "strategies": {name: {"params": params[name], "metrics": metrics[name],
                              "train_seconds": round(seconds[f"fit.{name}"], 3)} for name in names},
        "default_strategy": default,
        "evaluation": {"holdout": config.holdout.as_dict(), "k": config.k, "primary_metric": config.primary_metric,
                       "basis": evaluation_basis(config)},
        "gate": gate.as_dict(),
        "config_digest": config_digest(config, interactions.fingerprint, catalog_fingerprint),
        "timings": {name: round(value, 3) for name, value in seconds.items()},
        "libraries": _library_versions(),
    }


def compare_strategies(interactions_files: Path | Sequence[Path], config: TrainConfig,
                       catalog_path: Path | None = None,
                       log: RunLog | Callable[[str], None] | None = None) -> tuple[dict[str, dict[str, float]], str]:
    """The offline comparison `fit` makes, without publishing anything: (metrics by strategy, best personal)."""
    log = RunLog.of(log)
    names = resolve_strategies(config.strategies)
    strategies = build_strategies(names, config)
    with log.steps(total=2 + 2 * len(names)):  # `recsvc-train evaluate`, which takes --k
        _data, scorers, metrics, _params = _train_and_evaluate(interactions_files, config, catalog_path, log,
                                                               strategies,
                                                               k_setting="--k (or [evaluation] k in the config)")
    return metrics, choose_default(metrics, config.primary_metric, scorers)


def _train_and_evaluate(interactions_files: Path | Sequence[Path], config: TrainConfig, catalog_path: Path | None,
                        log: RunLog, strategies: dict[str, Strategy], k_setting: str = "[evaluation] k in the config",
                        fingerprints: FileFingerprints | None = None,
                        ) -> tuple[PreparedData, dict[str, Scorer], dict, dict]:
    """The steps fit and evaluate share: ingest, holdout split, fit and score every strategy. `k_setting`: what
    sets k for the command that runs, named when k is above the number of items."""
    with log.step("ingest"):
        data = load_prepared(interactions_files, config, catalog_path, log, fingerprints)
    check_k(config.k, data.matrix.shape[1], k_setting)  # before an hour of fitting, not after the first strategy
    with log.step("split"):
        train, test = holdout_split(data, config)
    data.held_out = int(test.nnz)
    if not test.nnz:
        why = (f"no customer has {config.holdout.min_items} items or more to hold some out"
               if config.holdout.kind == "random" else
               f"no customer has a new item in the last {config.holdout.days:g} days and "
               f"{config.holdout.min_items} or more before them")
        log.warning(f"the holdout is empty ({why}): every metric is 0, so they cannot tell strategies apart, "
                    "and the gate refuses to replace a current model")
    scorers, metrics, params = fit_strategies(data, train, test, strategies, config, log)
    return data, scorers, metrics, params
