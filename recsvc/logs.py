"""JSON log lines, one object per line, carrying the request id of the request being served."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from contextvars import ContextVar

import orjson
from flask import g, has_request_context

# Attributes every LogRecord has; anything else was passed through `extra=` and goes into the line.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# The request id of a request answered outside Flask (recsvc/api/fast_path.py), where there is no `g`.
REQUEST_ID: ContextVar[str | None] = ContextVar("recsvc_request_id", default=None)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, request_id and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if has_request_context() and "request_id" in g:
            line["request_id"] = g.request_id
        elif REQUEST_ID.get() is not None:
            line["request_id"] = REQUEST_ID.get()
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure(level: str = "INFO") -> None:
    """Send recsvc's logs to stderr as JSON. Idempotent: a second call changes only the level."""
    root = logging.getLogger("recsvc")
    root.setLevel(level.upper())
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.propagate = False


def gunicorn_logconfig(level: str = "INFO") -> dict:
    """logging.config dict that makes gunicorn's own error log JSON too (used by gunicorn_conf.py)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
            # recsvc.access writes the access line, with the request id; gunicorn's would be a second one.
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        },
    }
