"""Trainer configuration: one TOML or JSON file shared by fit, tune and nightly; defaults when absent."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from recsvc.errors import InvalidInput
from training.evaluate import Holdout
from training.ingest import IngestOptions

DEFAULT_STRATEGIES = ("als", "popular")


@dataclass
class TrainConfig:
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    params: dict[str, dict] = field(default_factory=dict)  # per strategy name
    ingest: IngestOptions = field(default_factory=IngestOptions)
    holdout: Holdout = field(default_factory=Holdout)
    k: int = 10
    primary_metric: str = "ndcg@10"

    @classmethod
    def from_file(cls, path: Path | None) -> "TrainConfig":
        if path is None:
            return cls()
        return cls.from_dict(_read(Path(path)), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "TrainConfig":
        try:
            strategies = raw.get("strategies", {})
            evaluation = raw.get("evaluation", {})
            data = raw.get("data", {})
            defaults = IngestOptions()
            return cls(
                strategies=list(strategies.get("enabled", DEFAULT_STRATEGIES)),
                params={name: dict(v) for name, v in strategies.items() if isinstance(v, dict)},
                ingest=IngestOptions(
                    event_weights={**defaults.event_weights, **data.get("event_weights", {})},
                    unknown_event_weight=float(data.get("unknown_event_weight", defaults.unknown_event_weight)),
                    max_bad_share=float(data.get("max_bad_share", defaults.max_bad_share)),
                ),
                holdout=Holdout(**evaluation.get("holdout", {})),
                k=int(evaluation.get("k", 10)),
                primary_metric=str(evaluation.get("primary_metric", "ndcg@10")),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(f"{source}: invalid trainer configuration: {exc}") from exc


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError as exc:
        raise InvalidInput(f"{path}: no such configuration file") from exc
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise InvalidInput(f"{path}: cannot parse configuration: {exc}") from exc
