"""Cache warm-up: the default suggestions of the most active customers, precomputed into Redis."""

from __future__ import annotations

import multiprocessing
import queue
import socket
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import redis

from recsvc import artifacts
from recsvc.artifacts import ModelBundle
from recsvc.cache import (
    GENERATION_TTL,
    generation_key,
    new_generation,
    recent_items_key,
    recommendation_keys,
)
from recsvc.config import cache_max_entry_bytes, checked_redis_url, redacted_url
from recsvc.errors import InvalidInput, RecsvcError
from recsvc.event_log import RecentItems
from training.warm_batch import CUSTOMER_MARK, DEFAULT_QUERY, BatchRecommender, EncodedLists

DEFAULT_TOP = 10_000
# A nightly warm-up must last until the next model: keys carry the version and events invalidate a
# customer's entries, so a long TTL never serves a stale list.
DEFAULT_TTL = 24 * 3600.0
MAX_TTL = GENERATION_TTL / 2  # a customer's invalidation must outlive the entries it hides
OK_BYTES = len(b"+OK\r\n")
NIL_REPLIES = (b"_", b"$-1")  # RESP3, RESP2
SHORTEST_NIL = len(b"_\r\n")
MAX_LOW_WATER = 32768  # bytes; far below any socket's receive buffer
BATCH = 1000  # customers per batch: one matrix product, one state read, one write
TIMEOUT = 5.0  # seconds; the warm-up is offline, unlike the server's tens of milliseconds


class CacheUnavailable(RecsvcError):
    """Redis cannot be reached or refuses the writes."""

    code = "cache_unavailable"


@dataclass
class WarmResult:
    version: str
    strategy: str
    entries: int
    seconds: float  # wall clock, from the loaded model to the last reply
    compute_seconds: float  # computing and encoding the lists (of the busiest process)
    write_seconds: float  # sending the commands and reading their replies, alongside (all processes together)
    workers: int = 1

    def summary(self) -> str:
        rate = self.entries / self.seconds if self.seconds else 0.0
        write_rate = self.entries / self.write_seconds if self.write_seconds else 0.0
        processes = f" by {self.workers} processes" if self.workers > 1 else ""
        return (f"warmed {self.entries} entries ({self.version}, {self.strategy}) in {self.seconds:.2f}s{processes}: "
                f"{rate:,.0f} entries/s end to end; computing took {self.compute_seconds:.2f}s, writing "
                f"{self.write_seconds:.2f}s alongside it ({write_rate:,.0f} entries/s written)")

    def as_dict(self) -> dict:
        """The figures of the summary, seconds rounded to the millisecond (--log-format json)."""
        return {"version": self.version, "strategy": self.strategy, "entries": self.entries,
                "seconds": round(self.seconds, 3), "compute_seconds": round(self.compute_seconds, 3),
                "write_seconds": round(self.write_seconds, 3), "workers": self.workers}


class PrefetchedRecentItems(RecentItems):
    """The server's recent items (POST /v1/events) of a batch of customers, read beforehand in one round trip."""

    def __init__(self, items: dict[str, set[str]]):
        super().__init__(None)
        self.items = items

    def get(self, customer_id: str) -> set[str]:
        return self.items.get(customer_id, set())


def most_active(bundle: ModelBundle, top: int) -> np.ndarray:
    """Positions of the `top` customers with the most items, most active first (ties: lower position)."""
    counts = np.diff(np.asarray(bundle.owned.indptr))
    return np.argsort(-counts, kind="stable")[:top]


def connect(redis_url: str) -> redis.Redis:
    checked_redis_url(redis_url, "--redis-url")
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    except ValueError as exc:
        raise InvalidInput(f"--redis-url {redacted_url(redis_url)!r} is not a Redis URL: {exc}") from None
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CacheUnavailable(f"cannot reach Redis at {redacted_url(redis_url)}: {exc}") from None
    return client


def load_bundle(registry: Path) -> ModelBundle:
    # Plain arrays, not memory maps: the warm-up reads every customer, and memmap indexing is slower.
    bundle = artifacts.load_current(registry, mmap=False)
    if bundle is None:
        raise InvalidInput(f"the registry {registry} has no current model version; train one with `recsvc-train fit`")
    return bundle


def warm_cache(registry: Path, redis_url: str, top: int = DEFAULT_TOP, ttl: float = DEFAULT_TTL,
               log: Callable[[str], None] = print, workers: int = 1) -> WarmResult:
    """Write the default suggestions (what GET .../recommendations caches) of the `top` most active customers.

    Entries are byte-identical to the server's: the same ranking (recsvc.ranking), reasons and
    encoding, computed for a batch of customers at once (training/warm_batch.py), and the same
    codec tags them with each customer's current generation. `workers` processes (forked once the
    model is loaded) take turns at the batches.
    """
    if top < 1:
        raise InvalidInput("--top must be at least 1")
    if not 1 <= ttl <= MAX_TTL:
        raise InvalidInput(f"--ttl must be between 1 and {MAX_TTL:g} seconds")
    if workers < 1:
        raise InvalidInput("--workers must be at least 1")
    connect(redis_url).close()
    bundle = load_bundle(Path(registry))
    started = time.perf_counter()  # everything after the model is loaded counts
    plan = Plan.of(bundle, top, ttl, redis_url)
    shares = [plan.batches[rank::workers] for rank in range(workers)]
    children = [_fork(plan, share) for share in shares[1:] if share]
    outcomes = [_warm_share(plan, shares[0], log)] + [_join(child) for child in children]
    return WarmResult(bundle.version, plan.strategy, sum(o[0] for o in outcomes), time.perf_counter() - started,
                      max(o[1] for o in outcomes), sum(o[2] for o in outcomes), len(outcomes))


@dataclass
class Plan:
    """Who is warmed, under which keys, in which batches, and where to."""

    bundle: ModelBundle
    strategy: str
    customers: np.ndarray  # model positions, most active first
    customer_ids: list[str]
    id_bytes: list[bytes]  # the customer ids in UTF-8, as the keys hold them
    batches: list[slice]
    ttl: float
    redis_url: str
    max_bytes: int  # the servers' bound (RECSVC_CACHE_MAX_ENTRY_BYTES): they would not cache a larger list

    @classmethod
    def of(cls, bundle: ModelBundle, top: int, ttl: float, redis_url: str) -> "Plan":
        customers = most_active(bundle, top)
        id_bytes = bundle.customers.ids[customers].tolist()
        customer_ids = [c.decode("utf-8") for c in id_bytes]
        batches = [slice(start, start + BATCH) for start in range(0, len(customers), BATCH)]
        return cls(bundle, bundle.default_strategy, customers, customer_ids, id_bytes, batches, ttl, redis_url,
                   cache_max_entry_bytes())

    def around_ids(self) -> tuple[bytes, bytes]:
        """(before, after) the customer id in the recommendation keys of the default list."""
        return key_around(lambda customer_id: recommendation_keys(
            self.bundle.version, self.strategy, [customer_id], DEFAULT_QUERY.cache_params())[0])


def _warm_share(plan: Plan, batches: list[slice], log: Callable[[str], None]) -> tuple[int, float, float]:
    """(entries written, seconds computing, seconds writing) of these batches. Redis reads the next batch's
    customer state and stores the previous batch while one is computed."""
    lists = BatchRecommender(plan.bundle, plan.strategy)
    client = connect(plan.redis_url)  # connections of this process's own
    entries, computing = 0, 0.0
    with closing(client), StateReader(client) as reader, CommandWriter(client, plan) as writer:
        if batches:
            reader.request(plan.id_bytes[batches[0]])
        for number, batch in enumerate(batches):
            started = time.perf_counter()
            generations, recent = reader.receive()
            if number + 1 < len(batches):
                reader.request(plan.id_bytes[batches[number + 1]])
            encoded = lists.encode(plan.customers[batch], plan.customer_ids[batch], recent)
            rows = np.flatnonzero(encoded.sizes <= plan.max_bytes)
            writer.submit(*writer.commands(encoded, rows, plan.id_bytes[batch], generations))
            computing += time.perf_counter() - started
            entries += len(rows)
            log(f"warm-up: {min(batch.stop, len(plan.customers))}/{len(plan.customers)} customers computed")
    return entries, computing, writer.busy


def _fork(plan: Plan, batches: list[slice]):
    """A child process warming these batches (forked: it shares the loaded model's memory)."""
    receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(target=_child, args=(plan, batches, sender), daemon=True)
    process.start()
    sender.close()
    return process, receiver


def _child(plan: Plan, batches: list[slice], sender) -> None:
    try:
        sender.send(("ok", _warm_share(plan, batches, log=lambda _line: None)))
    except RecsvcError as exc:
        sender.send(("failed", exc.message))
    except Exception as exc:  # reported by the parent, which exits with a message, not a child's traceback
        sender.send(("failed", f"{exc.__class__.__name__}: {exc}"))


def _join(child) -> tuple[int, float, float]:
    process, receiver = child
    try:
        status, outcome = receiver.recv()
    except EOFError:
        status, outcome = "failed", f"a warm-up process ended with exit code {process.join() or process.exitcode}"
    process.join()
    if status != "ok":
        raise CacheUnavailable(f"a warm-up process failed: {outcome}")
    return outcome


def command(*parts: bytes) -> bytes:
    """One command in the Redis protocol (redis-py packs one at a third of this speed)."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(part), part) for part in parts)


def key_around(key_of: Callable[[str], str]) -> tuple[bytes, bytes]:
    """(before, after) the customer id in the keys that key_of (one of recsvc.cache's key functions) makes:
    a batch's keys are then written with one format each."""
    before, mark, after = key_of(CUSTOMER_MARK).partition(CUSTOMER_MARK)
    if not mark:
        raise AssertionError(f"no customer id in the key {key_of(CUSTOMER_MARK)!r}")
    return before.encode(), after.encode()


def key_arguments(around: tuple[bytes, bytes], customer_ids: list[bytes]) -> bytes:
    """The customers' keys as arguments of a command in the Redis protocol."""
    before, after = around
    fixed = len(before) + len(after)
    return b"".join([b"$%d\r\n%b%b%b\r\n" % (fixed + len(c), before, c, after) for c in customer_ids])


class StateReader:
    """Reads the customers' generations and recent items on a connection of its own, one batch ahead:
    the request goes out before the batch before it is computed, the replies are read after."""

    def __init__(self, client: redis.Redis):
        try:
            self.script = client.script_load(_RECENT_ITEMS)
        except redis.RedisError as exc:
            raise CacheUnavailable(f"loading a script into Redis failed: {exc}") from None
        self.connection = client.connection_pool.make_connection()
        self.generation_keys, self.recent_items_keys = key_around(generation_key), key_around(recent_items_key)
        self.customer_ids: list[bytes] = []

    def __enter__(self) -> "StateReader":
        return self

    def __exit__(self, *_exc) -> None:
        self.connection.disconnect()

    def request(self, customer_ids: list[bytes]) -> None:
        """Ask for the generations first: POST /v1/events adds recent items before it changes the generation,
        so an entry is never computed from recent items older than the generation it is tagged with (it
        would be served, stale)."""
        self.customer_ids = customer_ids
        n, now = len(customer_ids), repr(time.time()).encode()
        commands = b"".join([b"*%d\r\n$4\r\nMGET\r\n" % (1 + n), key_arguments(self.generation_keys, customer_ids),
                             b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n$%d\r\n%d\r\n" % (
                                 4 + n, len(self.script), self.script.encode(), len(b"%d" % n), n),
                             key_arguments(self.recent_items_keys, customer_ids),
                             b"$%d\r\n%b\r\n" % (len(now), now)])
        try:
            self.connection.send_packed_command([commands])
        except (redis.RedisError, OSError) as exc:
            raise CacheUnavailable(f"reading customers' generations and recent items from Redis failed: "
                                   f"{exc}") from None

    def receive(self) -> tuple[list[bytes | None], PrefetchedRecentItems]:
        """(generations, None for a customer without one, and recent items) of the customers last requested."""
        try:
            generations, found = self.connection.read_response(), self.connection.read_response()
        except (redis.RedisError, OSError) as exc:
            raise CacheUnavailable(f"reading customers' generations and recent items from Redis failed: "
                                   f"{exc}") from None
        ids = self.customer_ids
        recent = PrefetchedRecentItems({ids[int(index) - 1].decode("utf-8"): {m.decode("utf-8") for m in members}
                                        for index, members in zip(found[::2], found[1::2])})
        return generations, recent


class CommandWriter:
    """Sends pre-encoded SET commands on a connection of its own, from a thread, so Redis stores one batch
    while the next is computed; replies are checked in bulk, not parsed one by one."""

    def __init__(self, client: redis.Redis, plan: "Plan"):
        px = b"%d" % int(plan.ttl * 1000)
        self.token_px = b"%d" % int(GENERATION_TTL * 1000)  # tokens outlive the entries: ttl <= MAX_TTL
        self.trailer = b"\r\n$2\r\nPX\r\n$%d\r\n%b\r\n" % (len(px), px)  # ends each SET after its value
        # SET key (before, id, after), then the value's length and its start: the token tagged as
        # cache.encode_entry does (a length byte, then the token); the list's bytes and the trailer follow
        # (EncodedLists.join).
        self.keys = plan.around_ids()
        self.set_command = b"*5\r\n$3\r\nSET\r\n$%d\r\n%b%b%b\r\n$%d\r\n%c%b"
        # SET generation-key token PX ... NX (as RedisCache.claim), then the SET above.
        self.generation_keys = key_around(generation_key)
        self.token_command = b"*6\r\n$3\r\nSET\r\n$%d\r\n%b%b%b\r\n$%d\r\n%b\r\n" + \
            b"$2\r\nPX\r\n$%d\r\n%b\r\n$2\r\nNX\r\n" + self.set_command
        self.connection = client.connection_pool.make_connection()
        self.pending: queue.Queue = queue.Queue(maxsize=2)
        self.failure: CacheUnavailable | None = None
        self.busy = 0.0  # seconds spent sending commands and reading their replies
        self.thread = threading.Thread(target=self._run, name="warm-cache-writer", daemon=True)
        self.thread.start()

    def __enter__(self) -> "CommandWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.pending.put(None)
        self.thread.join()
        self.connection.disconnect()
        if self.failure is not None and exc[0] is None:
            raise self.failure

    def commands(self, encoded: EncodedLists, rows: np.ndarray, customer_ids: list[bytes],
                 generations: list[bytes | None]) -> tuple[bytes, np.ndarray]:
        """SET each row's list under its key, tagged with its customer's generation token (cache.encode_entry),
        with the TTL. A customer without a token first gets one (SET NX, as RedisCache.claim does): every
        entry's token then exists in Redis, and losing it to eviction turns the entry into a miss. Returns the
        commands and, per reply, whether it answers a token's SET NX. The Redis protocol is written here, one
        format per entry (redis-py encodes a command in Python at a third of the speed)."""
        prefix = new_generation()[:12]  # + the row: a token of its own for each customer of the batch
        (key_before, key_after), (generation_before, generation_after) = self.keys, self.generation_keys
        key_length, generation_length = len(key_before) + len(key_after), len(generation_before) + len(generation_after)
        px = self.token_px
        before = []
        for row, size in zip(rows.tolist(), encoded.sizes[rows].tolist()):
            customer_id, token = customer_ids[row], generations[row]
            if token is None:
                token = prefix + b"%d" % row
                before.append(self.token_command % (
                    generation_length + len(customer_id), generation_before, customer_id, generation_after,
                    len(token), token, len(px), px,
                    key_length + len(customer_id), key_before, customer_id, key_after,
                    1 + len(token) + size, len(token), token))
            else:
                before.append(self.set_command % (key_length + len(customer_id), key_before, customer_id, key_after,
                                                  1 + len(token) + size, len(token), token))
        missing = np.fromiter((g is None for g in generations), bool, len(generations))[rows]
        ends = np.cumsum(1 + missing)  # a row's replies: its token's SET NX (when missing), then its SET
        is_token = np.zeros(int(ends[-1]) if len(ends) else 0, dtype=bool)
        is_token[ends[missing] - 2] = True
        return encoded.join(rows, before, self.trailer), is_token

    def submit(self, payload: bytes, is_token: np.ndarray) -> None:
        """Queue commands, one reply each (is_token: which replies answer a token's SET NX); raises the
        writer's failure, if any."""
        if self.failure is not None:
            raise self.failure
        if len(is_token):
            self.pending.put((payload, is_token))

    def _run(self) -> None:
        while (work := self.pending.get()) is not None:
            if self.failure is not None:
                continue  # drain: the main thread raises at its next submit
            started = time.perf_counter()
            try:
                self.connection.send_packed_command([work[0]])
                self._expect_ok(work[1])
            except (redis.RedisError, OSError) as exc:
                self.connection.disconnect()  # unread replies would be taken for the next command's
                self.failure = CacheUnavailable(f"writing to Redis failed: {exc}")
            self.busy += time.perf_counter() - started

    def _expect_ok(self, is_token: np.ndarray) -> None:
        """Every SET answers one line: +OK, or for a token's SET NX also nil (another process made the
        customer's token first, and the entry tagged with ours is a miss; `_` in RESP3, `$-1` in RESP2).
        Anything else is an error reply, which is reported."""
        expected = len(is_token)
        received = bytearray()
        sock = self.connection._sock  # redis-py's socket of this connection: AUTH, SELECT and TLS already done
        # The replies still to come are at least this long (+OK, or `_` for a token's nil). Waking only once
        # as many bytes are there (SO_RCVLOWAT) keeps this thread from taking the GIL from the computation
        # for each of the dozens of chunks Redis answers in; it never waits for bytes that do not come.
        shortest = OK_BYTES * np.arange(expected, -1, -1) - (OK_BYTES - SHORTEST_NIL) * \
            np.concatenate([np.cumsum(is_token[::-1])[::-1], [0]])
        answered = 0
        while answered < expected:
            partial = len(received) - received.rfind(b"\r\n") - 2 if answered else len(received)
            _wake_after(sock, int(shortest[answered]) - partial)
            chunk = sock.recv(max(65536, OK_BYTES * expected - len(received)))
            if not chunk:
                raise redis.ConnectionError("Redis closed the connection")
            received += chunk
            answered = received.count(b"\r\n")
        _wake_after(sock, 1)
        if received == b"+OK\r\n" * expected:
            return
        lines = bytes(received).split(b"\r\n")[:expected]
        if all(line == b"+OK" or (token and line in NIL_REPLIES) for line, token in zip(lines, is_token.tolist())):
            return
        error = next((line for line in lines if line.startswith(b"-")), bytes(received[:80]))
        raise redis.ResponseError(error.decode("utf-8", "replace").lstrip("-"))


def _wake_after(sock, size: int) -> None:
    """Let the socket's readers wake only once `size` bytes have arrived (or it closes): Linux's SO_RCVLOWAT."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, min(size, MAX_LOW_WATER)))


# KEYS: the customers' recent-items sets; ARGV[1]: now (Unix seconds). Returns index (1-based), members, ... for
# those with items that still count (scored after now) only: most customers have none, and one script call
# replaces a round trip (or a parsed reply) per customer.
_RECENT_ITEMS = """
local found, after = {}, '(' .. ARGV[1]
for i, key in ipairs(KEYS) do
  local members = redis.call('ZRANGEBYSCORE', key, after, '+inf')
  if #members > 0 then
    found[#found + 1] = i
    found[#found + 1] = members
  end
end
return found
"""
