"""gunicorn settings for recsvc; every value can be overridden by the environment or the command line.

The app is preloaded so the model arrays are memory-mapped once, before the
workers fork, and shared by all of them through the page cache.
"""

import multiprocessing
import os

bind = os.environ.get("RECSVC_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("RECSVC_WORKERS", min(4, multiprocessing.cpu_count())))
worker_class = "gthread"
threads = int(os.environ.get("RECSVC_THREADS", 4))
preload_app = True
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("RECSVC_LOG_LEVEL", "info")
raw_env = ["OPENBLAS_NUM_THREADS=1"]
wsgi_app = "recsvc.wsgi:app"
