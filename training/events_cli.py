"""recsvc-train events: the events the API kept in Redis, exported as an interactions file for training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import redis

from recsvc.config import redacted_url
from recsvc.errors import InvalidInput, RecsvcError
from recsvc.event_log import EVENT, EXPOSURE, FEEDBACK, KINDS, RedisStreams, parse_event_time
from training.event_trim import (
    ExperimentLoss,
    StreamTrim,
    experiment_losses,
    refusal,
    shown_time,
    trim_stream,
    wait_for_redis_clock,
    what_goes,
)
from training.experiments_cli import REDIS_URL, redis_client, require_redis_url, user_errors
from training.runlog import LoggedCommand, RunLog, run_log_options

EXIT_REFUSED = 3  # as fit's quality gate: the command was sound, doing it now would lose what must be kept


class EventTime(click.ParamType):
    """ISO-8601 (UTC when no zone is given) or Unix seconds, read as POST /v1/events reads a timestamp."""

    name = "TIME"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return parse_event_time(value)
        except ValueError as exc:
            self.fail(f"{value!r}: {exc} (e.g. 2026-11-30, 2026-11-30T06:00:00+01:00 or 1764460800)", param, ctx)


@click.group()
def events() -> None:
    """The event log in Redis: events posted to POST /v1/events as a training file; trimming its streams."""


@events.command("export", cls=LoggedCommand)
@REDIS_URL
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The interactions file to write: FILE.csv, FILE.csv.gz or FILE.parquet (replaced whole).")
@click.option("--since", type=EventTime(), help="Only events the log took at or after this time: ISO-8601 (UTC "
              "when no zone is given) or Unix seconds.")
@click.option("--until", type=EventTime(), help="Only events the log took before this time.")
@run_log_options
@user_errors
def export_command(redis_url: str | None, out: Path, since: float | None, until: float | None, log: RunLog) -> None:
    """Write the events the API kept (its Redis stream) as an interactions file for `fit` and `nightly`:
    customer_id, item_id, event_type, timestamp (the event's own, else when it was received), weight.

    --since and --until select by when the log took an event, not by its timestamp: consecutive windows
    export every event exactly once, also one sent with an old timestamp or replayed late from a server's
    spool. An --until up to a minute ahead of Redis's clock (which stamps the entry ids) is waited for, so the file
    holds every event the log takes before it. Exit codes: 0 written (0 events too), 2 bad option (also an --until
    further ahead) or unusable --out, 1 Redis unreachable."""
    from recsvc.files import check_writable_file
    from training.event_export import export_events, output_format

    redis_url = require_redis_url(redis_url)
    if since is not None and until is not None and since >= until:
        raise InvalidInput("--since must be before --until")
    output_format(out)  # a name without a known suffix fails before Redis is asked
    check_writable_file(out)
    client = redis_client(redis_url)
    try:
        streams = RedisStreams(client, dedupe_ttl=0)
        if until is not None:
            wait_for_redis_clock(streams, "--until", until, log, "the file would lack the events the log takes until "
                                 "then, which a trim --before it would remove unread")
        result = export_events(lambda: streams.read(EVENT, since, until), out)
    except redis.RedisError as exc:
        raise RecsvcError(f"cannot read the event log from {redacted_url(redis_url)}: {str(exc).rstrip('.')}; "
                          f"{out} not written") from None
    finally:
        client.close()
    if log.log_format == "json":
        click.echo(json.dumps({"event": "summary", "outcome": "written", **result.as_dict(),
                               "since": None if since is None else shown_time(since),
                               "until": None if until is None else shown_time(until)}))
    else:
        click.echo(result.summary())


@events.command("trim", cls=LoggedCommand)
@REDIS_URL
@click.option("--before", type=EventTime(), required=True, help="Remove what the log took before this time: "
              "ISO-8601 (UTC when no zone is given) or Unix seconds, as export's --until.")
@click.option("--stream", "kinds", type=click.Choice(KINDS), multiple=True,
              help="A stream to trim; repeat it for several (default: event only; experiment reports read "
                   "exposure and feedback).")
@click.option("--dry-run", is_flag=True, help="Count what would go; change nothing.")
@click.option("--allow-report-loss", is_flag=True, help="Trim exposure and feedback also when a running "
              "experiment's report counts the records that go.")
@run_log_options
@user_errors
def trim_command(redis_url: str | None, before: float, kinds: tuple[str, ...], dry_run: bool,
                 allow_report_loss: bool, log: RunLog) -> None:
    """Remove the entries the log took before --before from its streams (by the time in their entry id, as export
    selects), so that `export --until T` then `trim --before T` loses no event; a --before up to a minute ahead of
    Redis's clock is waited for, as export's --until. Prints, per stream, the entries removed and left.

    Trimming exposure or feedback takes what goes out of every experiment's report: refused (exit 3, nothing
    trimmed) while an experiment that is running, or not published to Redis, has exposures before --before.
    Exit codes: 0 trimmed (or counted), 2 bad option, 3 refused, 1 Redis unreachable."""
    redis_url = require_redis_url(redis_url)
    kinds = tuple(dict.fromkeys(kinds)) or (EVENT,)
    client = redis_client(redis_url)
    streams = RedisStreams(client, dedupe_ttl=0)
    trims: list[StreamTrim] = []
    try:
        wait_for_redis_clock(streams, "--before", before, log, "it would remove everything the log holds, also what "
                             "no export has read yet")
        losses = experiment_losses(streams, before) if {EXPOSURE, FEEDBACK} & set(kinds) else []
        refused = [loss for loss in losses if loss.protected and not allow_report_loss]
        if refused and not dry_run:
            trim_outcome(log, before, kinds, dry_run, trims, refused)
        for kind in kinds:  # each line as its stream is done: after a failure the lines say what was trimmed
            trims.append(trim_stream(streams, kind, before, dry_run))
            if log.log_format == "text":
                click.echo(trims[-1].summary(before))
    except redis.RedisError as exc:  # in json, the error line's `streams` says what was trimmed
        raise RecsvcError(f"cannot trim the event log in {redacted_url(redis_url)}: {str(exc).rstrip('.')}",
                          details={"streams": {trim.kind: trim.as_dict() for trim in trims}}) from None
    finally:
        client.close()
    if losses:
        log.info("experiment reports count only the exposures and feedback left in the log")
    for loss in losses:
        if loss not in refused:
            counts = "would no longer count" if dry_run else "no longer counts"
            message = f"{loss.describe()}: its report {counts} {what_goes(kinds)}"
            log.warning(message if log.log_format == "json" else f"warning: {message}", **loss.as_dict())
    trim_outcome(log, before, kinds, dry_run, trims, refused)


def trim_outcome(log: RunLog, before: float, kinds: tuple[str, ...], dry_run: bool, trims: list[StreamTrim],
                 refused: list[ExperimentLoss]) -> None:
    """The summary (one JSON line on stdout with --log-format json; text printed each stream's line already), then
    the refusal and exit 3 when an experiment's report keeps what would go (a dry run counts first)."""
    if log.log_format == "json":
        outcome = "refused" if refused else "counted" if dry_run else "trimmed"
        click.echo(json.dumps({"event": "summary", "outcome": outcome, "before": shown_time(before),
                               "dry_run": dry_run, "streams": {trim.kind: trim.as_dict() for trim in trims}}))
    if refused:
        label = "refused (a run without --dry-run would be)" if dry_run else "refused"
        log.warning(f"{label}: {refusal(refused, kinds)}", experiments=[loss.as_dict() for loss in refused])
        sys.exit(EXIT_REFUSED)
