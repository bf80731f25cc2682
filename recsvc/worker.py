"""gunicorn's gthread worker, taking new connections only while no other worker holds fewer.

Agent desktops (behind a load balancer) and load generators keep their connections
alive for a long time, and gunicorn's workers race for each new one: the worker
that wakes first takes it, so eight connections can land 6/2 or 8/0 on two workers.
One worker's queue then grows while another core idles, and the slowest answers
(p99) wait behind it. As nginx does with its accept_disabled, a worker that holds
more connections than the least loaded one waits a moment before accepting, so a
less loaded worker takes the connection instead; a connection is never kept
waiting longer than ACCEPT_DEFER_SECONDS for that (the others may be busy or stuck).

The workers' connection counts live on a board in shared memory, made in the
master before any fork; the master gives each worker a slot when it creates it
(the worker object is built in the master) and frees the slot when it exits.
"""

from __future__ import annotations

import errno
import logging
import mmap
import time

import orjson
from gunicorn import glogging, util
from gunicorn.http import wsgi
from gunicorn.workers.gthread import TConn, ThreadWorker

from recsvc.read_deadline import DeadlineSocket

# At most, per connection taken while ahead; 5 ms was sometimes too short for an idle peer to wake.
ACCEPT_DEFER_SECONDS = 0.020
DEFER_STEP_SECONDS = 0.0005
FREE = -1  # a slot no live worker holds
SERVER_FAULT = "the server could not answer; the error was logged"
# Seconds a request line and its headers may take to arrive, from their first byte. gthread bounds the wait for a
# request's first byte (5 s on a thread, then keepalive's seconds in its poller) but reads the rest on a thread from
# a socket without a timeout: a client sending a header byte every few seconds (slowloris) held the thread as long
# as it liked, and two such connections made a two-thread worker deaf. An honest client sends its head at once.
HEAD_READ_DEADLINE_SECONDS = 10.0


class ConnectionBoard:
    """Open-connection counts of a server's workers, one int32 slot each, in memory every fork shares."""

    def __init__(self, slots: int = 256):
        self._memory = mmap.mmap(-1, 4 * slots)  # anonymous and MAP_SHARED: writes are seen by every fork
        self.counts = memoryview(self._memory).cast("i")
        for slot in range(slots):
            self.counts[slot] = FREE

    def claim(self) -> int | None:
        """A free slot, marked in use (0 connections); None when all are taken. Called in the master only."""
        for slot, count in enumerate(self.counts):
            if count == FREE:
                self.counts[slot] = 0
                return slot
        return None

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self.counts[slot] = FREE

    def fewest_besides(self, slot: int) -> int | None:
        """The fewest connections any other live worker holds; None when there is no other."""
        others = [count for other, count in enumerate(self.counts) if other != slot and count != FREE]
        return min(others, default=None)


BOARD = ConnectionBoard()  # made at import, which gunicorn does in the master when it reads worker_class


class RequestHeadTimeout(Exception):
    """The request line and headers did not all arrive within HEAD_READ_DEADLINE_SECONDS of their first byte."""


class _HeadSocket(DeadlineSocket):
    """The socket as gunicorn's parser reads a request head from it. Its timeout is no OSError, which gthread would
    log with a traceback and leave unanswered: it reaches the worker's handle_error, which answers 408."""

    __slots__ = ()

    def recv(self, size: int) -> bytes:
        try:
            return super().recv(size)
        except TimeoutError:
            raise RequestHeadTimeout(f"the client did not send the request line and headers within "
                                     f"{HEAD_READ_DEADLINE_SECONDS:g} seconds of their first byte; send them at once"
                                     ) from None


class HeadTimedConn(TConn):
    """gthread's connection, each of whose request heads is read within HEAD_READ_DEADLINE_SECONDS. gthread calls
    init on a thread right before it reads a head: once a new connection's first byte is there, once a kept-alive
    one is readable again (its idle wait, in the poller, is keepalive's as before)."""

    def init(self):
        super().init()
        unreader = getattr(self.parser, "unreader", None)  # HTTP/2's parser has none: left as gunicorn has it
        if getattr(unreader, "sock", None) is self.sock:
            unreader.sock = _HeadSocket(self.sock, time.monotonic() + HEAD_READ_DEADLINE_SECONDS,
                                        HEAD_READ_DEADLINE_SECONDS)

    def head_read(self) -> None:
        """The head is read, or failed: the parser reads the socket itself again (the body has its own bounds,
        recsvc.api.parsing)."""
        unreader = getattr(self.parser, "unreader", None)
        if isinstance(getattr(unreader, "sock", None), _HeadSocket):
            unreader.sock = self.sock


class BalancedThreadWorker(ThreadWorker):
    """ThreadWorker that publishes its connection count and defers accepting while it holds the most."""

    def __init__(self, *args, **kwargs):
        self.board_slot = BOARD.claim()  # in the master: gunicorn builds the worker object before forking it
        super().__init__(*args, **kwargs)

    @property
    def nr_conns(self) -> int:
        return self._nr_conns

    @nr_conns.setter
    def nr_conns(self, value: int) -> None:
        # gthread counts every accepted connection until it is closed, kept-alive ones included.
        self._nr_conns = value
        if self.board_slot is not None:
            BOARD.counts[self.board_slot] = value

    def ahead(self) -> bool:
        """True while another live worker holds fewer connections than this one."""
        if self.board_slot is None:
            return False
        fewest = BOARD.fewest_besides(self.board_slot)
        return fewest is not None and fewest < self._nr_conns

    def accept(self, listener):
        deadline = time.monotonic() + ACCEPT_DEFER_SECONDS
        while self.ahead() and time.monotonic() < deadline:
            time.sleep(DEFER_STEP_SECONDS)  # a less loaded worker, woken by the same connection, may take it
        try:  # gthread's accept, with a HeadTimedConn for its TConn
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            self.enqueue_req(HeadTimedConn(self.cfg, client_sock, client_addr, listener.getsockname()))
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):  # EAGAIN: another took it
                raise

    def handle(self, conn):
        try:
            return super().handle(conn)
        finally:
            conn.head_read()  # when the head failed; after a request, handle_request did it

    def handle_request(self, req, conn):
        conn.head_read()
        return super().handle_request(req, conn)

    def handle_error(self, req, client, addr, exc):
        """A head that did not come in time: 408 in the API's error shape (util.write_error, below), one log line.
        gthread then closes the connection, as the answer says."""
        if not isinstance(exc, RequestHeadTimeout):
            return super().handle_error(req, client, addr, exc)
        self.log.warning("Request head timed out from ip=%s: %s", (addr or ("",))[0], exc)
        try:
            util.write_error(client, 408, "Request Timeout", str(exc))
        except OSError:
            self.log.debug("Failed to send the 408.")


class GunicornLogger(glogging.Logger):
    """gunicorn's logger, building an access line's fields only when its access logger would write the line.
    gunicorn builds them whenever a logging config is given, and recsvc's (recsvc.logs.gunicorn_logconfig) gives
    one that drops the line (recsvc.access writes its own): 3% of a worker's time spent on nothing."""

    def access(self, resp, req, environ, request_time):
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


def release_slot(worker) -> None:
    """For gunicorn's child_exit hook (in the master): the exited worker's slot is free for its successor."""
    BOARD.release(getattr(worker, "board_slot", None))


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's answer to a request it could not parse (a bad request line, an over-long URI or header, broken
    chunks), in the API's one error shape with a request id, instead of its HTML page. gunicorn's workers
    call util.write_error only from handle_error, after logging the error."""
    from recsvc.api.errors import CODE_BY_STATUS  # loaded by then (the app is preloaded); not at the master's start
    from recsvc.app import REQUEST_ID_HEADER
    from recsvc.recommend import new_request_id

    body = orjson.dumps({"error": {"code": CODE_BY_STATUS.get(status_int, "http_error"),
                                   "message": mesg or (SERVER_FAULT if status_int >= 500 else reason), "details": {}}})
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{REQUEST_ID_HEADER}: {new_request_id()}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = write_json_error


def _closes_after_a_failed_body(should_close):
    """Response.should_close, also True when reading the request's body raised (gunicorn marks its body failed):
    a stalled body the app answers 408, broken chunks. gunicorn closes such a connection after the answer (where
    the next request starts is unknown) but decides the answer's Connection header before, from the request
    alone, and drops the app's own: the answer said keep-alive and the client found the connection closed."""

    def closes(self) -> bool:
        return should_close(self) or getattr(getattr(self.req, "body", None), "failed", False) is True

    return closes


wsgi.Response.should_close = _closes_after_a_failed_body(wsgi.Response.should_close)
