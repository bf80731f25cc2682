"""Cache warm-up: the default suggestions of the most active customers, precomputed into Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import orjson
import redis

from recsvc import artifacts
from recsvc.artifacts import ModelBundle
from recsvc.cache import (GENERATION_TTL, NO_GENERATION, encode_entry, generation_key, recent_items_key,
                          recommendation_key)
from recsvc.config import Settings
from recsvc.errors import InvalidInput, RecsvcError
from recsvc.event_log import RecentItems
from recsvc.model_store import ModelStore
from recsvc.recommend import RecommendationQuery, Recommender

DEFAULT_TOP = 10_000
# A nightly warm-up must last until the next model: keys carry the version and events invalidate a
# customer's entries, so a long TTL never serves a stale list.
DEFAULT_TTL = 24 * 3600.0
MAX_TTL = GENERATION_TTL / 2  # a customer's invalidation must outlive the entries it hides
BATCH = 1000  # customers per Redis round trip
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
    """The server's recent items (POST /v1/events), read for a whole batch in one round trip, not one per customer."""

    def __init__(self, redis_url: str):
        super().__init__(redis_url, timeout=TIMEOUT)
        self.items: dict[str, set[str]] = {}

    def prefetch(self, customers: list[str]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for customer in customers:
            pipe.smembers(recent_items_key(customer))
        try:
            found = pipe.execute()
        except redis.RedisError as exc:
            raise CacheUnavailable(f"reading recent items from Redis failed: {exc}") from None
        self.items = {customer: {m.decode("utf-8") for m in members} for customer, members in zip(customers, found)}

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

    Entries are byte-identical to the server's: the same Recommender computes them
    and the same codec tags them with each customer's current generation.
    """
    if top < 1:
        raise InvalidInput("--top must be at least 1")
    if not 1 <= ttl <= MAX_TTL:
        raise InvalidInput(f"--ttl must be between 1 and {MAX_TTL:g} seconds")
    client = connect(redis_url)
    bundle = load_bundle(Path(registry))
    max_bytes = Settings.from_env().cache_max_entry_bytes  # the servers' bound (RECSVC_CACHE_MAX_ENTRY_BYTES)
    # The server's recent items too (POST /v1/events): they count as owned, so they change the list.
    recent = PrefetchedRecentItems(redis_url)
    recommender = Recommender(ModelStore(Path(registry)), cache=None, cache_ttl=ttl, recent_items=recent)
    strategy = bundle.default_strategy
    customers = [bundle.customers.external(int(c)) for c in most_active(bundle, top)]
    result = WarmResult(bundle.version, strategy, 0, 0.0, 0.0)
    for start in range(0, len(customers), BATCH):
        t0 = time.perf_counter()
        recent.prefetch(customers[start:start + BATCH])
        entries = [_entry(recommender, bundle, strategy, customer) for customer in customers[start:start + BATCH]]
        entries = [(key, customer, fragment) for key, customer, fragment in entries if len(fragment) <= max_bytes]
        t1 = time.perf_counter()
        _write(client, entries, ttl)
        result.compute_seconds += t1 - t0
        result.write_seconds += time.perf_counter() - t1
        result.entries += len(entries)
        log(f"warm-up: {result.entries}/{len(customers)} customers")
    return result


def _entry(recommender: Recommender, bundle: ModelBundle, strategy: str, customer: str) -> tuple[str, str, bytes]:
    """(key, customer, fragment) exactly as Recommender.recommend builds them for the default request."""
    query = RecommendationQuery(customer_id=customer)
    key = recommendation_key(bundle.version, strategy, customer, query.cache_params())
    return key, customer, orjson.dumps(recommender.compute(bundle, strategy, query))


def _write(client: redis.Redis, entries: list[tuple[str, str, bytes]], ttl: float) -> None:
    """Two round trips per batch: the customers' generations, then every SET pipelined in one send."""
    px = b"%d" % int(ttl * 1000)
    try:
        generations = client.mget([generation_key(customer) for _key, customer, _fragment in entries])
        payload = b"".join(_command(b"SET", key.encode(), encode_entry(generation or NO_GENERATION, fragment),
                                    b"PX", px)
                           for (key, _customer, fragment), generation in zip(entries, generations))
        _pipeline(client, payload, len(entries))
    except redis.RedisError as exc:
        raise CacheUnavailable(f"writing to Redis failed: {exc}") from None


def _command(*parts: bytes) -> bytes:
    """One command in the Redis protocol. redis-py's pipeline encodes each command in Python at about a
    third of this speed, which made the writes, not Redis, the warm-up's limit."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _pipeline(client: redis.Redis, payload: bytes, replies: int) -> None:
    """Send the encoded commands at once, then read every reply (an error reply raises)."""
    connection = client.connection_pool.get_connection()
    try:
        connection.send_packed_command([payload])
        for _ in range(replies):
            connection.read_response()
    except BaseException:
        connection.disconnect()  # unread replies would be taken for the next command's
        raise
    finally:
        client.connection_pool.release(connection)
