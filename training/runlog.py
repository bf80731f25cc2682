"""How trainer commands talk while they run: plain lines, JSON lines for cron, progress bars on a terminal."""

from __future__ import annotations

import datetime as dt
import functools
import json
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

import click
from tqdm import tqdm

LOG_FORMATS = ("text", "json")


class RunLog:
    """Messages and timed steps of one run.

    text: one line per message on `stream`, and a progress bar over the steps when
          `stream` is a terminal; json: one JSON object per line (no bar), for cron
          and log shippers (errors too, with their exit code); quiet: warnings and errors only.
    """

    def __init__(self, stream: TextIO | None = None, log_format: str = "text", quiet: bool = False,
                 sink: Callable[[str], None] | None = None):
        self.stream = stream or sys.stderr
        self.log_format = log_format
        self.quiet = quiet
        self.sink = sink  # tests and library callers: receive text lines instead of the stream
        self.seconds: dict[str, float] = {}
        self._bar: tqdm | None = None

    @classmethod
    def of(cls, log: "RunLog | Callable[[str], None] | None") -> "RunLog":
        """A RunLog for what a caller passed: a RunLog, a plain line callback, or None (stderr)."""
        if isinstance(log, RunLog):
            return log
        return cls(sink=log) if log is not None else cls()

    def info(self, message: str, **fields) -> None:
        if not self.quiet:
            self._emit("info", message, fields)

    def warning(self, message: str, **fields) -> None:
        self._emit("warning", message, fields)

    def error(self, message: str, **fields) -> None:
        """What ends the run: "error: ..." in text (as always), a JSON object like any other line in json."""
        self._emit("error", message if self.log_format == "json" else f"error: {message}", fields)

    def _emit(self, level: str, message: str, fields: dict) -> None:
        if self.sink is not None:
            self.sink(message)
            return
        if self.log_format == "json":
            record = {"ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "level": level,
                      "logger": "recsvc-train", "message": message, **fields}
            line = json.dumps(record, default=str)
        else:
            line = message
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _show_bar(self) -> bool:
        return (self.sink is None and not self.quiet and self.log_format == "text"
                and hasattr(self.stream, "isatty") and self.stream.isatty())

    @contextmanager
    def steps(self, total: int, description: str = "recsvc-train") -> Iterator[None]:
        """A progress bar over `total` steps while the block runs (only on a terminal)."""
        if self._show_bar():
            self._bar = tqdm(total=total, desc=description, file=self.stream, unit="step", leave=False)
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step; its seconds land in self.seconds[name] and in a log line when it ends."""
        if self._bar is not None:
            self._bar.set_postfix_str(name)
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started
        if self._bar is not None:
            self._bar.update(1)
        self.info(f"{name}: {self.seconds[name]:.1f}s", step=name, seconds=round(self.seconds[name], 3))


def run_log_options(command):
    """--quiet and --log-format, turned into a `log` (RunLog) argument. Give the command cls=LoggedCommand too, so
    that a mistake in its command line is a JSON line as well."""

    @click.option("--quiet", "-q", is_flag=True, help="Only warnings, errors and the outcome (for cron).")
    @click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
                  help="json: one JSON object per line on stderr, and the summary as one JSON line on stdout.")
    @functools.wraps(command)
    def wrapper(*args, quiet: bool, log_format: str, **kwargs):
        return command(*args, log=RunLog(log_format=log_format, quiet=quiet), **kwargs)

    return wrapper


class LoggedCommand(click.Command):
    """A command with run_log_options: with --log-format json, a mistake in its command line (a value that is no
    time, a missing option, an unknown one) is one JSON error line too, exit 2 as click's usage text; the
    command's own errors are training.cli.user_errors' business."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        log_format = asked_log_format(args)  # before click's parser, which consumes the list
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if log_format != "json":
                raise
            RunLog(log_format="json").error(exc.format_message(), exit_code=exc.exit_code)
            ctx.exit(exc.exit_code)


def asked_log_format(args: list[str]) -> str:
    """The --log-format a command line asks for (the last one, as click takes it), "text" when none."""
    log_format = "text"
    for index, token in enumerate(args):
        if token == "--":
            break
        if token.startswith("--log-format="):
            log_format = token.partition("=")[2]
        elif token == "--log-format" and index + 1 < len(args):
            log_format = args[index + 1]
    return log_format
