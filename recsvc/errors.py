"""Domain exceptions of recsvc; one root class, mapped to HTTP in recsvc/api/errors.py."""

import sys
from typing import NoReturn


class RecsvcError(Exception):
    """Root of every error recsvc raises on purpose.

    `code` is a stable machine-readable name; `details` carries anything a
    caller can act on (never internals such as paths or stack traces).
    """

    code = "error"

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidInput(RecsvcError):
    """A user's input (file, parameter, request) is unusable."""

    code = "invalid_input"


class NotFound(RecsvcError):
    code = "not_found"


class ModelUnavailable(RecsvcError):
    """No model version is loaded (yet), or the registry is unreadable."""

    code = "model_unavailable"


class ArtifactError(RecsvcError):
    """A model version on disk is missing, incomplete or inconsistent."""

    code = "artifact_error"


class ConfigError(RecsvcError):
    """A setting has a wrong value; raised at start-up."""

    code = "config_error"
    exit_code = 2  # as `recsvc serve` exits for it

    def exit(self) -> NoReturn:
        """Stop start-up with the message alone, for gunicorn started directly (the container's CMD), which
        would otherwise print a traceback."""
        sys.stderr.write(f"error: {self.message}\n")
        sys.stderr.flush()
        raise SystemExit(self.exit_code)


class EventLogUnavailable(RecsvcError):
    """Neither Redis nor the local spool could keep an accepted record; the caller should retry."""

    code = "event_log_unavailable"
