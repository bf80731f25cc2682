"""The durable log of exposures, feedback and events: Redis Streams, with a local spool while Redis is down.

Every record the API accepts goes to the Redis Stream of its kind. When Redis
does not answer within the short timeout, the record is appended to this
process's spool file instead (one JSON line, written with one write() call and,
by default, fsync'd before the API answers); a background thread replays spool
files into Redis once it answers again. Each record carries a natural key
(request_id + customer_id + item_id + action for feedback); a Lua script adds
it to its stream only if that key was not seen, so replays and client retries
are never counted twice. Without a Redis URL the spool files are the log.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import orjson
import redis

from recsvc import metrics
from recsvc.cache import LocalCache, event_seen_key, event_stream_key, recent_items_key
from recsvc.errors import EventLogUnavailable

log = logging.getLogger(__name__)

EXPOSURE, FEEDBACK, EVENT = "exposure", "feedback", "event"
KINDS = (EXPOSURE, FEEDBACK, EVENT)
FSYNC_POLICIES = ("always", "everysec")
SPOOL_SUFFIX = ".spool"
READ_CHUNK = 5_000  # stream entries per XRANGE call
TRIM_STEP = 100_000  # stream entries per XTRIM call at most (about 4 ms of Redis's time each)
REPLAY_CHUNK = 500  # records per pipelined round trip when replaying
READ_TIMEOUT = 10.0  # seconds; reading a whole stream for a report or replaying takes longer than one command

# KEYS[1] the seen-marker, KEYS[2] the stream; ARGV[1] the record, ARGV[2] the marker's TTL in seconds.
_ADD_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  return redis.call('XADD', KEYS[2], '*', 'r', ARGV[1])
end
return false
"""


def natural_key(record: dict) -> str:
    """What makes two records the same: a retry or a replay of one of them must not count again."""
    kind = record["kind"]
    if kind == FEEDBACK:
        parts = (kind, record["request_id"], record["customer_id"], record["item_id"], record["action"])
    elif kind == EXPOSURE:
        parts = (kind, record["request_id"], record["customer_id"], record["experiment"])
    else:
        parts = (kind, record["event_id"])
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=16).hexdigest()


def now_seconds() -> float:
    return round(time.time(), 3)


class RedisStreams:
    """Adds records to their streams at most once per natural key, and reads them back in order."""

    def __init__(self, client: redis.Redis, dedupe_ttl: int):
        self.client = client
        self.dedupe_ttl = dedupe_ttl
        self._add_once = client.register_script(_ADD_ONCE)

    def add(self, record: dict, client=None) -> None:
        """Raises redis.RedisError when Redis does not answer."""
        self._add_once(keys=[event_seen_key(natural_key(record)), event_stream_key(record["kind"])],
                       args=[orjson.dumps(record), self.dedupe_ttl], client=client or self.client)

    def add_many(self, records: list[dict]) -> None:
        """One pipelined round trip per chunk; the same at-most-once guarantee as add()."""
        for start in range(0, len(records), REPLAY_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for record in records[start : start + REPLAY_CHUNK]:
                self.add(record, client=pipe)
            pipe.execute()

    def read(self, kind: str, since: float | None = None, until: float | None = None) -> Iterator[dict]:
        """Every record of a kind, oldest first, in chunks so a long stream never arrives in one reply.
        `since`, `until` (Unix seconds): only the records the stream took at or after `since` and before `until`,
        by the time in their entry id (Redis's clock, in milliseconds), whatever time a record itself holds."""
        return (record for _taken, record in self.entries(kind, since, until))

    def entries(self, kind: str, since: float | None = None,
                until: float | None = None) -> Iterator[tuple[float, dict]]:
        """read()'s records with the time the stream took each (Unix seconds, milliseconds exact)."""
        for chunk in self._chunks(kind, since, until):
            for entry_id, fields in chunk:
                yield int(entry_id.split(b"-")[0]) / 1000, orjson.loads(fields[b"r"])

    def count(self, kind: str, until: float | None = None) -> int:
        """How many records the stream took before `until` (Unix seconds; all without it). Reads them in chunks:
        Redis has no command that counts a range."""
        return sum(len(chunk) for chunk in self._chunks(kind, None, until))

    def time_to(self, at: float) -> float:
        """How long (seconds, to the millisecond; 0 once there) until Redis's clock (TIME) reaches `at` (Unix seconds)
        as entry ids count it. XADD * never gives an id below Redis's clock (every write path adds with *), so once
        this is 0 the streams hold every entry they will ever hold before `at`; only setting Redis's clock back could
        add one later."""
        seconds, microseconds = self.client.time()
        return max(_milliseconds(at) - (seconds * 1000 + microseconds // 1000), 0) / 1000

    def length(self, kind: str) -> int:
        return self.client.xlen(event_stream_key(kind))

    def trim(self, kind: str, before: float) -> int:
        """Remove the records the stream took before `before` (Unix seconds, by their entry id as read() selects):
        afterwards the stream holds exactly what read(kind, since=before) returned. Returns how many went.
        Whole stream nodes go first, at most TRIM_STEP entries per command, so Redis keeps answering the servers
        between steps (one exact XTRIM of a million entries blocked it for 32 ms); an exact XTRIM MINID then
        removes the few left in the node that holds `before`. "~" never removes an entry at or after the MINID."""
        key, min_id = event_stream_key(kind), f"{_milliseconds(before)}-0"
        removed = 0
        while step := self.client.xtrim(key, minid=min_id, approximate=True, limit=TRIM_STEP):
            removed += step
        return removed + self.client.xtrim(key, minid=min_id, approximate=False)

    def _chunks(self, kind: str, since: float | None, until: float | None) -> Iterator[list]:
        cursor = "-" if since is None else str(_milliseconds(since))
        end = "+" if until is None else str(_milliseconds(until) - 1)  # "<ms>" as an end: every entry of that ms
        while True:
            entries = self.client.xrange(event_stream_key(kind), min=cursor, max=end, count=READ_CHUNK)
            yield entries
            if len(entries) < READ_CHUNK:
                return
            cursor = "(" + entries[-1][0].decode()


def _milliseconds(seconds: float) -> int:
    """The first whole millisecond at or after `seconds` (rounded to microseconds first: 0.123 * 1000 is not 123)."""
    return math.ceil(round(seconds * 1000, 3))


class Spool:
    """Append-only JSON-lines files in one directory, one file per writing process.

    The writer holds an exclusive flock on its open file; a file nobody holds (a
    rotated one, or one left by a process that died) is free for any replayer,
    which takes the lock, sends the records and deletes the file.
    """

    def __init__(self, directory: Path, fsync: str = "always"):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}")
        self.directory = Path(directory)
        self.fsync = fsync
        self._fd: int | None = None
        self._pid: int | None = None
        self._dirty = False
        self._lock = threading.Lock()

    def append(self, record: dict, durable: bool = True) -> None:
        """Write one record; fsync it now under the "always" policy when `durable`, else within a second
        (sync()). Raises OSError when the record cannot be written (disk full, read-only volume)."""
        line = orjson.dumps(record) + b"\n"
        with self._lock:
            fd = self._open()
            os.write(fd, line)  # one write() on an O_APPEND descriptor: the line lands whole or not at all
            if durable and self.fsync == "always":
                os.fsync(fd)
            else:
                self._dirty = True

    def sync(self) -> None:
        """fsync pending writes (the everysec policy calls this once a second)."""
        with self._lock:
            if self._dirty and self._fd is not None and self._pid == os.getpid():
                os.fsync(self._fd)
                self._dirty = False

    def rotate(self) -> None:
        """Close this process's file, so the next replay can take it; the next append starts a new one."""
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                if self._dirty:
                    os.fsync(self._fd)
                os.close(self._fd)  # also releases the flock
            self._fd, self._dirty = None, False

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SPOOL_SUFFIX}")) if self.directory.is_dir() else []

    def replay(self, sink: Callable[[list[dict]], None]) -> int:
        """Send every free file's records to sink, then delete the file; returns the records sent.
        A sink failure leaves the file for the next round (sink must be idempotent)."""
        sent = 0
        for path in self.files():
            sent += self._replay_file(path, sink)
        return sent

    def read_all(self) -> Iterator[dict]:
        """Every complete record in every spool file (the log itself when no Redis is configured)."""
        for path in self.files():
            try:
                yield from _parse_lines(path.read_bytes(), path)
            except FileNotFoundError:
                continue  # replayed and deleted meanwhile

    def pending(self) -> int:
        """Records waiting in spool files (including this process's open file)."""
        return sum(1 for _ in self.read_all())

    def _open(self) -> int:
        # After a fork (gunicorn --preload) the inherited descriptor and its lock belong to the parent.
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging = self.directory / f".{name}.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked before it gets a name a replayer would pick up
        os.rename(staging, self.directory / f"{name}{SPOOL_SUFFIX}")
        _fsync_directory(self.directory)
        self._fd, self._pid, self._dirty = fd, os.getpid(), False
        return fd

    def _replay_file(self, path: Path, sink: Callable[[list[dict]], None]) -> int:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live writer or another replayer holds it
            if os.fstat(fd).st_nlink == 0:
                return 0  # another replayer finished it while we waited
            with os.fdopen(os.dup(fd), "rb") as fh:
                records = list(_parse_lines(fh.read(), path))
            sink(records)
            path.unlink()
            return len(records)
        finally:
            os.close(fd)


def _parse_lines(content: bytes, path: Path) -> Iterable[dict]:
    lines = content.split(b"\n")
    for number, line in enumerate(lines[:-1], 1):  # the part after the last newline is an unfinished write
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            log.error("spool %s line %d is damaged and skipped", path.name, number)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EventLog:
    """Accepts records for good: Redis Stream first, the spool while Redis is unreachable."""

    def __init__(self, redis_url: str | None, spool_dir: Path, *, timeout: float = 0.05, fsync: str = "always",
                 retry_interval: float = 1.0, dedupe_ttl: int = 7 * 86400):
        self.spool = Spool(spool_dir, fsync)
        self.retry_interval = retry_interval
        self.streams = self.reader = None
        if redis_url:
            client = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                          health_check_interval=0)
            self.streams = RedisStreams(client, dedupe_ttl)
            slow = redis.Redis.from_url(redis_url, socket_timeout=READ_TIMEOUT, socket_connect_timeout=timeout)
            self.reader = RedisStreams(slow, dedupe_ttl)
        self.on_reconnect: list[Callable[[redis.Redis], None]] = []
        # A callback could not do its work (Redis down at start-up): run them once Redis answers, even if no
        # record was spooled meanwhile. Callbacks set it again when they fail.
        self.reconnect_owed = False
        self._down_until = 0.0
        self._spooling = False  # Redis failed since the last successful replay
        self._thread_pid: int | None = None
        self._thread_lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def kind(self) -> str:
        return "redis" if self.streams else "spool"

    def append(self, record: dict, durable: bool = True) -> str:
        """Keep one record; returns where it went ("redis" or "spool"). Raises EventLogUnavailable only
        when neither Redis nor the spool can take it, so the API never answers 202 for a lost record.
        `durable=False` (exposures, on the recommendation path) lets a spooled record wait up to a second
        for its fsync: a crashed process loses nothing, a power failure at most that second."""
        self._ensure_thread()
        if self.streams is not None and time.monotonic() >= self._down_until:
            try:
                self.streams.add(record)
                metrics.event_logged(record["kind"], "redis")
                return "redis"
            except redis.RedisError as exc:
                # Skip Redis for a while: a request must not wait for the timeout of a server known to be down.
                self._down_until = time.monotonic() + self.retry_interval
                if not self._spooling:  # once per outage, not once per record
                    self._spooling = True
                    log.warning("event log: redis unreachable (%s), spooling to %s", exc.__class__.__name__,
                                self.spool.directory)
        try:
            self.spool.append(record, durable)
        except OSError as exc:
            log.error("event log: spool write failed: %s", exc)
            raise EventLogUnavailable("the event could not be stored; retry later") from None
        metrics.event_logged(record["kind"], "spool")
        return "spool"

    def read(self, kind: str) -> Iterator[dict]:
        """Every kept record of a kind: the stream when Redis is configured, else the spool files."""
        if self.reader is None:
            return (r for r in self.spool.read_all() if r.get("kind") == kind)
        try:
            return iter(list(self.reader.read(kind)))
        except redis.RedisError as exc:
            raise EventLogUnavailable("the event log (Redis) cannot be read right now; retry later") from exc

    def replay(self) -> int:
        """Move spooled records into Redis; returns how many. No-op without Redis or while it is down."""
        if self.reader is None:
            return 0
        try:
            self.reader.client.ping()
            self.reconnect_owed = False
            for callback in self.on_reconnect:
                callback(self.reader.client)
            self.spool.rotate()
            sent = self.spool.replay(self.reader.add_many)
        except (redis.RedisError, OSError) as exc:
            log.debug("event log: replay postponed: %s", exc.__class__.__name__)
            return 0
        self._down_until, self._spooling = 0.0, False
        if sent:
            metrics.event_log_replayed(sent)
            log.info("event log: replayed %d spooled records into redis", sent)
        return sent

    def stop(self) -> None:
        self._stop.set()
        self.spool.rotate()

    def _ensure_thread(self) -> None:
        """One replay thread per process, started on first use: threads do not survive gunicorn's fork."""
        if self._thread_pid == os.getpid():
            return
        with self._thread_lock:
            if self._thread_pid != os.getpid():
                self._thread_pid = os.getpid()
                threading.Thread(target=self._run, name="recsvc-event-log", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(min(self.retry_interval, 1.0)):  # everysec: fsync at least once a second
            try:
                self.spool.sync()
                if self.reconnect_owed or self.spool.files():
                    self.replay()
            except Exception:  # the thread must outlive any single failure
                log.exception("event log: background round failed")


class RecentItems:
    """Items customers interacted with since training (POST /v1/events).

    With Redis: a sorted set per customer, each item scored with the time it stops counting (`ttl` after it
    was added; the key itself has no TTL, so eviction cannot drop it, see recent_items_key). Always also in
    `shared`, the embedded cache's table in shared memory (a recsvc.cache.LocalCache, made before gunicorn
    forks): every worker of the server reads what any of them was told, also while Redis is down, full or
    refusing us, and without Redis it is the only copy. A list one worker computes must leave out what
    another worker was told the customer has."""

    def __init__(self, redis_url: str | None, *, ttl: float = 86400.0, timeout: float = 0.05,
                 max_customers: int = 100_000, retry_interval: float = 1.0, shared=None):
        self.client = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           health_check_interval=0) if redis_url else None
        self.ttl = ttl
        self.max_customers = max_customers
        self.retry_interval = retry_interval
        self.shared = shared if shared is not None else LocalCache()
        self._unsynced: dict[str, set[str]] = {}  # added while Redis was down
        self._lock = threading.Lock()
        self._down_until = 0.0

    def add(self, customer_id: str, item_ids: Iterable[str]) -> None:
        items = set(item_ids)
        self.shared.add_recent_items(customer_id, items, self.ttl)
        if self.client is None:
            return  # no Redis to bring up to date later
        if not (self._redis_usable() and self._write(self.client, customer_id, items)):
            with self._lock:  # written to Redis by flush() when the event log reconnects
                if customer_id in self._unsynced or len(self._unsynced) < self.max_customers:
                    self._unsynced.setdefault(customer_id, set()).update(items)

    def get(self, customer_id: str) -> set[str]:
        """The customer's recent items: those every worker of this server recorded (shared memory), with
        Redis's (shared by all replicas) when it answers."""
        local = self.shared.recent_items(customer_id)
        if self._redis_usable():
            try:
                members = self.client.zrangebyscore(recent_items_key(customer_id), f"({time.time()!r}", "+inf")
                return local | {m.decode("utf-8") for m in members}
            except redis.RedisError:
                self._down_until = time.monotonic() + self.retry_interval
        return local

    def flush(self, client: redis.Redis) -> None:
        """Write the items added while Redis was down, so other replicas see them too."""
        with self._lock:
            pending, self._unsynced = self._unsynced, {}
        for customer_id, items in pending.items():
            if not self._write(client, customer_id, items):
                with self._lock:
                    self._unsynced.setdefault(customer_id, set()).update(items)

    def _write(self, client: redis.Redis, customer_id: str, items: set[str]) -> bool:
        key, now = recent_items_key(customer_id), time.time()
        try:
            pipe = client.pipeline(transaction=False)
            pipe.zremrangebyscore(key, "-inf", now)  # the customer's expired items
            pipe.zadd(key, dict.fromkeys(items, now + self.ttl))
            pipe.execute()
            return True
        except redis.RedisError:
            self._down_until = time.monotonic() + self.retry_interval
            return False

    def merge(self, bundle, customer_id: str, owned: np.ndarray) -> np.ndarray:
        """`owned` item positions plus the model's positions of the customer's recent items."""
        recent = bundle.items.positions(sorted(self.get(customer_id)))
        return np.union1d(owned, np.asarray(recent, dtype=owned.dtype)) if recent else owned

    def _redis_usable(self) -> bool:
        return self.client is not None and time.monotonic() >= self._down_until


def sweep_recent_items(client: redis.Redis, now: float | None = None, batch: int = 1000) -> tuple[int, int]:
    """Remove expired items from every customer's recent items; Redis deletes a set left empty.
    (customers' sets seen, items removed). The sets have no TTL: without this, a customer who never
    comes back would keep theirs. SCAN walks the keyspace in steps, so Redis keeps serving meanwhile."""
    now = time.time() if now is None else now
    seen = removed = 0
    keys: list[bytes] = []

    def trim() -> int:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.zremrangebyscore(key, "-inf", now)
        return sum(pipe.execute())

    for key in client.scan_iter(match=recent_items_key("*"), count=batch):
        keys.append(key)
        if len(keys) == batch:
            seen, removed, keys = seen + len(keys), removed + trim(), []
    if keys:
        seen, removed = seen + len(keys), removed + trim()
    return seen, removed


def event_time(value: object) -> float | None:
    """Unix seconds from an ISO-8601 string, a number of Unix seconds or a datetime; None when absent."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return round(value.timestamp(), 3)
    return round(float(value), 3)


_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
LATEST_TIME = 32503680000.0  # 3000-01-01 in Unix seconds
# How far an event's own timestamp may be ahead of the clock that reads it. Clocks of export machines and clients
# differ; a day ahead is no timestamp's mistake. The trainer drops rows further ahead, and the API refuses such
# events.
EVENT_TIME_MAX_AHEAD_SECONDS = 86_400


def parse_event_time(value: object) -> float:
    """Unix seconds from ISO-8601 text (UTC when no zone is given) or Unix seconds: a number, or text of plain
    digits with an optional fraction (float() would also take "1_764_500_000", " 5", "nan" and other scripts'
    digits). ValueError saying what is wrong for anything else, and for a time outside 1970-3000."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("use ISO-8601 or Unix seconds")
    try:
        seconds = float(value) if not isinstance(value, str) or _SECONDS.fullmatch(value) else \
            event_time(dt.datetime.fromisoformat(value))
    except ValueError:
        raise ValueError("use ISO-8601 or Unix seconds") from None
    if not 0 < seconds < LATEST_TIME:
        raise ValueError("out of range")
    return seconds


def from_settings(settings, shared) -> tuple[EventLog, RecentItems]:
    """The event log and the recent-items store a server runs with (settings: recsvc.config.Settings; shared:
    the embedded cache's table, where all workers keep recent items, with or without Redis)."""
    event_log = EventLog(settings.redis_url, settings.spool_dir, timeout=settings.redis_timeout,
                         fsync=settings.spool_fsync, retry_interval=settings.redis_breaker_cooldown,
                         dedupe_ttl=int(settings.event_dedupe_ttl))
    recent = RecentItems(settings.redis_url, ttl=settings.recent_items_ttl, timeout=settings.redis_timeout,
                         retry_interval=settings.redis_breaker_cooldown, shared=shared)
    event_log.on_reconnect.append(recent.flush)
    return event_log, recent
