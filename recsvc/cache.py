"""Recommendation cache: the one key builder, the one entry codec, and a Redis or in-process store behind them.

Keys name the model version, so an entry made under an old model is never read
after a swap: the new version simply looks up different keys, and old entries
expire with their TTL. Each entry also carries the generation of its customer
(see invalidate_customer), and a miss is computed once however many requests
ask for it at the same time (get_or_compute).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
import zlib
from abc import ABC, abstractmethod
from typing import Callable

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from recsvc import metrics, shared_table
from recsvc.config import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "recsvc:v1"
NO_GENERATION = b""  # a customer never invalidated, or whose last invalidation is older than every live entry
UNREADABLE_GENERATION = b"unreadable"  # LocalCache: the generation could not be read; compared by identity
LOCK_TTL_MS = 2000  # a crashed lock holder blocks nobody longer than this; waiters give up much sooner anyway
POLL_SECONDS = 0.005  # how often a waiter looks for the entry another process is computing
# Generations outlive every entry made before them, the warm-up's day-long entries included (training/warm.py).
GENERATION_TTL = 2 * 86400.0
UNREACHABLE = object()  # what a Redis command returns when the breaker is open or the command failed
# Customers whose invalidation waits for Redis, shared by a server's workers: 2 MiB of ids (100,000 of 20 bytes).
OWED_INVALIDATION_BYTES = 2 * 2**20


def params_digest(params: dict) -> str:
    """A short stable digest of request parameters (key order and list order inside do not matter)."""
    canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def recommendation_key(model_version: str, strategy: str, customer_id: str, params: dict) -> str:
    """The cache key of one recommendation list."""
    return recommendation_keys(model_version, strategy, [customer_id], params)[0]


def recommendation_keys(model_version: str, strategy: str, customer_ids: list[str], params: dict) -> list[str]:
    """The cache keys of several customers' lists with the same parameters (the digest computed once)."""
    digest = params_digest(params)
    return [f"{KEY_PREFIX}:rec:{model_version}:{strategy}:{customer_id}:{digest}" for customer_id in customer_ids]


GENERATION_PREFIX = f"{KEY_PREFIX}:gen:"


def generation_key(customer_id: str) -> str:
    """Where a customer's generation lives: a token that changes whenever the customer's history does."""
    return GENERATION_PREFIX + customer_id


def lock_key(key: str) -> str:
    return f"{KEY_PREFIX}:lock:{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}"


# Keys of the durable event log and real-time customer state (recsvc/event_log.py): data, not cache entries.
def event_stream_key(kind: str) -> str:
    """The Redis Stream of one kind of accepted record (exposure, feedback, event)."""
    return f"{KEY_PREFIX}:log:{kind}"


def event_seen_key(digest: str) -> str:
    """Marks a record as already in its stream, so a replay or a client's retry is not added twice."""
    return f"{KEY_PREFIX}:log:seen:{digest}"


def recent_items_key(customer_id: str) -> str:
    """Items a customer interacted with since the model was trained (POST /v1/events): a sorted set of item
    ids, each scored with the Unix time until which it counts as the customer's own. The key has no TTL, so
    a full Redis under volatile-lru never evicts it (an evicted set would let a list suggest what the
    customer just took); expired items go at the customer's next write and in recsvc.event_log's
    sweep_recent_items, which `recsvc-train nightly` runs. (Releases before this one kept a plain set with
    a TTL under `recent:`; those keys expire by themselves.)"""
    return f"{KEY_PREFIX}:recent-until:{customer_id}"


def experiments_key() -> str:
    """The experiment definitions a server runs with, published for `recsvc-train experiments report`."""
    return f"{KEY_PREFIX}:experiments"


# --- the entry codec: generation length (1 byte), generation, orjson fragment ---


def encode_entry(generation: bytes, fragment: bytes) -> bytes:
    """What is stored under a recommendation key: the fragment tagged with the customer's generation."""
    return bytes([len(generation)]) + generation + fragment


def decode_entry(raw: bytes) -> tuple[bytes, bytes] | None:
    """(generation, fragment), or None for bytes this codec did not write."""
    if not raw:
        return None
    end = 1 + raw[0]
    if len(raw) <= end:
        return None
    return raw[1:end], raw[end:]


def current_fragment(raw: bytes | None, generation: bytes | None) -> bytes | None:
    """The fragment of a stored entry when it was made under the customer's current generation."""
    entry = decode_entry(raw) if raw else None
    if entry is not None and entry[0] == (generation or NO_GENERATION):
        return entry[1]
    return None


def new_generation() -> bytes:
    return uuid.uuid4().hex[:16].encode()


class CircuitBreaker:
    """Closed until `failures` consecutive failures, then open: calls are skipped for `cooldown` seconds,
    after which one probe goes through (half-open); its success closes the breaker, its failure reopens it.
    A probe that never reports (its caller was stopped by another breaker) is granted again after another
    cooldown, so the breaker cannot stay half-open for good. `publish` gets each new state (a metric)."""

    CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"

    def __init__(self, failures: int = 3, cooldown: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 publish: Callable[[str], None] = metrics.redis_breaker, name: str = "redis circuit breaker"):
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.publish = publish
        self.name = name
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a call go to Redis now? Only one caller gets the half-open probe."""
        if self.state == self.CLOSED:
            return True
        with self._lock:
            if self.clock() - self.opened_at >= self.cooldown:
                self.opened_at = self.clock()  # the probe's own cooldown, should it never report
                self._move(self.HALF_OPEN)
                return True
            return False

    def success(self) -> None:
        self.failures = 0
        if self.state != self.CLOSED:
            with self._lock:
                self._move(self.CLOSED)

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.state == self.HALF_OPEN or (self.state == self.CLOSED and self.failures >= self.threshold):
                self.opened_at = self.clock()
                self._move(self.OPEN)

    def _move(self, state: str) -> None:
        if state != self.state:
            log.warning("%s %s -> %s", self.name, self.state, state)
            self.state = state
            self.publish(state)


class _Flight:
    """One computation of one key in this process, which other requests for the key wait for."""

    def __init__(self):
        self.done = threading.Event()
        self.fragment: bytes | None = None


class SingleFlight:
    """In-process half of the stampede protection: the first request for a key leads, the others follow."""

    def __init__(self):
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}

    def join(self, key: str) -> tuple[_Flight, bool]:
        """(the flight, True when this caller leads it)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = _Flight()
            return flight, True

    def land(self, key: str, flight: _Flight, fragment: bytes | None) -> None:
        """End the flight; followers get `fragment` (None: they compute themselves)."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.fragment = fragment
        flight.done.set()


class Cache(ABC):
    """Recommendation fragments by key. Failures never raise: a broken cache is a miss, not an error.

    Subclasses store bytes (get_many, set; a shared store also claim and release
    a compute lock); this class adds the generation check, the entry size bound
    and single-flight computation.
    """

    kind: str

    def __init__(self, ttl: float = 300.0, max_entry_bytes: int = 64 * 1024, lock_wait: float = 0.05):
        self.ttl = ttl  # seconds
        self.max_entry_bytes = max_entry_bytes
        self.lock_wait = lock_wait  # seconds a request waits for another's computation before computing itself
        self._flights = SingleFlight()

    @abstractmethod
    def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    @abstractmethod
    def set(self, key: str, value: bytes, ttl: float) -> None: ...

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def claim(self, key: str, customer_id: str) -> tuple[bool, bytes | None, bytes | None]:
        """Take the cross-process compute lock of `key` and look again: (True when this process should
        compute, the fragment when another process stored it meanwhile, the customer's generation as read
        now, or None to keep lookup's). In-process: no other process."""
        return True, None, None

    def release(self, key: str, generation: bytes, fragment: bytes | None, ttl: float | None, locked: bool) -> None:
        """Store the computed fragment (None: the computation failed) and release the compute lock."""
        if fragment is not None and self.storable(fragment):
            self.set(key, encode_entry(generation, fragment), ttl or self.ttl)

    def status(self) -> dict:
        """What /readyz shows about the cache."""
        return {"kind": self.kind}

    def publish_size(self) -> None:
        """Set the cache's size gauges, where it has them (the embedded cache); called by /metrics."""

    def lookup(self, key: str, customer_id: str) -> tuple[bytes | None, bytes]:
        """(fragment or None, the customer's generation now). An entry of an older generation is a miss."""
        raw, generation = self.get_many([key, generation_key(customer_id)])
        return current_fragment(raw, generation), generation or NO_GENERATION

    def storable(self, fragment: bytes) -> bool:
        """Entries above max_entry_bytes are served but not cached: memory per entry stays bounded."""
        if len(fragment) > self.max_entry_bytes:
            metrics.cache_oversize()
            return False
        return True

    @property
    def generation_ttl(self) -> float:
        """Seconds a generation token lives: longer than every entry made under it."""
        return max(GENERATION_TTL, 2 * self.ttl)

    def invalidate_customer(self, customer_id: str) -> None:
        """Forget every cached list of this customer, on every replica: O(1), one write.

        The new generation outlives every entry made before it (GENERATION_TTL, or
        twice a longer TTL), so no older entry can become readable again when it expires.
        """
        self.set(generation_key(customer_id), new_generation(), self.generation_ttl)

    def get_or_compute(self, key: str, customer_id: str, compute: Callable[[], bytes],
                       ttl: float | None = None) -> tuple[bytes, bool]:
        """(fragment, True when it was not computed by this call). Concurrent misses of one key compute once:
        followers wait up to lock_wait seconds for the leader, then compute themselves."""
        flight, leader = self._flights.join(key)
        if not leader:
            metrics.cache_coalesced()
            if flight.done.wait(self.lock_wait) and flight.fragment is not None:
                return flight.fragment, True
            return compute(), False
        fragment = None
        try:
            fragment, hit = self._lead(key, customer_id, compute, ttl)
            return fragment, hit
        finally:
            self._flights.land(key, flight, fragment)

    def _lead(self, key: str, customer_id: str, compute: Callable[[], bytes],
              ttl: float | None) -> tuple[bytes, bool]:
        fragment, generation = self.lookup(key, customer_id)
        if fragment is not None:
            return fragment, True
        locked, fragment, claimed = self.claim(key, customer_id)
        generation = generation if claimed is None else claimed
        if fragment is None and not locked:  # another process is computing it
            fragment = self._await_other_process(key, customer_id)
        if fragment is not None:
            return fragment, True
        try:
            fragment = compute()
        finally:
            self.release(key, generation, fragment, ttl, locked)
        return fragment, False

    def _await_other_process(self, key: str, customer_id: str) -> bytes | None:
        deadline = time.monotonic() + self.lock_wait
        while time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            fragment, _generation = self.lookup(key, customer_id)
            if fragment is not None:
                return fragment
        return None


class LocalCache(Cache):
    """The embedded cache (no Redis): one table in shared memory for every worker of a server.

    Made in gunicorn's master while it preloads the app, so the workers it forks read
    and write the same pages (recsvc/shared_table.py): one copy of each list whatever
    the number of workers, a list computed by one worker is a hit in all, and an
    invalidation (POST /v1/events) reaches all at once. In a single process (tests,
    create_app without gunicorn) it works the same. Bounded by max_bytes in all (the
    mapping's size: a 16th holds generations, the rest lists) and by max_entries
    lists. Lists above COMPRESS_ABOVE bytes are kept zlib-compressed (a 10-item list:
    ~2 KB of JSON, ~0.5 KB kept, one 512-byte slot; longer lists take several slots).
    """

    kind = "local"
    COMPRESS_ABOVE = 256  # bytes; generations and tiny values are kept as they are
    SLOT_BYTES = 512  # a compressed 10-item list and its entry head fit one slot
    GENERATION_SLOT_BYTES = 64  # a generation token and its entry head
    GENERATION_SHARE = 16  # 1/16 of the bytes hold generations
    COMPRESSED = 1  # entry flag

    def __init__(self, max_entries: int = 100_000, max_bytes: int = 8 * 2**20, **options):
        super().__init__(**options)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lists = self._generations = None
        generations, lists = self.geometries(max_entries, max_bytes)
        if lists is None:  # too small to hold anything: every lookup is a miss
            return
        self.memory = shared_table.SharedMemory(generations.bytes + lists.bytes)
        self._generations = shared_table.SlotTable(self.memory, 0, generations, evictions_change_epoch=True)
        self._lists = shared_table.SlotTable(self.memory, generations.bytes, lists)

    @classmethod
    def geometries(cls, max_entries: int, max_bytes: int):
        """(generations, lists) tables for these bounds; lists is None when not even one list fits."""
        share = max(max_bytes // cls.GENERATION_SHARE, shared_table.Geometry(1, 1, cls.GENERATION_SLOT_BYTES).bytes)
        generations = shared_table.geometry_for(max(max_entries, 16), share, cls.GENERATION_SLOT_BYTES)
        lists = shared_table.geometry_for(max_entries, max_bytes - generations.bytes, cls.SLOT_BYTES) \
            if generations and max_entries > 0 else None
        return generations, lists

    @classmethod
    def smallest_bytes(cls, max_entries: int) -> int:
        """The fewest bytes in which a table with these entries holds one list (for the settings' check)."""
        low, high = 0, 2**20
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if cls.geometries(max_entries, middle)[1] else (middle + 1, high)
        return low

    # --- the Cache interface ------------------------------------------------------------------------------

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self._get(key) for key in keys]

    def _get(self, key: str) -> bytes | None:
        if self._lists is None:
            return None
        table = self._generations if key.startswith(GENERATION_PREFIX) else self._lists
        state, entry, _epoch = table.read(shared_table.digest(key), time.monotonic(), table is self._lists)
        if state != shared_table.FOUND:
            return None
        value, flags = entry
        return zlib.decompress(value) if flags & self.COMPRESSED else value

    def set(self, key: str, value: bytes, ttl: float) -> None:
        if self._lists is None:
            return
        if key.startswith(GENERATION_PREFIX):  # generations stay until evicted: see generation()
            self._generations.write(shared_table.digest(key), value, 0, math.inf, time.monotonic())
            return
        flags = 0
        if len(value) > self.COMPRESS_ABOVE:
            packed = zlib.compress(value, 1)
            if len(packed) < len(value):
                value, flags = packed, self.COMPRESSED
        now = time.monotonic()
        if not self._lists.write(shared_table.digest(key), value, flags, now + ttl, now):
            metrics.cache_oversize()  # larger than a whole set of slots: served, not cached

    def lookup(self, key: str, customer_id: str) -> tuple[bytes | None, bytes]:
        generation = self.generation(customer_id)
        if generation is UNREADABLE_GENERATION:
            return None, generation
        return current_fragment(self._get(key), generation), generation

    def release(self, key: str, generation: bytes, fragment: bytes | None, ttl: float | None, locked: bool) -> None:
        if generation is not UNREADABLE_GENERATION:  # a list whose generation nobody could read is not stored
            super().release(key, generation, fragment, ttl, locked)

    def generation(self, customer_id: str) -> bytes:
        """The customer's generation now: the token of the last invalidation; NO_GENERATION when never
        invalidated; when the table has lost the token (evicted, or cleared after a crash), a token of the
        set's epoch, which changed when the token was lost, so no list made before the loss matches it;
        UNREADABLE_GENERATION (matches nothing, is never stored) when the set cannot be read."""
        if self._generations is None:
            return NO_GENERATION
        key_digest = shared_table.digest(generation_key(customer_id))
        for attempt in range(2):
            state, entry, epoch = self._generations.read(key_digest, time.monotonic(), honour_expiry=False)
            if state == shared_table.FOUND:
                return entry[0]
            if state == shared_table.ABSENT:
                return b"epoch-%016x" % epoch if epoch else NO_GENERATION
            if attempt == 0:
                self._generations.repair(key_digest)  # a dead writer's torn set, or a corrupt token
        return UNREADABLE_GENERATION

    def invalidate_customer(self, customer_id: str) -> None:
        """Forget every cached list of this customer in every worker at once: O(1), one write to the table.
        The token stays until evicted, and its eviction changes its set's epoch (see generation())."""
        self.set(generation_key(customer_id), new_generation(), math.inf)

    # --- recent items (POST /v1/events) without Redis: shared by the workers like the lists -----------------

    def recent_items(self, customer_id: str) -> set[str]:
        """The customer's recent items, as any worker of this server recorded them; empty when none (or lost
        to eviction, like an expired entry)."""
        raw = self._get(recent_items_key(customer_id))
        return set(orjson.loads(raw)) if raw else set()

    def add_recent_items(self, customer_id: str, items: set[str], ttl: float) -> None:
        """Add to the customer's recent items for `ttl` seconds; a read-modify-write under the entry's lock,
        so two workers recording events of one customer at once keep both."""
        if self._lists is None:
            return

        def merged(stored: bytes | None) -> bytes:
            return orjson.dumps(sorted(items | set(orjson.loads(stored) if stored else ())))

        now = time.monotonic()
        self._lists.update(shared_table.digest(recent_items_key(customer_id)), merged, now + ttl, now)

    # --- size ---------------------------------------------------------------------------------------------

    def usage(self) -> dict:
        """Lists and generations held and the bytes of the slots they take, over the whole shared table."""
        if self._lists is None:
            return {"entries": 0, "generations": 0, "bytes": 0, "capacity_bytes": 0}
        entries, list_bytes = self._lists.usage()
        generations, generation_bytes = self._generations.usage()
        return {"entries": entries, "generations": generations, "bytes": list_bytes + generation_bytes,
                "capacity_bytes": self.memory.size}

    @property
    def bytes(self) -> int:
        return self.usage()["bytes"]

    def publish_size(self) -> None:
        """Set the size gauges (one table for all workers: the gauges keep the most recent value, not a sum).
        Called when /metrics is scraped, not on every write: it reads every set's header, so its cost grows
        with the table (1.2 ms for 512 MiB)."""
        usage = self.usage()
        metrics.local_cache_size(usage["entries"], usage["bytes"])

    def status(self) -> dict:
        return {"kind": self.kind, "shared": True, **self.usage()}


class RedisCache(Cache):
    """Redis with short timeouts behind circuit breakers; any Redis error is logged and treated as a miss.

    Every entry is tagged with a generation token that exists in Redis: the first computation for a
    customer without one creates it (SET NX). A customer whose token is missing therefore has no entry
    to trust: when Redis evicts the token (maxmemory) or it expires, the entries made under it, stale or
    not, become misses, instead of matching "never invalidated" and serving a list made before an
    invalidation (an item the customer has since bought).

    An invalidation Redis does not take (down, slow, full, refusing us, breaker open) is owed: the customer
    goes into a set in shared memory that every worker of the server reads (recsvc.shared_table.SharedIdSet,
    made here, before gunicorn forks), and no worker trusts a Redis entry of that customer until the
    invalidation reached Redis. The first worker whose Redis command succeeds again sends every owed one.

    Two breakers: `breaker` counts every failure and, open, keeps every command away from Redis (a Redis
    that is down); `write_breaker` counts failed writes only, and successful reads do not reset it, so a
    Redis that answers reads but stalls writes (CLIENT PAUSE WRITE, as FAILOVER does) soon costs misses no
    write timeouts, while hits keep coming from Redis.
    """

    kind = "redis"
    WRITES = frozenset({"set", "lock", "unlock"})  # the actions write_breaker guards

    def __init__(self, url: str, timeout: float = 0.05, breaker: CircuitBreaker | None = None,
                 write_breaker: CircuitBreaker | None = None, **options):
        super().__init__(**options)
        # No retries: a failed call is a miss at once; the breaker decides when to try Redis again.
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           health_check_interval=0, retry=Retry(NoBackoff(), 0))
        self.breaker = breaker or CircuitBreaker()
        self.write_breaker = write_breaker or CircuitBreaker(self.breaker.threshold, self.breaker.cooldown,
                                                             publish=metrics.redis_write_breaker,
                                                             name="redis write breaker")
        self.owed = shared_table.SharedIdSet(OWED_INVALIDATION_BYTES)  # customers whose invalidation Redis lacks

    def _call(self, action: str, command: Callable, default):
        """Run one Redis command through the breakers; `default` when one is open or the command fails.
        After a success, send the invalidations Redis missed."""
        result = self._attempt(action, command)
        if result is UNREACHABLE:
            return default
        if len(self.owed):
            self._send_invalidations()
        return result

    def _attempt(self, action: str, command: Callable):
        """One command through the breakers: its result, or UNREACHABLE."""
        write = action in self.WRITES
        if not ((not write or self.write_breaker.allow()) and self.breaker.allow()):
            return UNREACHABLE
        try:
            result = command()
        except redis.RedisError as exc:
            self.breaker.failure()
            if write:
                self.write_breaker.failure()
            metrics.redis_error(action)
            log.warning("redis %s failed: %s", action, exc.__class__.__name__)
            return UNREACHABLE
        self.breaker.success()
        if write:
            self.write_breaker.success()
        return result

    def invalidate_customer(self, customer_id: str) -> None:
        if self._call("set", lambda: self._write_generations([customer_id]), UNREACHABLE) is not UNREACHABLE:
            return
        if not self.owed.add(customer_id):
            log.error("redis: %d bytes of owed invalidations wait already; %s's is dropped (its cached lists "
                      "live out their TTL)", OWED_INVALIDATION_BYTES, customer_id)

    def _write_generations(self, customer_ids) -> None:
        pipe = self.client.pipeline(transaction=False)
        for customer_id in customer_ids:
            pipe.set(generation_key(customer_id), new_generation(), px=int(self.generation_ttl * 1000))
        pipe.execute()

    def _send_invalidations(self) -> None:
        """Send every owed invalidation in one pipeline; the set empties only once Redis took them all."""
        with self.owed.draining() as owed:
            if owed and self._attempt("set", lambda: self._write_generations(owed)) is not UNREACHABLE:
                self.owed.clear()

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return self._call("get", lambda: self.client.mget(keys), [None] * len(keys))

    def set(self, key: str, value: bytes, ttl: float) -> None:
        self._call("set", lambda: self.client.set(key, value, px=int(ttl * 1000)), None)

    def lookup(self, key: str, customer_id: str) -> tuple[bytes | None, bytes]:
        owed = self.owed.holds(customer_id)  # read first: the call below may send it
        raw, generation = self.get_many([key, generation_key(customer_id)])
        # No token, no trusted entry (see the class docstring); nor while the customer's invalidation is owed.
        trusted = generation and not owed
        return (current_fragment(raw, generation) if trusted else None), generation or NO_GENERATION

    def claim(self, key: str, customer_id: str) -> tuple[bool, bytes | None, bytes | None]:
        token_key = generation_key(customer_id)

        def lock_and_look() -> list:  # one round trip: the entry may have arrived since our lookup
            pipe = self.client.pipeline(transaction=False)
            pipe.set(lock_key(key), b"1", nx=True, px=LOCK_TTL_MS)
            pipe.set(token_key, new_generation(), nx=True, px=int(self.generation_ttl * 1000))
            pipe.mget([key, token_key])
            return pipe.execute()

        owed = self.owed.holds(customer_id)  # read first: the call below may send it
        result = self._call("lock", lock_and_look, UNREACHABLE)
        if result is UNREACHABLE:
            return True, None, None  # compute here rather than wait for a lock nobody can hold
        taken, _created, (raw, generation) = result
        fragment = current_fragment(raw, generation) if generation and not owed else None
        if taken and fragment is not None:
            self._call("unlock", lambda: self.client.delete(lock_key(key)), None)
        return bool(taken), fragment, generation or NO_GENERATION

    def release(self, key: str, generation: bytes, fragment: bytes | None, ttl: float | None, locked: bool) -> None:
        def store_and_unlock() -> None:  # one round trip
            pipe = self.client.pipeline(transaction=False)
            # Without a token (Redis unreadable at claim) the entry could never be read: not stored.
            if fragment is not None and generation and self.storable(fragment):
                pipe.set(key, encode_entry(generation, fragment), px=int((ttl or self.ttl) * 1000))
            if locked:
                pipe.delete(lock_key(key))
            pipe.execute()

        self._call("set", store_and_unlock, None)

    def status(self) -> dict:
        return {"kind": self.kind, "breaker": self.breaker.state, "write_breaker": self.write_breaker.state,
                "owed_invalidations": len(self.owed)}


def make_cache(settings: Settings) -> Cache:
    """Redis when RECSVC_REDIS_URL is set, otherwise the embedded cache (shared by the workers forked after)."""
    if not settings.redis_url:
        return make_local_cache(settings)
    options = {"ttl": settings.cache_ttl, "max_entry_bytes": settings.cache_max_entry_bytes,
               "lock_wait": settings.cache_lock_wait}
    breaker = CircuitBreaker(settings.redis_breaker_failures, settings.redis_breaker_cooldown)
    return RedisCache(settings.redis_url, settings.redis_timeout, breaker, **options)


def make_local_cache(settings: Settings) -> LocalCache:
    """The embedded cache's shared table: the cache itself without Redis; with Redis, the table where every
    worker keeps the customers' recent items (recsvc.event_log.RecentItems), readable while Redis is not."""
    return LocalCache(settings.local_cache_entries, settings.local_cache_bytes, ttl=settings.cache_ttl,
                      max_entry_bytes=settings.cache_max_entry_bytes, lock_wait=settings.cache_lock_wait)
