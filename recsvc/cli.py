"""recsvc: the server's command line. Exit codes: 0 clean stop, 2 bad configuration."""

from __future__ import annotations

import os
import sys

import click

from recsvc.config import check_server_settings, gunicorn_settings
from recsvc.errors import ConfigError

# glibc malloc tuning read at process start, so it is set before gunicorn runs: few arenas, and buffers over
# 128 KiB (score arrays) handed back to the system when freed instead of kept per thread in every worker.
# Up to 1 MiB of free memory at the top of an arena is kept: at glibc's default (128 KiB) a request's
# temporaries of ~100 KB (masks, contributions) were returned and faulted in again, ~70 page faults per
# uncached request.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "1048576"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Serve recsvc recommendations."""


def _metrics_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR={path!r} cannot be a directory for the metrics: "
                          f"{exc.strerror or exc}") from None


def bind_address(host: str | None, port: int | None, bind: str | None = None) -> str:
    """gunicorn's HOST:PORT for --host and --port, the part not given taken from `bind` (RECSVC_BIND, already
    checked) when it is a HOST:PORT: `--port 9000` in the image (0.0.0.0:8000) stays reachable from outside.
    An IPv6 address goes in brackets (::1 would read as port '')."""
    bind_host, bind_port = "127.0.0.1", "8000"
    if bind and not bind.startswith("unix:"):
        bind_host, _, bind_port = bind.rpartition(":")
    host = host or bind_host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port or bind_port}"


@main.command()
@click.option("--host", help="address to listen on (default: the host of $RECSVC_BIND, else 127.0.0.1)")
@click.option("--port", type=click.IntRange(1, 65535), help="port (default: the port of $RECSVC_BIND, else 8000)")
@click.option("--workers", type=click.IntRange(1, 64), help="gunicorn workers (default: cores, at most 4)")
@click.option("--threads", type=click.IntRange(1, 64), help="threads per worker (default 2)")
def serve(host: str | None, port: int | None, workers: int | None, threads: int | None) -> None:
    """Run the API under gunicorn with recsvc/gunicorn_conf.py (which reads RECSVC_BIND, RECSVC_WORKERS and
    RECSVC_THREADS; these options override them)."""
    # Checking the experiments file loads the metrics module, which in multiprocess mode writes into this
    # directory at import; gunicorn_conf would create it too, but only after this check.
    try:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            _metrics_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        check_server_settings()  # fail fast, with the variable's name, before gunicorn starts
    except ConfigError as exc:
        exc.exit()
    argv = ["gunicorn", "-c", "python:recsvc.gunicorn_conf"]
    if host or port:
        argv += ["--bind", bind_address(host, port, gunicorn_settings()["bind"])]
    if workers:
        argv += ["--workers", str(workers)]
    if threads:
        argv += ["--threads", str(threads)]
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    for name, value in MALLOC_ENV.items():
        os.environ.setdefault(name, value)
    os.execvp(sys.executable, [sys.executable, "-m", *argv, "recsvc.wsgi:app"])


if __name__ == "__main__":
    main()
