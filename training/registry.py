"""Registry operations for ML engineers: list and show versions, roll back, retention of old versions, the
history of CURRENT, the lock between runs and the sweep of what killed runs left behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from recsvc import artifacts
from recsvc.errors import ArtifactError, InvalidInput, RecsvcError
from recsvc.files import shared_file_mode, write_atomically

LOCK_FILE = ".nightly.lock"  # in the registry directory: runs that share a registry exclude each other
HISTORY_FILE = "HISTORY"  # the versions that were current, oldest first; only the trainer reads it
HISTORY_LENGTH = 100
DELETING_PREFIX = ".deleting."
LEFTOVER_AGE = 3600.0  # seconds: a hidden entry this old belongs to no live run (a publication takes seconds)


class NightlyBusy(RecsvcError):
    """Another run holds the registry's lock."""

    code = "busy"


@contextmanager
def nightly_lock(registry: Path) -> Iterator[Path]:
    """Hold an exclusive flock on REGISTRY/.nightly.lock, or raise NightlyBusy at once (fit, nightly and
    rollback take it, so that no run lands in the middle of another's publication).

    The kernel releases a flock when its process ends, so a crashed run never leaves a stale lock.
    """
    registry.mkdir(parents=True, exist_ok=True)
    path = registry / LOCK_FILE
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise NightlyBusy(f"another run (fit, nightly or rollback) is in progress on {registry} (lock {path}, "
                              f"pid {holder}); this run did nothing") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def history(registry: Path) -> list[str]:
    """The versions that were current, oldest first, ending with CURRENT ([] without one).

    Read from HISTORY. A registry from before HISTORY is taken to have gone through its versions in id
    order up to CURRENT, as rollbacks assumed before; a CURRENT switched without HISTORY (by an older
    trainer, by hand) counts as the newest switch.
    """
    current = artifacts.current_version(registry)
    if current is None:
        return []
    try:
        chain = (Path(registry) / HISTORY_FILE).read_text(encoding="utf-8").split()
    except FileNotFoundError:
        chain = []
    if not chain:
        chain = [v for v in artifacts.list_versions(registry) if v < current]
    return _made_current(chain, current)


def _made_current(chain: list[str], version: str) -> list[str]:
    """The history after `version` becomes current: a version already in it cuts it back there (a rollback
    undoes what came after, so rolling back twice goes two steps back), any other is appended."""
    if version in chain:
        return chain[: len(chain) - chain[::-1].index(version)]
    return [*chain, version]


def make_current(registry: Path, version: str) -> None:
    """Point CURRENT at `version` and record it in HISTORY (written first: a crash in between leaves a
    HISTORY that history() reconciles with CURRENT)."""
    if not (artifacts.versions_root(registry) / version / artifacts.MANIFEST).is_file():
        raise ArtifactError(f"version {version} does not exist in {registry}")
    try:
        past = history(registry)
    except ArtifactError:  # a damaged pointer being repaired: the history starts again here
        past = []
    chain = _made_current(past, version)[-HISTORY_LENGTH:]
    # The umask's mode like CURRENT's, not the existing file's: a cron user's new umask applies to both.
    write_atomically(Path(registry) / HISTORY_FILE, "".join(f"{v}\n" for v in chain), mode=shared_file_mode())
    artifacts.set_current(registry, version)


def previous_version(registry: Path) -> str | None:
    """The version that was current before CURRENT and still exists, or None."""
    existing = set(artifacts.list_versions(registry))
    return next((v for v in reversed(history(registry)[:-1]) if v in existing), None)


def rollback(registry: Path, version: str | None = None) -> tuple[str | None, str]:
    """Point CURRENT at `version` (default: the version current before it) after checking that it loads:
    (old current, new current). Holds the nightly lock, so it never interleaves with a publication."""
    _require_registry(registry)
    from recsvc.recommend import check_serves  # the servers' own check before a swap

    with nightly_lock(registry):
        try:
            current = artifacts.current_version(registry)
        except ArtifactError:
            if version is None:
                raise
            current = None  # a damaged pointer: rolling back to a named version is how it is repaired
        if version is None and current is None:
            raise InvalidInput(f"{registry}: the registry has no current version to roll back from; name the "
                               "version to make current (see `recsvc-train registry list`)")
        target = version or previous_version(registry)
        if target is None:
            raise InvalidInput(f"{registry}: no version before {current} to roll back to")
        if target not in artifacts.list_versions(registry):
            raise InvalidInput(f"{registry}: no version {target}")
        try:
            check_serves(artifacts.load_version(registry, target))  # a damaged version must not become current
        except Exception as exc:  # noqa: BLE001 — whatever the servers would refuse it for
            raise InvalidInput(f"{registry}: version {target} cannot serve: "
                               f"{getattr(exc, 'message', None) or exc}") from exc
        make_current(registry, target)
    return current, target


def protected_versions(registry: Path, keep: int) -> set[str]:
    """The newest `keep` versions, CURRENT and the version current before it (what a rollback goes to)."""
    versions = artifacts.list_versions(registry)
    protected = set(versions[-keep:]) if keep > 0 else set()
    protected.update(v for v in (artifacts.current_version(registry), previous_version(registry)) if v)
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
    doomed = root / f"{DELETING_PREFIX}{version}.{os.getpid()}"
    os.rename(root / version, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_leftovers(registry: Path, older_than: float = LEFTOVER_AGE) -> list[str]:
    """Delete what killed runs left behind (SIGKILL, power loss: no cleanup ran), returning the names:
    versions half-deleted by retention (already renamed away, so safe at any age), and versions half-written
    (hidden staging directories) or temporary CURRENT/HISTORY files older than `older_than` seconds, so that
    a `fit` publishing right now beside us keeps its own."""
    root = artifacts.versions_root(registry)
    candidates = [*(root.iterdir() if root.is_dir() else ()),
                  *(p for p in Path(registry).glob(".*") if p.name.startswith((f".{artifacts.CURRENT_POINTER}.",
                                                                               f".{HISTORY_FILE}.")))]
    cutoff = time.time() - older_than
    swept = []
    for path in candidates:
        if not (path.name.startswith(DELETING_PREFIX) or (path.name.startswith(".") and _mtime(path) < cutoff)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        swept.append(path.name)
    return sorted(swept)


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:  # removed meanwhile by its owner
        return float("inf")
