"""gunicorn settings for recsvc; every value can be overridden by the environment or the command line.

The app is preloaded so the model arrays are memory-mapped once, before the
workers fork, and shared by all of them through the page cache. Prometheus
runs in multiprocess mode: each worker writes its metrics to files in one
directory, which /metrics merges.
"""

import atexit
import gc
import os
import shutil
import tempfile

# Before the settings check below imports numpy: OpenBLAS picks its thread count once, at load, and the workers
# forked from this master inherit it (threaded BLAS under implicit's own threads is much slower).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_made_by = None  # the master's pid when it made the metrics directory
# Must be set before prometheus_client is imported (by the preloaded app): it picks its storage at import.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="recsvc-metrics-")
    _made_by = os.getpid()
_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]


@atexit.register
def _remove_metrics_dir() -> None:
    """The directory made here goes when the master exits, also after a failed start-up (the app failed to
    load, the port was taken): gunicorn then exits through sys.exit without calling on_exit. Workers run the
    hooks they inherit when they exit too: only the master removes it."""
    if os.getpid() == _made_by:
        shutil.rmtree(_metrics_dir, ignore_errors=True)

os.makedirs(_metrics_dir, exist_ok=True)
# Files of an earlier run would be merged into this one's counts.
for _name in os.listdir(_metrics_dir):
    if _name.endswith(".db"):
        os.unlink(os.path.join(_metrics_dir, _name))

from recsvc.config import check_server_settings, gunicorn_settings  # noqa: E402
from recsvc.errors import ConfigError  # noqa: E402
from recsvc.logs import gunicorn_logconfig  # noqa: E402

try:  # as `recsvc serve` does: the image starts gunicorn itself, which would print a traceback and exit 1
    check_server_settings()
except ConfigError as exc:
    exc.exit()
_settings = gunicorn_settings()
bind = _settings["bind"]
workers = _settings["workers"]
# gthread, balancing kept-alive connections across the workers (recsvc/worker.py).
worker_class = "recsvc.worker.BalancedThreadWorker"
# 2, not more: threads of one worker contend for the GIL, which lengthened the uncached p99 (docs/operations.md).
threads = _settings["threads"]
preload_app = True
timeout = 30
graceful_timeout = 20
keepalive = 5
# The app writes its own JSON access line with the request id (recsvc.access); gunicorn's would duplicate it.
accesslog = None
errorlog = "-"
loglevel = _settings["loglevel"]
logconfig_dict = gunicorn_logconfig(loglevel)
logger_class = "recsvc.worker.GunicornLogger"  # skips the work of the access line that config drops
raw_env = ["OPENBLAS_NUM_THREADS=1"]
# gunicorn >= 24 opens a control socket at one fixed path per user; several servers on one host would clash.
control_socket_disable = True
wsgi_app = "recsvc.wsgi:app"


def pre_fork(server, worker):
    # Objects made while preloading move out of the collector's reach: its passes would otherwise write to
    # (and so copy) the memory pages each worker shares with the master.
    gc.freeze()


def post_worker_init(worker):
    # Each worker watches the registry and the experiments file from the start, also one that has not served a
    # request yet.
    service = getattr(worker.wsgi, "extensions", {}).get("recsvc")
    if service is not None:
        service.experiments.start_watching()
        service.store.start_watching()


def when_ready(server):
    from recsvc import metrics
    from recsvc.app import warm_up

    # Before the first fork: the pages the first requests write to are then written once, here, not in each worker.
    if server.cfg.preload_app and getattr(server.app.wsgi(), "extensions", {}).get("recsvc"):
        warm_up(server.app.wsgi())
    # The master loaded the model while preloading; its gauges would be read as a live worker's forever.
    metrics.worker_exited(os.getpid())


def child_exit(server, worker):
    from recsvc import metrics
    from recsvc.worker import release_slot

    metrics.worker_exited(worker.pid)
    release_slot(worker)

