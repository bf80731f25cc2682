"""Trimming the event log's Redis streams: what the log took before a time goes, never a report's data by accident."""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass

from recsvc.cache import event_stream_key, experiments_key
from recsvc.errors import InvalidInput
from recsvc.event_log import EXPOSURE, FEEDBACK, RedisStreams
from recsvc.experiments import REMOVED, STOPPED
from training.runlog import RunLog

# How far a time that ends what `events export --until` reads or `events trim --before` removes may be ahead of Redis's
# clock, which stamps the stream entry ids: the command waits for Redis's clock to reach it (clocks of the machines
# differ, or T is "now" by another clock). Further ahead it is a typo (2062 for 2026), refused: trim would remove, and
# export miss, what the log takes until then.
MAX_AHEAD_SECONDS = 60


def shown_time(seconds: float) -> str:
    """UTC ISO-8601 with milliseconds, the precision of stream entry ids; --before and --since read it back."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def wait_for_redis_clock(streams: RedisStreams, option: str, at: float, log: RunLog, refused_because: str) -> None:
    """Return once Redis's clock has reached `at` (Unix seconds), so that the streams hold every entry the log will
    ever take before it: an export up to `at` then misses none, and a trim before `at` leaves none. Logs one line
    when it waits (at most MAX_AHEAD_SECONDS); InvalidInput, saying `refused_because`, when `at` is further ahead."""
    ahead = streams.time_to(at)
    if ahead > MAX_AHEAD_SECONDS:
        raise InvalidInput(f"{option} {shown_time(at)} is more than {MAX_AHEAD_SECONDS} s ahead of Redis's clock "
                           f"({shown_time(at - ahead)}): {refused_because}; give a time at most {MAX_AHEAD_SECONDS} s "
                           "ahead of Redis's clock (a time ahead is waited for)")
    if ahead:
        log.info(f"{option} {shown_time(at)} is {ahead:.3f}s ahead of Redis's clock: waiting for it to pass, so that "
                 "every entry the log takes before it is in the stream", waiting_seconds=ahead)
    while ahead:
        time.sleep(ahead)
        ahead = streams.time_to(at)


@dataclass
class ExperimentLoss:
    """One experiment's exposures that the log took before the trim time: its report counts them (and the
    feedback joined to them) only while they stay."""

    name: str
    status: str | None  # as the servers published it to Redis (running, stopped, removed); None: not published
    exposures: int
    first: float  # when the log took the first of them (Unix seconds)
    before: float  # the trim time

    @property
    def protected(self) -> bool:
        """Running, or unknown: its report may still be wanted. Only the data of an experiment stopped or removed
        from the servers' definitions goes unasked."""
        return self.status not in (STOPPED, REMOVED)

    def describe(self) -> str:
        status = self.status or "not published to Redis"
        return (f"experiment {self.name} ({status}) has {self.exposures:,} exposures the log took before "
                f"{shown_time(self.before)}, the first at {shown_time(self.first)}")

    def as_dict(self) -> dict:
        """What describe() says, as fields of a JSON log line."""
        return {"experiment": self.name, "status": self.status, "exposures": self.exposures,
                "first": shown_time(self.first)}


def experiment_losses(streams: RedisStreams, before: float) -> list[ExperimentLoss]:
    """The experiments with exposures in the log before `before`, by name. Feedback joins its exposure, which the
    log took before it, so these are also the experiments whose feedback before `before` counts in a report.
    Reads those exposures (as a report does) and the definitions the servers published."""
    published = {name.decode(): json.loads(definition).get("status")
                 for name, definition in streams.client.hgetall(experiments_key()).items()}
    losses: dict[str, ExperimentLoss] = {}
    for taken, record in streams.entries(EXPOSURE, until=before):
        name = record["experiment"]
        if name in losses:
            losses[name].exposures += 1
        else:
            losses[name] = ExperimentLoss(name, published.get(name), 1, taken, before)
    return sorted(losses.values(), key=lambda loss: loss.name)


def what_goes(kinds: tuple[str, ...]) -> str:
    """What of an experiment's exposures before the trim time its report loses when `kinds` are trimmed."""
    if EXPOSURE in kinds:
        return "them and their feedback" if FEEDBACK in kinds else "them"
    return "their feedback"


def refusal(protected: list[ExperimentLoss], kinds: tuple[str, ...]) -> str:
    """Why trimming `kinds` now is refused, and the ways on."""
    earliest = min(loss.first for loss in protected)
    return ("; ".join(loss.describe() for loss in protected)
            + f": trimming now would take {what_goes(kinds)} out of its report. Take the report first and stop the "
            "experiment (status \"stopped\", or remove it from the definitions) and let the servers reload, or trim "
            f"--before {shown_time(earliest)} or earlier, or pass --allow-report-loss. Nothing trimmed")


@dataclass
class StreamTrim:
    kind: str
    removed: int  # entries removed; on a dry run, that would be
    left: int
    dry_run: bool

    def summary(self, before: float) -> str:
        verb, left = ("would remove", "would be left") if self.dry_run else ("removed", "left")
        return (f"{self.kind} ({event_stream_key(self.kind)}): {verb} {self.removed:,} entries the log took before "
                f"{shown_time(before)}, {self.left:,} {left}")

    def as_dict(self) -> dict:
        return {"key": event_stream_key(self.kind), "removed": self.removed, "left": self.left}


def trim_stream(streams: RedisStreams, kind: str, before: float, dry_run: bool) -> StreamTrim:
    """Remove (or, on a dry run, count) the entries of one stream that the log took before `before`."""
    if dry_run:
        removed = streams.count(kind, until=before)
        return StreamTrim(kind, removed, max(streams.length(kind) - removed, 0), dry_run)
    removed = streams.trim(kind, before)
    return StreamTrim(kind, removed, streams.length(kind), dry_run)
