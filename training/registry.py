"""Registry operations for ML engineers: list and show versions, roll back, and retention of old versions."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from recsvc import artifacts
from recsvc.errors import ArtifactError, InvalidInput


@dataclass
class VersionSummary:
    version: str
    created_at: str
    current: bool
    default_strategy: str
    primary_metric: str
    primary_value: float | None
    rows: int | None
    customers: int | None
    items: int | None

    @classmethod
    def of(cls, version: str, manifest: dict, current: bool) -> "VersionSummary":
        evaluation = manifest.get("evaluation", {})
        metric = evaluation.get("primary_metric", "ndcg@10")
        default = manifest.get("default_strategy", "")
        value = manifest.get("strategies", {}).get(default, {}).get("metrics", {}).get(metric)
        data = manifest.get("data", {})
        return cls(version, manifest.get("created_at", ""), current, default, metric, value,
                   data.get("rows"), data.get("customers"), data.get("items"))


def _require_registry(registry: Path) -> None:
    if not artifacts.versions_root(registry).is_dir():
        raise InvalidInput(f"{registry}: not a model registry (no {artifacts.VERSIONS_DIR}/ directory)")


def list_summaries(registry: Path) -> list[VersionSummary]:
    """Every complete version, oldest first; unreadable manifests are listed with empty fields."""
    _require_registry(registry)
    current = artifacts.current_version(registry)
    summaries = []
    for version in artifacts.list_versions(registry):
        try:
            manifest = artifacts.read_manifest(artifacts.versions_root(registry) / version)
        except ArtifactError:
            manifest = {}
        summaries.append(VersionSummary.of(version, manifest, version == current))
    return summaries


def show(registry: Path, version: str | None = None) -> dict:
    """The manifest of `version` (default: the current one)."""
    _require_registry(registry)
    version = version or artifacts.current_version(registry)
    if version is None:
        raise InvalidInput(f"{registry}: no current version; name one (see `recsvc-train registry list`)")
    if version not in artifacts.list_versions(registry):
        raise InvalidInput(f"{registry}: no version {version}")
    return artifacts.read_manifest(artifacts.versions_root(registry) / version)


def previous_version(registry: Path, version: str | None) -> str | None:
    """The newest version older than `version` (ids sort by creation time), or None."""
    older = [v for v in artifacts.list_versions(registry) if version is None or v < version]
    return older[-1] if older else None


def rollback(registry: Path, version: str | None = None) -> tuple[str | None, str]:
    """Point CURRENT at `version` (default: the one before the current) after checking that it loads:
    (old current, new current)."""
    _require_registry(registry)
    try:
        current = artifacts.current_version(registry)
    except ArtifactError:
        if version is None:
            raise
        current = None  # a damaged pointer: rolling back to a named version is how it is repaired
    target = version or previous_version(registry, current)
    if target is None:
        raise InvalidInput(f"{registry}: no version before {current} to roll back to")
    if target not in artifacts.list_versions(registry):
        raise InvalidInput(f"{registry}: no version {target}")
    try:
        artifacts.load_version(registry, target)  # a damaged version must not become current
    except ArtifactError as exc:
        raise InvalidInput(f"{registry}: version {target} cannot serve: {exc.message}") from exc
    artifacts.set_current(registry, target)
    return current, target


def protected_versions(registry: Path, keep: int) -> set[str]:
    """The newest `keep` versions, CURRENT and the version before CURRENT."""
    versions = artifacts.list_versions(registry)
    current = artifacts.current_version(registry)
    protected = set(versions[-keep:]) if keep > 0 else set()
    protected.update(v for v in (current, previous_version(registry, current)) if v)
    return protected


def apply_retention(registry: Path, keep: int) -> list[str]:
    """Delete versions outside protected_versions(); returns the removed ids, oldest first.

    A version is first renamed to a hidden name (list_versions skips those), so no reader sees a
    half-deleted version; servers that still map its files keep them until they unmap (POSIX).
    """
    protected = protected_versions(registry, keep)
    removed = []
    for version in artifacts.list_versions(registry):
        if version in protected:
            continue
        remove_version(registry, version)
        removed.append(version)
    return removed


def remove_version(registry: Path, version: str) -> None:
    """Rename the version to a hidden name (list_versions skips those), then delete it."""
    root = artifacts.versions_root(registry)
    doomed = root / f".deleting.{version}.{os.getpid()}"
    os.rename(root / version, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
