"""WSGI entry point for gunicorn: `gunicorn -c python:recsvc.gunicorn_conf recsvc.wsgi:app`."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from recsvc.app import create_app  # noqa: E402

app = create_app()
