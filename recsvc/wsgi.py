"""WSGI entry point for gunicorn: `gunicorn -c python:recsvc.gunicorn_conf recsvc.wsgi:app`."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from recsvc.app import create_app  # noqa: E402
from recsvc.errors import ConfigError  # noqa: E402

try:
    app = create_app()
except ConfigError as error:  # e.g. a bad RECSVC_EXPERIMENTS file: exit 2 with the message, no traceback
    error.exit()
