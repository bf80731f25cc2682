"""The embedded cache's shared-memory table (recsvc/shared_table.py) and LocalCache on top of it: hits, misses,
expiry, eviction, oversize, torn and corrupt bytes, generations that survive eviction, and processes sharing it."""

from __future__ import annotations

import os
import time
import zlib

import orjson
import pytest

from recsvc import shared_table
from recsvc.cache import NO_GENERATION, LocalCache, encode_entry, generation_key
from recsvc.shared_table import ABSENT, FOUND, UNREADABLE, Geometry, SharedMemory, SlotTable, digest

LIST = orjson.dumps({"items": [{"item_id": f"I{i:06d}", "score": 0.5, "reasons": ["Because the customer has X"]}
                               for i in range(10)]})


def table(sets: int = 1, ways: int = 4, slot: int = 512, **options) -> SlotTable:
    geometry = Geometry(sets, ways, slot)
    return SlotTable(SharedMemory(geometry.bytes), 0, geometry, **options)


def read_value(cache_table: SlotTable, key: str, now: float = 0.0):
    state, entry, _epoch = cache_table.read(digest(key), now)
    return entry[0] if state == FOUND else state


def test_a_written_value_is_a_hit_and_other_keys_are_misses():
    slots = table()
    assert slots.write(digest("a"), b"alpha", 0, expires=100.0, now=0.0)
    assert read_value(slots, "a") == b"alpha"
    assert read_value(slots, "b") == ABSENT
    assert slots.write(digest("a"), b"again", 0, expires=100.0, now=0.0)  # replaced in place, not added
    assert read_value(slots, "a") == b"again" and slots.usage() == (1, 512)


def test_an_expired_entry_is_a_miss_and_its_slot_is_reused_first():
    slots = table(ways=2)
    slots.write(digest("old"), b"1", 0, expires=10.0, now=0.0)
    slots.write(digest("recent"), b"2", 0, expires=100.0, now=0.0)
    assert read_value(slots, "old", now=11.0) == ABSENT
    assert slots.read(digest("old"), 11.0, honour_expiry=False)[0] == FOUND
    slots.write(digest("new"), b"3", 0, expires=100.0, now=11.0)  # takes the expired slot, not the live one
    assert read_value(slots, "recent", now=11.0) == b"2" and read_value(slots, "new", now=11.0) == b"3"


def test_the_table_never_holds_more_than_its_slots_and_evicts_the_least_recently_read():
    slots = table(sets=2, ways=4)
    for n in range(4):
        slots.write(digest(f"k{n}"), b"v", 0, expires=100.0, now=float(n))
    keys = [f"k{n}" for n in range(4)]
    for n in range(4, 40):
        read_value(slots, "k0", now=float(n))  # k0 stays hot
        slots.write(digest(f"k{n}"), b"v", 0, expires=100.0, now=float(n))
        keys.append(f"k{n}")
    entries, used = slots.usage()
    assert entries == 8 and used == 8 * 512  # every slot full, none counted twice
    assert read_value(slots, "k0", now=40.0) == b"v"
    assert sum(read_value(slots, key, now=40.0) != ABSENT for key in keys) == 8


def test_a_long_value_takes_consecutive_slots_and_a_value_larger_than_a_set_is_refused():
    slots = table(ways=4)
    long = os.urandom(1400)  # 40 bytes of head + 1400: three 512-byte slots
    assert slots.write(digest("long"), long, 0, expires=100.0, now=0.0)
    assert slots.usage() == (1, 3 * 512) and read_value(slots, "long") == long
    assert slots.write(digest("short"), b"s", 0, expires=100.0, now=1.0)
    assert slots.write(digest("long2"), long, 0, expires=100.0, now=2.0)  # 4 slots: evicts the older entry
    assert read_value(slots, "long", now=2.0) == ABSENT and read_value(slots, "short", now=2.0) == b"s"
    assert not slots.write(digest("huge"), os.urandom(4 * 512), 0, expires=100.0, now=3.0)
    assert read_value(slots, "long2") == long


def test_local_cache_does_not_cache_a_list_larger_than_a_set_and_counts_it():
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("recsvc_cache_oversize_total") or 0.0
    cache = LocalCache()
    cache.set("recsvc:v1:rec:huge", os.urandom(16 * 512), ttl=60)  # random bytes do not compress
    assert cache.get("recsvc:v1:rec:huge") is None
    assert REGISTRY.get_sample_value("recsvc_cache_oversize_total") == before + 1


@pytest.mark.parametrize("where", ["value", "head", "digest index", "header counts"])
def test_corrupt_bytes_are_a_miss_never_a_wrong_answer(where):
    slots = table()
    slots.write(digest("a"), LIST, 0, expires=100.0, now=0.0)
    geometry = slots.geometry
    offset = {"value": geometry.header + 40 + 100, "head": geometry.header + 17,
              "digest index": 32 + 3, "header counts": 24}[where]
    slots.map[offset] ^= 0x40
    assert read_value(slots, "a") in (UNREADABLE, ABSENT, LIST)  # a miss, or the right value
    assert read_value(slots, "b") in (UNREADABLE, ABSENT)  # an absence needs the whole header intact
    assert slots.write(digest("a"), LIST, 0, expires=100.0, now=1.0)  # a writer makes the set whole again
    assert read_value(slots, "a", now=1.0) == LIST


def test_a_set_left_mid_write_is_unreadable_until_a_writer_repairs_it_with_a_new_epoch():
    slots = table(evictions_change_epoch=True)
    slots.write(digest("a"), b"token", 0, expires=100.0, now=0.0)
    epoch = slots.read(digest("a"), 0.0)[2]
    slots._begin(0, 0)  # a writer that died after making seq odd
    assert slots.read(digest("a"), 0.0) == (UNREADABLE, None, 0)
    slots.repair(digest("a"))
    state, _entry, new_epoch = slots.read(digest("a"), 0.0)
    assert state == ABSENT and new_epoch != epoch  # cleared: what it held is gone, and that shows


def test_a_writer_that_dies_holding_the_set_lock_blocks_nobody():
    slots = table()
    child = os.fork()
    if child == 0:  # take the record lock, start writing, and die without unlocking
        slots._locked(0).__enter__()
        slots._begin(0, 0)
        os._exit(0)
    os.waitpid(child, 0)
    started = time.monotonic()
    assert slots.write(digest("a"), b"after", 0, expires=100.0, now=0.0)
    assert time.monotonic() - started < 1.0 and read_value(slots, "a") == b"after"


def test_processes_forked_after_the_cache_was_made_share_its_entries_and_generations():
    cache = LocalCache()
    cache.set("recsvc:v1:rec:from-parent", b"parent", ttl=60)
    child = os.fork()
    if child == 0:
        ok = cache.get("recsvc:v1:rec:from-parent") == b"parent"
        cache.set("recsvc:v1:rec:from-child", b"child", ttl=60)
        cache.invalidate_customer("c1")
        os._exit(0 if ok else 1)
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.get("recsvc:v1:rec:from-child") == b"child"
    assert cache.generation("c1") not in (NO_GENERATION, b"")  # the child's invalidation is seen here at once


def test_local_cache_keeps_lists_compressed_in_one_slot():
    cache = LocalCache()
    cache.set("recsvc:v1:rec:k", LIST, ttl=60)
    assert len(zlib.compress(LIST, 1)) + 40 <= LocalCache.SLOT_BYTES < len(LIST)
    assert cache.get("recsvc:v1:rec:k") == LIST
    assert cache.status()["entries"] == 1 and cache.bytes == LocalCache.SLOT_BYTES


def test_the_byte_bound_is_the_size_of_the_whole_shared_table():
    for max_bytes in (64 * 1024, 8 * 2**20):
        cache = LocalCache(max_entries=10**6, max_bytes=max_bytes)
        assert max_bytes * 0.9 < cache.memory.size <= max_bytes
    assert LocalCache(max_entries=5).status()["capacity_bytes"] < 8 * 1024  # the entry bound shrinks it too
    disabled = LocalCache(max_entries=0)
    disabled.set("recsvc:v1:rec:k", b"v", ttl=60)
    assert disabled.get("recsvc:v1:rec:k") is None and disabled.lookup("recsvc:v1:rec:k", "c1") == (None, b"")


# --- generations ----------------------------------------------------------------------------------------


def small_generation_table(cache: LocalCache) -> LocalCache:
    """Squeeze the cache's generations into one set of two slots, so invalidating a third customer evicts."""
    geometry = Geometry(1, 2, LocalCache.GENERATION_SLOT_BYTES)
    cache._generations = SlotTable(SharedMemory(geometry.bytes), 0, geometry, evictions_change_epoch=True)
    return cache


def test_an_invalidation_is_not_undone_when_its_generation_is_evicted():
    cache = small_generation_table(LocalCache())
    key = "recsvc:v1:rec:v1:als:c1:abc"
    stale = b'{"items":["owned-now"]}'
    assert cache.get_or_compute(key, "c1", lambda: stale) == (stale, False)
    assert cache.get_or_compute(key, "c1", lambda: b"{}") == (stale, True)
    cache.invalidate_customer("c1")  # c1 now has the item: the cached list is stale
    cache.invalidate_customer("c2")
    cache.invalidate_customer("c3")  # evicts c1's generation (least recently read)
    assert cache._generations.read(digest(generation_key("c1")), 0.0, honour_expiry=False)[0] == ABSENT
    fresh = b'{"items":["fresh"]}'
    assert cache.get_or_compute(key, "c1", lambda: fresh) == (fresh, False)  # the stale list stays dead
    assert cache.get_or_compute(key, "c1", lambda: b"{}") == (fresh, True)


def test_a_list_computed_while_its_generation_is_invalidated_and_evicted_is_not_served():
    cache = small_generation_table(LocalCache())
    key = "recsvc:v1:rec:v1:als:c1:abc"

    def compute_during_events() -> bytes:
        for customer in ("c1", "c2", "c3"):  # c1's new generation comes and goes while its old list is scored
            cache.invalidate_customer(customer)
        return b'{"items":["stale"]}'

    assert cache.get_or_compute(key, "c1", compute_during_events) == (b'{"items":["stale"]}', False)
    assert cache.get_or_compute(key, "c1", lambda: b'{"items":["fresh"]}') == (b'{"items":["fresh"]}', False)


def test_a_corrupt_generation_is_never_read_as_no_generation():
    cache = LocalCache()
    key = "recsvc:v1:rec:v1:als:c1:abc"
    cache.set(key, encode_entry(NO_GENERATION, b'{"items":["stale"]}'), ttl=60)
    cache.invalidate_customer("c1")
    generations = cache._generations
    base = generations._base(generations._set_of(digest(generation_key("c1"))))
    header = generations.map[base:base + generations.header]
    way = generations._find(header, digest(generation_key("c1")))
    generations.map[base + generations.header + way * generations.slot + 45] ^= 0xFF  # a byte of the token
    generation = cache.generation("c1")  # repaired: dropped, and the set's epoch changed
    assert generation not in (NO_GENERATION,) and cache.lookup(key, "c1")[0] is None


def test_an_unreadable_generation_is_a_miss_that_is_not_stored(monkeypatch):
    cache = LocalCache()
    monkeypatch.setattr(SlotTable, "read", lambda *args, **kwargs: (UNREADABLE, None, 0))
    monkeypatch.setattr(SlotTable, "repair", lambda *args: None)
    assert cache.get_or_compute("recsvc:v1:rec:k", "c1", lambda: b'{"a":1}') == (b'{"a":1}', False)
    monkeypatch.undo()
    assert cache.get("recsvc:v1:rec:k") is None and cache.status()["entries"] == 0


def test_digests_are_128_bits_and_never_the_free_marker():
    assert len(digest("recsvc:v1:rec:x")) == 16 and digest("a") != digest("b")
    assert shared_table.EMPTY not in {digest(f"k{n}") for n in range(1000)}


def test_recent_items_added_by_two_processes_at_once_are_all_kept():
    cache = LocalCache(max_entries=64, max_bytes=256 * 1024)
    children = []
    for worker in range(2):  # two workers recording events of one customer at the same time
        pid = os.fork()
        if pid == 0:
            for n in range(40):
                cache.add_recent_items("c1", {f"w{worker}-i{n}"}, ttl=60)
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    assert cache.recent_items("c1") == {f"w{worker}-i{n}" for worker in range(2) for n in range(40)}
    assert cache.recent_items("c2") == set()


def test_recent_items_expire_with_their_ttl():
    cache = LocalCache(max_entries=64, max_bytes=256 * 1024)
    cache.add_recent_items("c1", {"i1"}, ttl=0.05)
    assert cache.recent_items("c1") == {"i1"}
    time.sleep(0.1)
    assert cache.recent_items("c1") == set()


def test_ids_one_process_adds_are_held_for_every_process_until_one_drains_them():
    owed = shared_table.SharedIdSet(capacity_bytes=64, buckets=1024)
    assert not owed.holds("c1") and len(owed) == 0
    child = os.fork()
    if child == 0:
        os._exit(0 if owed.add("c1") and owed.add("c1") and owed.add("customer-2") else 1)
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert owed.holds("c1") and owed.holds("customer-2") and len(owed) == 2  # added twice, held once
    assert not owed.add("x" * 64)  # beyond the capacity: refused, not truncated
    with owed.draining() as held:
        with owed.draining() as meanwhile:
            assert meanwhile is None  # one drainer at a time
        assert held == ["c1", "customer-2"]
        owed.clear()
    assert not owed.holds("c1") and len(owed) == 0 and owed.add("c3") and owed.holds("c3")
