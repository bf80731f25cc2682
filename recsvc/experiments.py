"""A/B experiment definitions from RECSVC_EXPERIMENTS and sticky, stateless assignment of customers to variants."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

import marshmallow as ma
from marshmallow import validate

from recsvc import metrics
from recsvc.cache import experiments_key
from recsvc.errors import ConfigError, RecsvcError

log = logging.getLogger(__name__)

BUCKETS = 10_000
RUNNING, STOPPED = "running", "stopped"
REMOVED = "removed"  # published to Redis only: a definition the servers' file no longer holds (publication())


def bucket(salt: str, customer_id: str) -> int:
    """The customer's bucket in [0, BUCKETS): sha256 of salt and id, the same in every process and release
    (Python's hash() is randomised per process, so it must never be used here)."""
    digest = hashlib.sha256(f"{salt}\x00{customer_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Variant:
    name: str
    strategy: str
    weight: int


@dataclass(frozen=True)
class Assignment:
    """The variant a customer sees in one experiment."""

    experiment: str
    variant: str
    strategy: str

    def ref(self) -> dict:
        return {"name": self.experiment, "variant": self.variant}


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    status: str
    control: str
    variants: tuple[Variant, ...]
    start: dt.datetime | None = None
    end: dt.datetime | None = None

    def weights(self) -> dict[str, int]:
        return {v.name: v.weight for v in self.variants}

    def boundaries(self) -> list[int]:
        """Exclusive upper bucket of each variant: bucket shares are proportional to the weights."""
        total = sum(v.weight for v in self.variants)
        running, bounds = 0, []
        for variant in self.variants:
            running += variant.weight
            bounds.append(round(running * BUCKETS / total))
        return bounds

    def variant_of(self, customer_id: str) -> Variant:
        """The customer's variant: a pure function of (salt, customer_id)."""
        position = bucket(self.salt, customer_id)
        for variant, bound in zip(self.variants, self.boundaries()):
            if position < bound:
                return variant
        return self.variants[-1]  # unreachable: the last bound is BUCKETS

    def is_running(self, now: dt.datetime) -> bool:
        """Running and inside its optional [start, end) window."""
        return (self.status == RUNNING and (self.start is None or self.start <= now)
                and (self.end is None or now < self.end))

    def assign(self, customer_id: str) -> Assignment:
        variant = self.variant_of(customer_id)
        return Assignment(self.name, variant.name, variant.strategy)


class _Strict(ma.Schema):
    class Meta:
        unknown = ma.RAISE


class VariantSchema(_Strict):
    name = ma.fields.String(required=True, validate=validate.Length(min=1, max=64))
    strategy = ma.fields.String(required=True, validate=validate.Length(min=1, max=64))
    weight = ma.fields.Integer(required=True, strict=True, validate=validate.Range(min=0, max=BUCKETS))

    @ma.post_load
    def make(self, data: dict, **_kw) -> Variant:
        return Variant(**data)


EXPERIMENT_NAME = r"[A-Za-z0-9._-]{1,64}"  # the whole name; the OpenAPI document has it too (recsvc/api/experiments.py)


class ExperimentSchema(_Strict):
    name = ma.fields.String(required=True, validate=validate.Regexp(EXPERIMENT_NAME + r"\Z",
                                                                     error="use 1-64 letters, digits, '.', '_' or '-'"))
    salt = ma.fields.String(required=True, validate=validate.Length(min=1, max=128))
    status = ma.fields.String(required=True, validate=validate.OneOf([RUNNING, STOPPED]))
    control = ma.fields.String(required=True)
    variants = ma.fields.List(ma.fields.Nested(VariantSchema), required=True, validate=validate.Length(min=2, max=20))
    start = ma.fields.AwareDateTime(load_default=None, default_timezone=dt.timezone.utc)
    end = ma.fields.AwareDateTime(load_default=None, default_timezone=dt.timezone.utc)

    @ma.pre_load
    def toml_dates(self, data, **_kw):
        """TOML writes a day as a date (`start = 2026-12-01`): midnight UTC, as the same day written as text."""
        if not isinstance(data, dict):
            return data
        return {key: value.isoformat() if key in ("start", "end") and type(value) is dt.date else value
                for key, value in data.items()}

    @ma.validates_schema
    def check(self, data: dict, **_kw) -> None:
        names = [v.name for v in data.get("variants", [])]
        if len(set(names)) != len(names):
            raise ma.ValidationError("variant names must be unique", "variants")
        if names and data.get("control") not in names:
            raise ma.ValidationError(f"control must name one of the variants {names}", "control")
        if names and sum(v.weight for v in data["variants"]) <= 0:
            raise ma.ValidationError("at least one variant needs a positive weight", "variants")
        if data.get("start") and data.get("end") and data["end"] <= data["start"]:
            raise ma.ValidationError("end must be after start", "end")

    @ma.post_load
    def make(self, data: dict, **_kw) -> Experiment:
        return Experiment(**{**data, "variants": tuple(data["variants"])})


class ExperimentsFileSchema(_Strict):
    experiments = ma.fields.List(ma.fields.Nested(ExperimentSchema), required=True)

    @ma.validates_schema
    def unique(self, data: dict, **_kw) -> None:
        names = [e.name for e in data.get("experiments", [])]
        if len(set(names)) != len(names):
            raise ma.ValidationError("experiment names must be unique", "experiments")


class PublishedExperimentSchema(ExperimentSchema):
    """A definition as the servers publish it to Redis (publication()): also a removed one, and when the file
    that said so was read."""

    status = ma.fields.String(required=True, validate=validate.OneOf([RUNNING, STOPPED, REMOVED]))
    read_at = ma.fields.Float(load_default=None)  # Unix seconds
    removed_at = ma.fields.String(load_default=None)

    @ma.post_load
    def make(self, data: dict, **_kw) -> Experiment:
        return super().make({key: value for key, value in data.items() if key not in ("read_at", "removed_at")})


class ExperimentSet:
    """The experiments of this server, in file order. At most one applies to a request: the first running one,
    so a customer never gets two strategies at once."""

    def __init__(self, experiments: tuple[Experiment, ...] = ()):
        self.experiments = experiments
        self.by_name = {e.name: e for e in experiments}

    def get(self, name: str) -> Experiment | None:
        return self.by_name.get(name)

    def active(self, now: dt.datetime | None = None) -> Experiment | None:
        now = now or dt.datetime.now(dt.timezone.utc)
        return next((e for e in self.experiments if e.is_running(now)), None)

    def assign(self, customer_id: str, now: dt.datetime | None = None) -> Assignment | None:
        experiment = self.active(now)
        return experiment.assign(customer_id) if experiment else None


def parse_experiments(raw: object, source: str = "experiments") -> ExperimentSet:
    """Validate a decoded definitions document; ConfigError lists every problem by field."""
    try:
        loaded = ExperimentsFileSchema().load(raw)
    except ma.ValidationError as exc:
        raise ConfigError(f"{source}: invalid experiment definitions: {json.dumps(exc.messages, sort_keys=True)}",
                          details={"fields": exc.messages}) from None
    return ExperimentSet(tuple(loaded["experiments"]))


def parse_published(published: dict) -> ExperimentSet:
    """The definitions the servers published to Redis (the hash at experiments_key(), as HGETALL returns it),
    removed ones included with status REMOVED; ConfigError naming redis for an entry that is not one."""
    try:
        loaded = PublishedExperimentSchema(many=True).load([json.loads(value) for value in published.values()])
    except ValueError as exc:
        raise ConfigError(f"redis: cannot parse the published experiment definitions: {exc}") from None
    except ma.ValidationError as exc:
        raise ConfigError(f"redis: invalid experiment definitions: {json.dumps(exc.messages, sort_keys=True)}",
                          details={"fields": exc.messages}) from None
    return ExperimentSet(tuple(sorted(loaded, key=lambda experiment: experiment.name)))


def publication(defined: Collection[Experiment], published: dict[str, dict], read_at: float,
                complete: bool) -> dict[str, str]:
    """The entries of the published hash (experiments_key()) to write for the definitions a server read from its
    file at `read_at` (Unix seconds), given the entries `published` now (decoded): name -> JSON.

    Each entry carries the `read_at` of the file read it comes from, and an entry is replaced only from a file read
    at that time or later: several workers and replicas publish in any order, on start-up, after each change of
    their file and whenever Redis returns, so the latest file read wins, not the latest write. With `complete`
    (the server has a definitions file), a published experiment its file no longer defines becomes REMOVED (its
    definition kept for the report, with `removed_at`), which `events trim` does not protect. A replica still on
    the old file cannot undo that by publishing again what it read earlier; one that reads its old file again
    (restarted, or another change) serves the experiment, and publishes it as such until it reads the new file."""
    entries = {}
    for experiment in defined:
        if _read_at(published.get(experiment.name)) <= read_at:
            entries[experiment.name] = json.dumps({**describe(experiment), "read_at": read_at})
    names = {experiment.name for experiment in defined}
    for name, entry in published.items() if complete else ():
        if entry and name not in names and entry.get("status") != REMOVED and _read_at(entry) <= read_at:
            entries[name] = json.dumps({**entry, "status": REMOVED, "removed_at": _iso(read_at), "read_at": read_at})
    return entries


def _read_at(entry: dict | None) -> float:
    """When the file behind a published entry was read; 0 for none, and for one published before entries said."""
    value = (entry or {}).get("read_at")
    return value if isinstance(value, (int, float)) else 0.0


def _decoded(entry: bytes) -> dict:
    """A published entry; an unreadable one as empty: overwritten when defined again, never marked removed."""
    try:
        value = json.loads(entry)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def load_experiments(path: Path | None, label: str | None = None) -> ExperimentSet:
    """Definitions from a JSON or TOML file (by suffix; anything but .toml is read as JSON); none without a path.
    Errors name the file as `label` (default: RECSVC_EXPERIMENTS=path, as the server reads it)."""
    if path is None:
        return ExperimentSet()
    return read_definitions(Path(path), label or f"RECSVC_EXPERIMENTS={path}")[0]


def read_definitions(path: Path, label: str) -> tuple[ExperimentSet, str]:
    """(definitions, digest of the file's bytes: 12 hex digits of sha256); ConfigError naming `label`."""
    if path.is_dir():
        raise ConfigError(f"{label}: is a directory, not a file")
    if path.exists() and not path.is_file():  # a FIFO or a device would block start-up or never end
        raise ConfigError(f"{label}: not a regular file")
    try:
        content = path.read_bytes()
        text = content.decode("utf-8")
        raw = (tomllib.loads(text) if path.suffix.lower() == ".toml"
               else json.loads(text, object_pairs_hook=_once_each))
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError, JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"{label}: cannot parse: {exc}") from None
    except RecursionError:  # json nests by recursion: thousands of opening brackets
        raise ConfigError(f"{label}: cannot parse: nested too deeply") from None
    return parse_experiments(raw, label), hashlib.sha256(content).hexdigest()[:12]


def _once_each(pairs: list) -> dict:
    """A JSON object whose keys are all different. {"status": "running", ..., "status": "stopped"} is refused, as
    TOML refuses it and the API refuses a repeated key in a body: taking the last would be a guess."""
    seen = set()
    for key, _value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} is given more than once in one object")
        seen.add(key)
    return dict(pairs)


def check_strategies(experiments: ExperimentSet, served: Collection[str] | None, label: str) -> None:
    """ConfigError when an experiment running now has a variant whose strategy the served model lacks (none
    loaded: no check). Applied to a changed file only: there it is most likely a typo, and the definitions in use
    keep serving; at start-up such a variant serves the default strategy, uncounted (ExperimentRouter.assign)."""
    if served is None:
        return
    now = dt.datetime.now(dt.timezone.utc)
    missing = [f"experiment {e.name}, variant {v.name}: strategy {v.strategy!r}" for e in experiments.experiments
               if e.is_running(now) for v in e.variants if v.strategy not in served]
    if missing:
        raise ConfigError(f"{label}: {'; '.join(missing)} not in the served model (which has "
                          f"{', '.join(sorted(served))})", details={"missing_strategies": missing})


def file_state(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, modification time in ns) of the file a path names now, following symlinks (a
    Kubernetes ConfigMap swaps one); None when it cannot be read (missing)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class DefinitionsFailure:
    reason: str  # as ConfigError words it, naming the file
    at: float  # Unix seconds


class DefinitionsFile:
    """The RECSVC_EXPERIMENTS file as this process last read it: the file's state then, and what it held."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.label = f"RECSVC_EXPERIMENTS={path}"
        self.state: tuple[int, int, int, int] | None = None  # file_state() when last read
        self.digest: str | None = None  # of the definitions in use
        self.loaded_at: float | None = None  # when they were read (Unix seconds)
        self.last_failure: DefinitionsFailure | None = None  # while the file on disk is refused

    def load(self) -> ExperimentSet:
        """The definitions in the file at start-up (state, digest and time recorded); ConfigError when wrong."""
        self.state = file_state(self.path)  # before the read: a write after it shows as a change next time
        experiments, self.digest = read_definitions(self.path, self.label)
        self.loaded_at = time.time()
        return experiments


def describe(experiment: Experiment) -> dict:
    """The JSON form of a definition, as GET /v1/experiments shows it."""
    return {
        "name": experiment.name, "salt": experiment.salt, "status": experiment.status,
        "control": experiment.control,
        "variants": [{"name": v.name, "strategy": v.strategy, "weight": v.weight} for v in experiment.variants],
        "start": experiment.start.isoformat() if experiment.start else None,
        "end": experiment.end.isoformat() if experiment.end else None,
    }


class ExperimentRouter:
    """Puts a request without an explicit strategy into the running experiment and records its exposure."""

    def __init__(self, experiments: ExperimentSet, event_log, source: DefinitionsFile | None = None,
                 served_strategies: Callable[[], Collection[str] | None] = lambda: None):
        """`source`: the file the definitions came from, re-read by refresh() when it changes.
        `served_strategies`: the strategies of the served model version (None before one loads)."""
        self.experiments = experiments  # replaced whole by refresh(): a request reads it once
        self.event_log = event_log  # a recsvc.event_log.EventLog
        self.source = source
        self.served_strategies = served_strategies
        self._missing_warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # one refresh at a time: the watcher's and an admin's reload

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the definitions file when its inode, size or modification time changed since the last
        read (always with `force`), and swap the new definitions in; True when they differ from those in use.

        The new definitions apply from the next request on and are published to Redis. A file that cannot be
        read or is invalid (missing, bad TOML or JSON, a failed check) is refused: the definitions in use stay,
        and the failure is logged, counted and kept in `source.last_failure` until the file loads again."""
        source = self.source
        if source is None:
            return False
        with self._lock:
            state = file_state(source.path)
            if state == source.state and not force:
                return False
            try:
                experiments, digest = read_definitions(source.path, source.label)
                check_strategies(experiments, self.served_strategies(), source.label)
            except ConfigError as exc:
                experiments, digest, problem = None, None, exc.message
            if file_state(source.path) != state:  # written while read, maybe cut short: read again next time
                return False
            source.state = state
            if experiments is None:
                self._refuse(problem)
                return False
            source.last_failure = None
            previous = source.digest
            if digest == previous:  # touched, or rewritten with the same bytes
                metrics.experiments_serving(digest, refused=False)
                return False
            self.experiments, source.digest, source.loaded_at = experiments, digest, time.time()
        metrics.experiments_loaded(previous, source.digest)
        log.info("experiment definitions reloaded from %s: %s", source.label, summary(experiments),
                 extra={"experiments_digest": source.digest, "previous_digest": previous})
        if self.event_log.reader is not None:
            self.publish_quietly(self.event_log.reader.client)
        return True

    def _refuse(self, reason: str) -> None:
        """Keep the definitions in use; log and count the failure once while it stays the same."""
        failure = self.source.last_failure
        if failure is not None and failure.reason == reason:
            return
        self.source.last_failure = DefinitionsFailure(reason, time.time())
        metrics.experiments_refused()
        log.error("%s; keeping the experiment definitions in use (digest %s, loaded %s)", reason,
                  self.source.digest, _iso(self.source.loaded_at), extra={"experiments_digest": self.source.digest})

    def start_watching(self) -> None:
        """In a process forked after the app was loaded (a gunicorn worker): this process's metrics, and a check
        of the file now, so a worker started after a change never serves older definitions. (The master refreshes
        only in its model watcher's rounds, which a fork waits for: recsvc.model_store._hold_watchers.)"""
        if self.source is not None:
            metrics.experiments_serving(self.source.digest, refused=self.source.last_failure is not None)
            self.refresh()

    def assign(self, customer_id: str, strategy: str | None, available) -> Assignment | None:
        """The customer's assignment, or None: a request naming a strategy bypasses experiments and is not
        counted; a variant whose strategy the current model lacks serves the default, uncounted (the
        report's sample-ratio check then shows the gap)."""
        if strategy is not None:
            return None
        assignment = self.experiments.assign(customer_id)
        if assignment is None or assignment.strategy in available:
            return assignment
        if (assignment.experiment, assignment.strategy) not in self._missing_warned:
            self._missing_warned.add((assignment.experiment, assignment.strategy))
            log.error("experiment %s: variant %s needs strategy %r, which the current model lacks; its customers "
                      "get the default strategy and are not counted", assignment.experiment, assignment.variant,
                      assignment.strategy)
        return None

    def expose(self, assignment: Assignment, customer_id: str, request_id: str) -> None:
        """Record that the customer was served in the experiment; never fails the recommendation."""
        record = {"kind": "exposure", "request_id": request_id, "customer_id": customer_id,
                  "experiment": assignment.experiment, "variant": assignment.variant,
                  "strategy": assignment.strategy, "time": round(time.time(), 3)}
        try:
            self.event_log.append(record, durable=False)  # an fsync per request would slow every answer
        except RecsvcError as exc:
            log.error("exposure of %s in %s not recorded: %s", customer_id, assignment.experiment, exc.message)

    def publish(self, client) -> None:
        """Write the definitions to Redis (a redis.Redis), so `recsvc-train experiments report` finds weights and
        control without the file, and mark those published before that the file no longer defines as removed;
        see publication() for the rule between several servers. Without a file (no RECSVC_EXPERIMENTS), this
        server marks nothing removed: it has no say."""
        source = self.source
        read_at = source.loaded_at if source is not None and source.loaded_at is not None else time.time()
        defined = self.experiments.experiments
        if not defined and source is None:
            return
        key = experiments_key()

        def write(pipe) -> None:  # under WATCH: redone when another server wrote meanwhile
            published = {name.decode(): _decoded(entry) for name, entry in pipe.hgetall(key).items()}
            entries = publication(defined, published, read_at, complete=source is not None)
            pipe.multi()
            if entries:
                pipe.hset(key, mapping=entries)

        client.transaction(write, key)

    def publish_quietly(self, client) -> None:
        try:
            self.publish(client)
        except Exception as exc:  # redis.RedisError; best effort, repeated whenever the event log reconnects
            log.warning("experiment definitions not published to redis: %s", exc.__class__.__name__)
            self.event_log.reconnect_owed = True  # also when Redis returns before any record was spooled


def summary(experiments: ExperimentSet) -> str:
    """'name (status), ...' for a log line."""
    return ", ".join(f"{e.name} ({e.status})" for e in experiments.experiments) or "no experiments"


def _iso(seconds: float | None) -> str | None:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="seconds") if seconds else None


def from_settings(settings, event_log, served_strategies: Callable[[], Collection[str] | None] = lambda: None
                  ) -> ExperimentRouter:
    """The router for settings.experiments_path; ConfigError at start-up for a bad file."""
    if settings.experiments_path is None:
        router = ExperimentRouter(ExperimentSet(), event_log)
    else:
        source = DefinitionsFile(settings.experiments_path)
        router = ExperimentRouter(source.load(), event_log, source, served_strategies)
        metrics.experiments_loaded(None, source.digest)
    if event_log.reader is not None:
        event_log.on_reconnect.append(router.publish_quietly)
        router.publish_quietly(event_log.reader.client)
    return router
