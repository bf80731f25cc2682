"""Cache warm-up: the default suggestions of the most active customers, precomputed into Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import redis

from recsvc import artifacts
from recsvc.artifacts import ModelBundle
from recsvc.cache import (GENERATION_TTL, NO_GENERATION, encode_entry, generation_key, recent_items_key,
                          recommendation_keys)
from recsvc.config import Settings
from recsvc.errors import InvalidInput, RecsvcError
from recsvc.event_log import RecentItems
from training.warm_batch import DEFAULT_QUERY, BatchRecommender

DEFAULT_TOP = 10_000
# A nightly warm-up must last until the next model: keys carry the version and events invalidate a
# customer's entries, so a long TTL never serves a stale list.
DEFAULT_TTL = 24 * 3600.0
MAX_TTL = GENERATION_TTL / 2  # a customer's invalidation must outlive the entries it hides
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
    compute_seconds: float
    write_seconds: float

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.write_seconds

    def summary(self) -> str:
        rate = self.entries / self.seconds if self.seconds else 0.0
        write_rate = self.entries / self.write_seconds if self.write_seconds else 0.0
        return (f"warmed {self.entries} entries ({self.version}, {self.strategy}) in {self.seconds:.2f}s: "
                f"{rate:,.0f} entries/s end to end, {write_rate:,.0f} entries/s written")


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
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    except ValueError as exc:
        raise InvalidInput(f"--redis-url {redis_url!r} is not a Redis URL: {exc}") from None
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CacheUnavailable(f"cannot reach Redis at {redis_url}: {exc}") from None
    return client


def load_bundle(registry: Path) -> ModelBundle:
    # Plain arrays, not memory maps: the warm-up reads every customer, and memmap indexing is slower.
    bundle = artifacts.load_current(registry, mmap=False)
    if bundle is None:
        raise InvalidInput(f"the registry {registry} has no current model version; train one with `recsvc-train fit`")
    return bundle


def warm_cache(registry: Path, redis_url: str, top: int = DEFAULT_TOP, ttl: float = DEFAULT_TTL,
               log: Callable[[str], None] = print) -> WarmResult:
    """Write the default suggestions (what GET .../recommendations caches) of the `top` most active customers.

    Entries are byte-identical to the server's: the same ranking (recsvc.ranking), reasons and
    encoding, computed for a batch of customers at once (training/warm_batch.py), and the same
    codec tags them with each customer's current generation.
    """
    if top < 1:
        raise InvalidInput("--top must be at least 1")
    if not 1 <= ttl <= MAX_TTL:
        raise InvalidInput(f"--ttl must be between 1 and {MAX_TTL:g} seconds")
    client = connect(redis_url)
    bundle = load_bundle(Path(registry))
    max_bytes = Settings.from_env().cache_max_entry_bytes  # the servers' bound (RECSVC_CACHE_MAX_ENTRY_BYTES)
    strategy = bundle.default_strategy
    lists = BatchRecommender(bundle, strategy)
    customers = most_active(bundle, top)
    customer_ids = [c.decode("utf-8") for c in bundle.customers.ids[customers].tolist()]
    keys = recommendation_keys(bundle.version, strategy, customer_ids, DEFAULT_QUERY.cache_params())
    result = WarmResult(bundle.version, strategy, 0, 0.0, 0.0)
    with RedisWriter(client, ttl) as writer:
        for start in range(0, len(customers), BATCH):
            batch = slice(start, start + BATCH)
            t0 = time.perf_counter()
            generations, recent = writer.customer_state(customer_ids[batch])
            fragments = lists.fragments(customers[batch], customer_ids[batch], recent)
            entries = [(key, generation, fragment) for key, generation, fragment
                       in zip(keys[batch], generations, fragments) if len(fragment) <= max_bytes]
            t1 = time.perf_counter()
            writer.write(entries)
            result.compute_seconds += t1 - t0
            result.write_seconds += time.perf_counter() - t1
            result.entries += len(entries)
            log(f"warm-up: {min(start + BATCH, len(customers))}/{len(customers)} customers")
    return result


class RedisWriter:
    """A Redis connection of the warm-up's own, fed pre-encoded commands; replies are checked in bulk."""

    def __init__(self, client: redis.Redis, ttl: float):
        self.client = client
        self.px = b"%d" % int(ttl * 1000)
        self.recent_script = client.register_script(_RECENT_ITEMS)
        self.connection = client.connection_pool.make_connection()

    def __enter__(self) -> "RedisWriter":
        return self

    def __exit__(self, *_exc) -> None:
        self.connection.disconnect()

    def customer_state(self, customer_ids: list[str]) -> tuple[list[bytes], PrefetchedRecentItems]:
        """(generations, recent items) of the customers, in one round trip. The generations are read first:
        POST /v1/events adds recent items before it changes the generation, so an entry computed with
        recent items older than its generation cannot be (it would be served when it is stale)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.mget([generation_key(customer) for customer in customer_ids])
        self.recent_script(keys=[recent_items_key(customer) for customer in customer_ids], client=pipe)
        try:
            generations, found = pipe.execute()
        except redis.RedisError as exc:
            raise CacheUnavailable(f"reading customers' generations and recent items from Redis failed: {exc}") from None
        recent = PrefetchedRecentItems({customer_ids[int(index) - 1]: {m.decode("utf-8") for m in members}
                                        for index, members in zip(found[::2], found[1::2])})
        return [generation or NO_GENERATION for generation in generations], recent

    def write(self, entries: list[tuple[str, bytes, bytes]]) -> None:
        """SET each (key, generation, fragment) with the TTL, all sent at once; every reply must be +OK."""
        if not entries:
            return
        px = self.px
        payload = b"".join(b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b%b\r\n$2\r\nPX\r\n$%d\r\n%b\r\n"
                           % (len(key_bytes), key_bytes, len(tag) + len(fragment), tag, fragment, len(px), px)
                           for key_bytes, tag, fragment in ((key.encode(), encode_entry(generation, b""), fragment)
                                                             for key, generation, fragment in entries))
        try:
            self.connection.send_packed_command([payload])
            self._expect_ok(len(entries))
        except (redis.RedisError, OSError) as exc:
            self.connection.disconnect()  # unread replies would be taken for the next command's
            raise CacheUnavailable(f"writing to Redis failed: {exc}") from None

    def _expect_ok(self, replies: int) -> None:
        """Read the replies as bytes, not one parsed reply at a time: n SETs that all succeeded answer
        exactly n times +OK; anything else holds an error reply (at least as long), which is reported."""
        expected = b"+OK\r\n" * replies
        received = bytearray()
        sock = self.connection._sock  # redis-py's socket of this connection: AUTH, SELECT and TLS already done
        while len(received) < len(expected):
            chunk = sock.recv(max(65536, len(expected) - len(received)))
            if not chunk:
                raise redis.ConnectionError("Redis closed the connection")
            received += chunk
        if received != expected:
            error = next((line for line in bytes(received).split(b"\r\n") if line.startswith(b"-")), bytes(received[:80]))
            raise redis.ResponseError(error.decode("utf-8", "replace").lstrip("-"))


# KEYS: the customers' recent-items sets. Returns index (1-based), members, ... for the non-empty ones only:
# most customers have none, and one script call replaces a round trip (or a parsed reply) per customer.
_RECENT_ITEMS = """
local found = {}
for i, key in ipairs(KEYS) do
  local members = redis.call('SMEMBERS', key)
  if #members > 0 then
    found[#found + 1] = i
    found[#found + 1] = members
  end
end
return found
"""
