"""Recommendation cache: the one key builder, and a Redis or in-process store behind one small interface.

Keys name the model version, so an entry made under an old model is never read
after a swap: the new version simply looks up different keys, and old entries
expire with their TTL.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict

import orjson
import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "recsvc:v1"


def params_digest(params: dict) -> str:
    """A short stable digest of request parameters (key order and list order inside do not matter)."""
    canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def recommendation_key(model_version: str, strategy: str, customer_id: str, params: dict) -> str:
    """The cache key of one recommendation list."""
    return f"{KEY_PREFIX}:rec:{model_version}:{strategy}:{customer_id}:{params_digest(params)}"


class Cache(ABC):
    """Bytes by key with a TTL. Failures never raise: a broken cache is a miss, not an error."""

    kind: str

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def set(self, key: str, value: bytes, ttl: float) -> None: ...

    def healthy(self) -> bool:
        return True


class LocalCache(Cache):
    """Bounded in-process LRU with per-entry expiry; each worker has its own."""

    kind = "local"

    def __init__(self, max_entries: int = 10_000):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, value = entry
            if expires < time.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def set(self, key: str, value: bytes, ttl: float) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = (time.monotonic() + ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


class RedisCache(Cache):
    """Redis with short timeouts; any Redis error is logged and treated as a miss."""

    kind = "redis"

    def __init__(self, url: str, timeout: float = 0.05):
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           health_check_interval=0)

    def _failed(self, action: str, exc: Exception) -> None:
        log.warning("redis %s failed: %s", action, exc.__class__.__name__)

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get(key)
        except redis.RedisError as exc:
            self._failed("get", exc)
            return None

    def set(self, key: str, value: bytes, ttl: float) -> None:
        try:
            self.client.set(key, value, px=int(ttl * 1000))
        except redis.RedisError as exc:
            self._failed("set", exc)

    def healthy(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False


def make_cache(redis_url: str | None, timeout: float, local_entries: int) -> Cache:
    return RedisCache(redis_url, timeout) if redis_url else LocalCache(local_entries)
