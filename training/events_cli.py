"""recsvc-train events: the events the API kept in Redis, exported as an interactions file for training."""

from __future__ import annotations

from pathlib import Path

import click
import redis

from recsvc.config import redacted_url
from recsvc.errors import InvalidInput, RecsvcError
from recsvc.event_log import EVENT, RedisStreams, parse_event_time
from training.experiments_cli import REDIS_URL, redis_client, user_errors


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
    """Events posted to POST /v1/events."""


@events.command("export")
@REDIS_URL
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The interactions file to write: FILE.csv, FILE.csv.gz or FILE.parquet (replaced whole).")
@click.option("--since", type=EventTime(), help="Only events the log took at or after this time: ISO-8601 (UTC "
              "when no zone is given) or Unix seconds.")
@click.option("--until", type=EventTime(), help="Only events the log took before this time.")
@user_errors
def export_command(redis_url: str | None, out: Path, since: float | None, until: float | None) -> None:
    """Write the events the API kept (its Redis stream) as an interactions file for `fit` and `nightly`:
    customer_id, item_id, event_type, timestamp (the event's own, else when it was received), weight.

    --since and --until select by when the log took an event, not by its timestamp: consecutive windows
    export every event exactly once, also one sent with an old timestamp or replayed late from a server's
    spool. Exit codes: 0 written (0 events too), 2 bad option or unusable --out, 1 Redis unreachable."""
    from recsvc.files import check_writable_file
    from training.event_export import export_events, output_format

    if not redis_url:
        raise InvalidInput("pass --redis-url or set RECSVC_REDIS_URL")
    if since is not None and until is not None and since >= until:
        raise InvalidInput("--since must be before --until")
    output_format(out)  # a name without a known suffix fails before Redis is asked
    check_writable_file(out)
    client = redis_client(redis_url)
    try:
        result = export_events(RedisStreams(client, dedupe_ttl=0).read(EVENT, since, until), out)
    except redis.RedisError as exc:
        raise RecsvcError(f"cannot read the event log from {redacted_url(redis_url)}: {str(exc).rstrip('.')}; "
                          f"{out} not written") from None
    finally:
        client.close()
    click.echo(result.summary())
