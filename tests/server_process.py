"""A real `recsvc serve` (gunicorn, preloaded, several workers) on a free port, for tests where processes matter."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.redis_process import free_port


def ready(base: str) -> bool:
    try:
        return requests.get(f"{base}/readyz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


@contextmanager
def running_server(env: dict[str, str], log: Path, *, workers: int = 2, threads: int | None = None,
                   timeout: float = 60.0, bind_from_env: bool = False) -> Iterator[str]:
    """Start `recsvc serve` with `env` over os.environ and its output in `log`; yield the base URL once
    /readyz answers 200 (fail the test with the log otherwise); stop the server on exit. The free port
    goes in --port, or with `bind_from_env` in RECSVC_BIND."""
    port = free_port()
    argv = [sys.executable, "-m", "recsvc.cli", "serve", "--workers", str(workers)]
    if bind_from_env:
        env = {**env, "RECSVC_BIND": f"127.0.0.1:{port}"}
    else:
        argv += ["--port", str(port)]
    if threads:
        argv += ["--threads", str(threads)]
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not ready(base):
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail(f"server did not become ready:\n{log.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
