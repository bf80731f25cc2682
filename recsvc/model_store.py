"""The loaded model version of this process, kept in step with the registry's CURRENT pointer.

A watcher thread reads the pointer every few seconds; a new version is loaded
beside the old one and swapped in with one reference assignment, so requests
in flight finish on the version they started with. A version that fails to load,
validate or answer the check requests is refused and the old one keeps serving.
A pointer that goes missing, and files of the served version that change on disk,
are reported the same way while the loaded version keeps serving.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from recsvc import artifacts, metrics
from recsvc.artifacts import ModelBundle
from recsvc.errors import ArtifactError

log = logging.getLogger(__name__)


# A path, absolute or relative (var/registry/CURRENT, registry/CURRENT): only its last part is kept.
_PATH = re.compile(r"(?:[^/\s'\"]+)?(?:/[^/\s'\"]+)*/([^/\s'\"]+)")


def without_paths(reason: str) -> str:
    """The reason without directory names: it is shown on /readyz, which needs no key."""
    return _PATH.sub(r"\1", reason)


# gunicorn's master keeps a watcher too (from the preload) and forks a worker whenever one dies. A fork in the
# middle of a watcher's round (a version loading, a metric written) gave the child every lock the round held,
# prometheus_client's global one among them, with no thread left to release them: the worker hung at its first
# metric. So a fork waits for the rounds in progress to end, and the child starts with fresh locks.
_stores: weakref.WeakSet[ModelStore] = weakref.WeakSet()
_held: list[ModelStore] = []


def _hold_watchers() -> None:
    _held[:] = list(_stores)
    for store in _held:
        store._checking.acquire()


def _release_watchers() -> None:
    for store in _held:
        store._checking.release()
    _held.clear()


def _fresh_locks() -> None:
    for store in _held:
        store._checking, store._lock = threading.Lock(), threading.Lock()
    _held.clear()


os.register_at_fork(before=_hold_watchers, after_in_parent=_release_watchers, after_in_child=_fresh_locks)


@dataclass(frozen=True)
class LoadFailure:
    version: str | None
    reason: str
    at: float  # Unix seconds


def _files(bundle: ModelBundle) -> dict[str, tuple[int, int]]:
    """(size, mtime) of each file of the bundle's version directory, by relative path."""
    if bundle.path is None:
        return {}
    found = {}
    for path in bundle.path.rglob("*"):
        try:
            stat = path.stat()
        except OSError:
            continue  # removed meanwhile: the next comparison shows it missing
        if not path.is_dir():
            found[str(path.relative_to(bundle.path))] = (stat.st_size, stat.st_mtime_ns)
    return found


class ModelStore:
    def __init__(self, registry: Path, reload_interval: float = 5.0,
                 check: Callable[[ModelBundle], None] | None = None):
        """`check`: run on a loaded version before it is swapped in; any exception refuses the version
        (the app passes recsvc.recommend.check_serves)."""
        self.registry = Path(registry)
        self.reload_interval = reload_interval
        self.check = check
        self.bundle: ModelBundle | None = None
        self._served_files: dict[str, tuple[int, int]] = {}
        self.last_failure: LoadFailure | None = None
        self.loaded_at: float | None = None
        self._lock = threading.Lock()
        self._checking = threading.Lock()  # held by the watcher for a round of checks (see _hold_watchers)
        self._watcher_pid: int | None = None
        self._stop = threading.Event()
        self._said_empty = False  # "no model yet" is logged once per server (workers inherit it from the master)
        # Run by the watcher after each check of the registry: other files followed at the same interval
        # (the experiment definitions, recsvc/experiments.py), without a thread of their own.
        self.also_check: list[Callable[[], object]] = []
        _stores.add(self)

    def current(self) -> ModelBundle | None:
        """The bundle to serve with (None until one loads). Starts the watcher in this process on first use,
        which also covers gunicorn workers forked after the app was preloaded."""
        if self._watcher_pid != os.getpid():
            self._start_watcher()
        return self.bundle

    def refresh(self, *, retry_refused: bool = False) -> bool:
        """Load the version CURRENT names if it is not the one loaded; True when a new one was swapped in.

        A version refused once is not tried again until the pointer moves, unless `retry_refused`
        (the admin reload endpoint) asks for it."""
        with self._lock:
            try:
                version = artifacts.current_version(self.registry)
            except ArtifactError as exc:
                self._refuse(None, str(exc))
                return False
            if version is None:
                if self.bundle is not None:  # an empty registry before the first model is no failure
                    self._refuse(None, "the registry's current pointer (CURRENT) is missing")
                elif not self._said_empty:  # but say where the server looks: a wrong RECSVC_REGISTRY shows here
                    self._said_empty = True
                    log.warning("no model version to serve yet: %s has no CURRENT pointer; /readyz and the "
                                "recommendations answer 503 until `recsvc-train fit --registry %s` publishes one",
                                self.registry.absolute(), self.registry)
                return False
            if self.last_failure is not None and self.last_failure.version is None:
                self.last_failure = None  # the pointer reads again: its failure is over
            if self.bundle is not None and self.bundle.version == version:
                self._check_served_files()
                return False
            if not retry_refused and self.last_failure is not None and self.last_failure.version == version:
                return False  # already refused; wait for the pointer to move on
            try:
                bundle = self._load(version)
            except Exception as exc:  # noqa: BLE001 (whatever the version throws, the old one keeps serving)
                self._refuse(version, exc.message if isinstance(exc, ArtifactError)
                             else f"it cannot serve: {type(exc).__name__}: {exc}")
                return False
            previous = self.bundle.version if self.bundle else None
            self.bundle, self.loaded_at, self.last_failure = bundle, time.time(), None
            self._served_files = _files(bundle)
            metrics.model_swapped(previous, version, self.created_at)
            log.info("model version %s loaded (was %s)", version, previous,
                     extra={"model_version": version, "previous_version": previous})
            return True

    def _load(self, version: str) -> ModelBundle:
        bundle = artifacts.load_version(self.registry, version)
        if self.check is not None:
            self.check(bundle)
        return bundle

    def _check_served_files(self) -> None:
        """CURRENT names the served version: its failure, if any, is over (a rollback to it), unless its files
        changed on disk. They are memory-mapped: one cut short makes the processes reading it die of SIGBUS,
        so say so loudly, once, and keep it on /readyz."""
        now = _files(self.bundle)
        changed = sorted(name for name in self._served_files.keys() | now.keys()
                         if self._served_files.get(name) != now.get(name))
        if changed:
            self._refuse(self.bundle.version, f"files of the served version changed on disk "
                         f"({', '.join(changed[:5])}); versions are immutable: publish a new one instead", served=True)
        else:
            self.last_failure = None

    @property
    def created_at(self) -> float | None:
        """When the served version was trained (Unix seconds), from its manifest; None when unknown."""
        bundle = self.bundle
        try:
            return dt.datetime.fromisoformat(bundle.manifest["created_at"]).timestamp() if bundle else None
        except (KeyError, TypeError, ValueError):
            return None

    def _refuse(self, version: str | None, reason: str, *, served: bool = False) -> None:
        """Show the failure on /readyz, count and log it, once while it stays the same. `served`: it is about
        the served version itself (nothing was refused)."""
        shown = without_paths(reason)  # the log keeps the paths: only /readyz is public
        failure = self.last_failure
        if failure is not None and (failure.version, failure.reason) == (version, shown):
            return  # the same failure as at the last check (an unreadable pointer): counted and logged once
        self.last_failure = LoadFailure(version, shown, time.time())
        metrics.model_refused()
        serving = self.bundle.version if self.bundle else None
        if served:
            log.error("model version %s is served, but %s", version, reason, extra={"model_version": version})
        elif version is None:  # the pointer, not a version, failed
            log.error("%s; %s", reason, f"keeping model version {serving}" if serving else "no model version is served",
                      extra={"refused_version": None})
        else:
            log.error("model version %s refused, keeping %s: %s", version, serving or "none", reason,
                      extra={"refused_version": version})

    def start_watching(self) -> None:
        """In a process forked after the app was loaded (a gunicorn worker): watch the registry from now on,
        and publish the served version in this process's metrics (a fork starts them from zero)."""
        if self.bundle is not None:
            metrics.model_serving(self.bundle.version, self.created_at)
        self.current()

    def _start_watcher(self) -> None:
        with self._lock:
            if self._watcher_pid == os.getpid():
                return
            self._watcher_pid = os.getpid()
            self._stop = threading.Event()
        threading.Thread(target=self._watch, name="recsvc-model-watcher", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self.reload_interval):
            with self._checking:
                self._check_once()

    def _check_once(self) -> None:
        try:
            self.refresh()
            metrics.model_tick(self.created_at)
        except Exception:  # the watcher must survive anything a broken registry throws at it
            log.exception("model refresh failed")
        for check in self.also_check:
            try:
                check()
            except Exception:  # nor may another file's check stop it
                log.exception("check of %s failed", getattr(check, "__qualname__", check))

    def stop(self) -> None:
        self._stop.set()
