"""Trainer configuration: one TOML or JSON file shared by fit, tune and nightly; defaults when absent."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from recsvc.config import redacted_url, redis_url_problem
from recsvc.errors import InvalidInput
from training.evaluate import METRICS, Holdout
from training.ingest import IngestOptions

DEFAULT_STRATEGIES = ("als", "popular")


@dataclass
class Gate:
    """Publish only when new primary metric >= (1 - tolerance) x the current model's, on the same holdout."""

    tolerance: float = 0.05

    def __post_init__(self):
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"gate tolerance must be in [0, 1), not {self.tolerance}")


@dataclass
class Tuning:
    """How `tune` validates: `folds` random splits carved from the training part (seeds after the
    holdout's), each holding out `validation_fraction` of a customer's items (None: the holdout's
    fraction). A small fraction leaves a fit part close in size to the final model's training
    part, so capacity and regularisation chosen on it carry over; more folds average out split noise."""

    folds: int = 1
    validation_fraction: float | None = None
    space: dict[str, dict[str, list]] = field(default_factory=dict)  # [tuning.space.<strategy>]: replaces its own

    def __post_init__(self):
        for strategy, params in self.space.items():
            if not isinstance(params, dict) or not all(isinstance(v, list) and v for v in params.values()):
                raise ValueError(f"tuning.space.{strategy} must map parameter names to non-empty lists of values")
        if self.folds < 1:
            raise ValueError(f"tuning.folds must be at least 1, not {self.folds}")
        if self.validation_fraction is not None and not 0 < self.validation_fraction < 1:
            raise ValueError(f"tuning.validation_fraction must be between 0 and 1, not {self.validation_fraction}")


@dataclass
class NightlyPaths:
    """What `nightly` reads and writes; relative paths are relative to the config file."""

    interactions: list[Path] | None = None  # files and glob patterns, read in order as one input
    catalog: Path | None = None
    registry: Path | None = None
    redis_url: str | None = None  # unset: no cache warm-up
    warm_top: int = 10_000  # customers whose suggestions are precomputed after publishing
    warm_workers: int = 1  # processes computing them (training/warm.py)

    @classmethod
    def from_dict(cls, raw: dict, base: Path) -> "NightlyPaths":
        def path(key: str) -> Path | None:
            return base / Path(raw[key]).expanduser() if raw.get(key) else None

        redis_url = raw.get("redis_url") or None
        problem = redis_url and redis_url_problem(str(redis_url))
        if problem:
            raise ValueError(f"nightly.redis_url {redacted_url(str(redis_url))!r} is not a Redis URL: {problem}")
        return cls(interactions=_interactions(raw.get("interactions"), base), catalog=path("catalog"),
                   registry=path("registry"),
                   redis_url=redis_url, warm_top=_positive(raw.get("warm_top", 10_000), "nightly.warm_top"),
                   warm_workers=_positive(raw.get("warm_workers", 1), "nightly.warm_workers"))


def _interactions(value, base: Path) -> list[Path] | None:
    """[nightly] interactions: a path or a list of paths, each of which may be a glob pattern."""
    if not value:
        return None
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(path, str) and path for path in paths):
        raise ValueError(f'nightly.interactions must be a path or a list of paths (each may be a glob pattern such '
                         f'as "events/*.csv"), not {value!r}')
    return [base / Path(path).expanduser() for path in paths]


@dataclass
class TrainConfig:
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    params: dict[str, dict] = field(default_factory=dict)  # per strategy name
    ingest: IngestOptions = field(default_factory=IngestOptions)
    holdout: Holdout = field(default_factory=Holdout)
    k: int = 10
    primary_metric: str = "ndcg@10"
    gate: Gate = field(default_factory=Gate)
    keep_versions: int = 10  # registry retention; CURRENT and the version before it are always kept
    nightly: NightlyPaths = field(default_factory=NightlyPaths)
    tuning: Tuning = field(default_factory=Tuning)

    @classmethod
    def from_file(cls, path: Path | None) -> "TrainConfig":
        if path is None:
            return cls()
        return cls.from_dict(_read(Path(path)), source=str(path), base=Path(path).resolve().parent)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config", base: Path = Path(".")) -> "TrainConfig":
        try:
            _known_keys(raw, SECTIONS, None)
            strategies = raw.get("strategies", {})
            evaluation = raw.get("evaluation", {})
            _known_keys(evaluation, ("holdout", "k", "primary_metric"), "[evaluation]")
            _known_keys(raw.get("data", {}), DATA_KEYS, "[data]")
            _known_keys(raw.get("retention", {}), ("keep_versions",), "[retention]")
            _known_keys(raw.get("nightly", {}), NIGHTLY_KEYS, "[nightly]")
            for table, prototype, where in ((evaluation.get("holdout", {}), Holdout, "[evaluation.holdout]"),
                                            (raw.get("gate", {}), Gate, "[gate]"),
                                            (raw.get("tuning", {}), Tuning, "[tuning]")):
                _known_keys(table, tuple(f.name for f in fields(prototype)), where)
            _check_strategy_tables(strategies)
            _check_tuning_space(raw.get("tuning", {}).get("space", {}))
            _check_types(evaluation.get("holdout", {}), Holdout(), "evaluation.holdout")
            _check_types(raw.get("gate", {}), Gate(), "gate")
            _check_types(raw.get("tuning", {}), Tuning(validation_fraction=0.1), "tuning")
            _check_types(evaluation, {"k": 10, "primary_metric": ""}, "evaluation")
            _check_types(raw.get("data", {}), {"unknown_event_weight": 1.0, "max_bad_share": 0.05,
                                               "half_life_days": 1.0, "min_items_per_customer": 1,
                                               "min_customers_per_item": 1}, "data")
            _check_types(raw.get("nightly", {}), {"warm_top": 1, "warm_workers": 1, "redis_url": ""}, "nightly")
            enabled = strategies.get("enabled", DEFAULT_STRATEGIES)
            if not isinstance(enabled, (list, tuple)) or not all(isinstance(name, str) for name in enabled):
                raise ValueError(f'strategies.enabled must be a list of strategy names such as ["als"], '
                                 f'not {enabled!r}')
            weights = raw.get("data", {}).get("event_weights", {})
            if not isinstance(weights, dict) or not all(_is_number(w) and w >= 0 for w in weights.values()):
                raise ValueError(f"data.event_weights must map event types to numbers of at least 0, not {weights!r}")
            return cls(
                strategies=list(strategies.get("enabled", DEFAULT_STRATEGIES)),
                params={name: dict(v) for name, v in strategies.items() if isinstance(v, dict)},
                ingest=_ingest_options(raw.get("data", {})),
                holdout=_holdout(evaluation.get("holdout", {})),
                k=_positive(evaluation.get("k", 10), "evaluation.k"),
                primary_metric=_primary_metric(evaluation),
                gate=Gate(**raw.get("gate", {})),
                keep_versions=_positive(raw.get("retention", {}).get("keep_versions", 10), "retention.keep_versions"),
                nightly=NightlyPaths.from_dict(raw.get("nightly", {}), base),
                tuning=Tuning(**raw.get("tuning", {})),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(f"{source}: invalid trainer configuration: {exc}") from exc


SECTIONS = ("strategies", "data", "evaluation", "gate", "retention", "nightly", "tuning")
DATA_KEYS = ("event_weights", "unknown_event_weight", "max_bad_share", "half_life_days", "min_items_per_customer",
             "min_customers_per_item")
NIGHTLY_KEYS = ("interactions", "catalog", "registry", "redis_url", "warm_top", "warm_workers")


def _known_keys(table, known: tuple[str, ...], where: str | None) -> None:
    """A misspelt section (`where` None: the file's top level) or key is an error, not a silent default."""
    if not isinstance(table, dict):
        raise ValueError(f"{where or 'the configuration'} must be a table (a JSON object), not {table!r}")
    unknown = sorted(set(table) - set(known))
    if unknown and where is None:
        raise ValueError(f"unknown section {', '.join(f'[{u}]' for u in unknown)} (sections: {', '.join(known)})")
    if unknown:
        raise ValueError(f"unknown key {', '.join(unknown)} in {where} (keys: {', '.join(known)})")


def _check_strategy_tables(strategies) -> None:
    """[strategies]: `enabled` and one table per strategy, each checked as the strategy would check it, enabled
    or not (a typo in a strategy switched on later should not wait until then)."""
    from training.strategies import STRATEGIES  # implicit loads with it: only when a config is read

    if not isinstance(strategies, dict):
        raise ValueError(f"[strategies] must be a table, not {strategies!r}")
    for name, table in strategies.items():
        if name == "enabled":
            continue
        if name not in STRATEGIES:
            raise ValueError(f"[strategies.{name}]: unknown strategy (strategies: {', '.join(sorted(STRATEGIES))}; "
                             f"`enabled` lists those to fit)")
        if not isinstance(table, dict):
            raise ValueError(f"strategies.{name} must be a table of parameters, not {table!r}")
        try:
            STRATEGIES[name](**table)
        except InvalidInput as exc:
            raise ValueError(f"[strategies.{name}]: {exc.message}") from None


def _check_tuning_space(space) -> None:
    """[tuning.space.<strategy>] names a strategy: a misspelt one would leave tune on the strategy's own space."""
    from training.strategies import STRATEGIES

    if not isinstance(space, dict):
        raise ValueError(f"[tuning.space] must be a table of strategies, not {space!r}")
    for name in space:
        if name not in STRATEGIES:
            raise ValueError(f"[tuning.space.{name}]: unknown strategy (strategies: {', '.join(sorted(STRATEGIES))})")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(table, prototype, where: str) -> None:
    """Each value of `table` of the type of the same key in `prototype` (a dataclass instance or a dict): a whole
    number where an int goes, any number where a float goes, text where text goes; keys it does not know are
    left to the section's own checks."""
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table, not {table!r}")
    defaults = prototype if isinstance(prototype, dict) else vars(prototype)
    for key, value in table.items():
        default = defaults.get(key)
        if isinstance(default, bool) or default is None or isinstance(default, (dict, list)):
            continue
        if isinstance(default, int) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{where}.{key} must be a whole number, not {value!r}")
        if isinstance(default, float) and not _is_number(value):
            raise ValueError(f"{where}.{key} must be a number, not {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{where}.{key} must be text, not {value!r}")


def _primary_metric(evaluation: dict) -> str:
    """[evaluation] primary_metric, NAME@K with K the evaluated k (default ndcg@k): the gate and the choice of
    the default strategy read it from the metrics, which exist only at k."""
    k = int(evaluation.get("k", 10))
    metric = str(evaluation.get("primary_metric", f"ndcg@{k}"))
    names = [name for name in METRICS if name != "coverage"]
    name, _, at = metric.partition("@")
    if name not in names or at != str(k):
        raise ValueError(f"evaluation.primary_metric must be one of {', '.join(f'{n}@{k}' for n in names)} "
                         f"(@{k}: evaluation.k), not {metric!r}")
    return metric


def _positive(value, name: str) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")
    return int(value)


def _holdout(raw: dict) -> Holdout:
    """The [evaluation.holdout] table. TOML has no null, so max_customers = 0 means every customer."""
    raw = dict(raw)
    if "max_customers" in raw:
        if int(raw["max_customers"]) < 0:
            raise ValueError(f"evaluation.holdout.max_customers must be 0 (every customer) or more, "
                             f"not {raw['max_customers']}")
        raw["max_customers"] = int(raw["max_customers"]) or None
    return Holdout(**raw)


def _ingest_options(data: dict) -> IngestOptions:
    """The [data] section: event weights, bad-row threshold, time decay and minimum filters."""
    defaults = IngestOptions()
    max_bad_share = float(data.get("max_bad_share", defaults.max_bad_share))
    if not 0 <= max_bad_share <= 1:
        raise ValueError(f"data.max_bad_share is a share of the rows, from 0 to 1, not {max_bad_share:g}")
    half_life = data.get("half_life_days")
    if half_life is not None and float(half_life) <= 0:
        raise ValueError(f"data.half_life_days must be positive, not {half_life}")
    return IngestOptions(
        # Event types are matched without case or spaces in the data; so are the config's names.
        event_weights={**defaults.event_weights,
                       **{str(name).strip().lower(): w for name, w in data.get("event_weights", {}).items()}},
        unknown_event_weight=float(data.get("unknown_event_weight", defaults.unknown_event_weight)),
        max_bad_share=max_bad_share,
        half_life_days=None if half_life is None else float(half_life),
        min_items_per_customer=_positive(data.get("min_items_per_customer", 1), "data.min_items_per_customer"),
        min_customers_per_item=_positive(data.get("min_customers_per_item", 1), "data.min_customers_per_item"),
    )


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError as exc:
        raise InvalidInput(f"{path}: no such configuration file") from exc
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise InvalidInput(f"{path}: cannot parse configuration: {exc}") from exc
