"""A redis-server of a benchmark's own, on a free port, that it can kill and start again on the same port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


class RedisServer:
    """Nothing on disk by default; `appendonly=True` keeps an AOF (appendfsync everysec, as in
    docker-compose.yml), so a restart finds what was written before the kill."""

    def __init__(self, workdir: Path, appendonly: bool = False):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.dir = workdir
        self.appendonly = appendonly
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly \
            else ["--appendonly", "no"]
        self.process = subprocess.Popen([shutil.which("redis-server"), "--port", str(self.port), "--bind",
                                         "127.0.0.1", "--save", "", *persistence, "--dir", str(self.dir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.RedisError:  # also "loading the dataset in memory" after a restart
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # SIGKILL: no chance to save
            self.process.wait()
