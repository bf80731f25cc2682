"""Reads from a slow client, bounded: gunicorn's sockets block without a timeout while a thread reads a request.

Used for the request head (recsvc.worker) and the body (recsvc.api.parsing); imports nothing of the app, so the
worker class can use it in gunicorn's master before the app is loaded.
"""

from __future__ import annotations

import socket
import ssl
import time


class DeadlineSocket:
    """A connection's blocking socket as gunicorn's reader sees it during a bounded read: no recv waits more than
    `wait` seconds at once nor past the deadline.

    A recv first takes what has arrived without waiting (MSG_DONTWAIT): one system call, as gunicorn's own recv.
    Only when nothing has does it wait, with a timeout, then leaves the socket blocking again. A socket with a
    timeout would cost every recv a poll() first, another release of the GIL, which the worker's other thread may
    then hold for up to sys.getswitchinterval(): with the timeout set for every request head, cached GETs lost 8-11%
    of their throughput (one worker, 2 threads, wrk at 4 connections)."""

    __slots__ = ("sock", "deadline", "wait", "expired", "nowait")

    def __init__(self, sock, deadline: float, wait: float):
        self.sock = sock
        self.deadline = deadline
        self.wait = wait
        self.expired = False  # the last wait was cut by the deadline rather than by `wait`
        self.nowait = not isinstance(sock, ssl.SSLSocket)  # TLS takes no recv flags (recsvc serves none itself)

    def recv(self, size: int) -> bytes:
        if self.nowait:
            try:
                return self.sock.recv(size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        left = self.deadline - time.monotonic()
        if left < self.wait:
            self.expired = True
            if left <= 0:
                raise TimeoutError("the read's deadline has passed")
        self.sock.settimeout(min(left, self.wait))
        try:
            return self.sock.recv(size)
        finally:
            self.sock.settimeout(None)  # gunicorn's blocking socket, as the caller found it

    def __getattr__(self, name):
        return getattr(self.sock, name)
