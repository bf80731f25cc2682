"""A fixed-size table of byte values in shared memory, read and written by every process forked after it was made.

The embedded cache (recsvc.cache.LocalCache) keeps its lists and generations in
two of these, so all gunicorn workers of one server share one copy: the master
creates the mapping while preloading the app, and the workers inherit it.

Layout. The table is `sets` sets of `ways` slots of `slot` bytes; a key (a
128-bit digest) lives in the set its digest names, and an entry takes one or
more consecutive slots of that set (a 10-item list one 512-byte slot, a
100-item list a few). Each set starts with a header:

    seq u64 | hcrc u32 | pad | epoch u64 | entries u16 | used u16 | pad | digests 16*ways | spans ways | stamps u32*ways

`digests[i]` is the digest of the entry starting at slot i (zero: none) and
`spans[i]` its number of slots; `stamps[i]` is when it was last read (racy on
purpose: it only steers eviction, and is outside every checksum). An entry's
first slot holds its digest, expiry, length, flags and a crc32, then its value.

Concurrency. Writers of one set exclude each other with a thread lock and a
POSIX record lock on one byte of the backing file (the kernel drops it when its
holder dies). Readers take no lock: a writer makes `seq` odd, writes, and makes
it even again; a reader whose snapshot saw an odd or changed `seq`, a header
whose crc32 does not match, or an entry whose digest or crc32 does not match,
retries a few times and then reports the set unreadable, which callers treat as
a miss. A writer that died mid-write leaves `seq` odd: the next writer (or
repair()) clears the set and draws a new epoch.

Epoch. Each set has an epoch (0 in a new table) that changes, to a random value, whenever the set loses an
entry it did not mean to lose: an eviction (when the table is made with
`evictions_change_epoch`), a repair after a crash or corruption. A caller that
stores generations here reads "absent, epoch E" and can tell that apart from an
absence in an earlier epoch (recsvc.cache.LocalCache.generation).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import struct
import tempfile
import threading
import weakref
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import blake2b

import numpy as np

FOUND, ABSENT, UNREADABLE = "found", "absent", "unreadable"
READ_TRIES = 3  # snapshots a reader takes before calling the set unreadable (a writer holds it for microseconds)
DIGEST_BYTES = 16
SEQ = struct.Struct("<Q")
META = struct.Struct("<I4xQHH4x")  # at offset 8: hcrc, epoch, entries, used
HEADER_CHECK = struct.Struct("<I4xQ")  # at offset 8: hcrc, epoch
HEAD = struct.Struct("<16sdIB3xI4x")  # digest, expires (monotonic seconds), length, flags, crc32
STAMP = struct.Struct("<I")
CHECKED_FROM = 16  # the header's crc32 covers [16, stamps): epoch, counts, digests, spans
EMPTY = bytes(DIGEST_BYTES)
THREAD_LOCKS = 64  # sets share thread locks by stripes; the record locks are one per set


def digest(key: str) -> bytes:
    """A key's 128-bit digest, never all zeros (zeros mark a free slot)."""
    value = blake2b(key.encode(), digest_size=DIGEST_BYTES).digest()
    return value if value != EMPTY else b"\x01" * DIGEST_BYTES


def _stamp(now: float) -> int:
    return int(now * 1000) & 0xFFFFFFFF  # milliseconds; wraps every 49 days, which only misleads one eviction


@dataclass(frozen=True)
class Geometry:
    """The shape of one table: `sets` x `ways` slots of `slot` bytes."""

    sets: int
    ways: int
    slot: int

    @property
    def header(self) -> int:
        return -(-(32 + 21 * self.ways) // 64) * 64

    @property
    def set_bytes(self) -> int:
        return self.header + self.ways * self.slot

    @property
    def bytes(self) -> int:
        return self.sets * self.set_bytes

    @property
    def capacity(self) -> int:
        """The largest value one entry can hold (all the slots of a set), in bytes."""
        return self.ways * self.slot - HEAD.size


class SharedMemory:
    """An anonymous shared mapping with a file descriptor for record locks (a memfd named recsvc-cache, so
    /proc/<pid>/smaps names it; an unlinked temporary file where memfd_create is missing)."""

    NAME = "recsvc-cache"

    def __init__(self, size: int):
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create(self.NAME, os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            fd, path = tempfile.mkstemp(prefix=self.NAME + "-")
            os.unlink(path)
            self.fd = fd
        weakref.finalize(self, os.close, self.fd)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.size = size


class SlotTable:
    """One table in a shared mapping, from byte `offset` on. See the module docstring for the layout."""

    def __init__(self, memory: SharedMemory, offset: int, geometry: Geometry, evictions_change_epoch: bool = False):
        self.memory, self.map, self.offset, self.geometry = memory, memory.map, offset, geometry
        self.sets, self.ways, self.slot = geometry.sets, geometry.ways, geometry.slot
        self.header, self.set_bytes = geometry.header, geometry.set_bytes
        self.spans_at = 32 + DIGEST_BYTES * self.ways
        self.stamps_at = self.spans_at + self.ways
        self.evictions_change_epoch = evictions_change_epoch
        self._thread_locks = [threading.Lock() for _ in range(min(self.sets, THREAD_LOCKS))]
        # The expiry in each slot's entry head (HEAD: after the digest), and the stamps, for _place.
        self._expiries = struct.Struct("<" + f"{DIGEST_BYTES}xd{self.slot - DIGEST_BYTES - 8}x" * (self.ways - 1)
                                       + f"{DIGEST_BYTES}xd")
        self._stamps = struct.Struct(f"<{self.ways}I")
        # Stored checksums are crc32 ^ the crc32 of an all-zero header, so the zero-filled new mapping is a valid
        # table of empty sets in epoch 0, and no page of it is touched before an entry goes there.
        self._zero_crc = zlib.crc32(bytes(self.stamps_at - CHECKED_FROM))

    def _header_crc(self, header: bytes) -> int:
        return zlib.crc32(header[CHECKED_FROM:self.stamps_at]) ^ self._zero_crc

    # --- reading ------------------------------------------------------------------------------------------

    def read(self, key_digest: bytes, now: float, honour_expiry: bool = True) -> tuple[str, tuple | None, int]:
        """(FOUND, (value, flags), epoch), (ABSENT, None, epoch) or (UNREADABLE, None, 0); `now` in monotonic
        seconds. An expired entry is ABSENT unless honour_expiry is False. The hit path of every cached answer:
        kept to a few slices of the mapping and two crc32s."""
        base = self.offset + int.from_bytes(key_digest[:8], "little") % self.sets * self.set_bytes
        mm, spans_at, stamps_at = self.map, self.spans_at, self.stamps_at
        for _ in range(READ_TRIES):
            header = mm[base:base + self.header]
            if header[0] & 1:
                continue
            hcrc, epoch = HEADER_CHECK.unpack_from(header, 8)
            way = self._find(header, key_digest)
            if way < 0:  # an absence (and the epoch with it) is only as good as the header: check it all
                intact = zlib.crc32(header[CHECKED_FROM:stamps_at]) ^ self._zero_crc == hcrc
                if intact and mm[base:base + 8] == header[:8]:
                    return ABSENT, None, epoch
                continue
            # A hit needs no header checksum: the entry's own digest and crc32, and the unchanged seq, vouch for it.
            entry = self._read_entry(base, way, header[spans_at + way], key_digest)
            if entry is None or mm[base:base + 8] != header[:8]:
                continue
            value, flags, expires = entry
            if honour_expiry and expires < now:
                return ABSENT, None, epoch
            stamp = STAMP.pack(_stamp(now))
            at = stamps_at + 4 * way
            if header[at:at + 4] != stamp:
                mm[base + at:base + at + 4] = stamp
            return FOUND, (value, flags), epoch
        return UNREADABLE, None, 0

    def _read_entry(self, base: int, way: int, span: int, key_digest: bytes) -> tuple[bytes, int, float] | None:
        """(value, flags, expires) of the entry at `way`, or None when it is torn or not this key's."""
        start = base + self.header + way * self.slot
        head = self.map[start:start + HEAD.size]
        found, expires, length, flags, crc = HEAD.unpack(head)
        if found != key_digest or length > span * self.slot - HEAD.size:
            return None
        value = self.map[start + HEAD.size:start + HEAD.size + length]
        if zlib.crc32(value, zlib.crc32(head[:32])) != crc:
            return None
        return value, flags, expires

    def _find(self, header: bytes, key_digest: bytes) -> int:
        position = header.find(key_digest, 32, self.spans_at)
        while position >= 0 and (position - 32) % DIGEST_BYTES:
            position = header.find(key_digest, position + 1, self.spans_at)
        return -1 if position < 0 else (position - 32) // DIGEST_BYTES

    # --- writing ------------------------------------------------------------------------------------------

    def write(self, key_digest: bytes, value: bytes, flags: int, expires: float, now: float) -> bool:
        """Store `value` under the digest until `expires` (monotonic seconds), evicting what it must;
        False when the value is larger than a set."""
        index = self._set_of(key_digest)
        with self._locked(index):
            return self._store(index, key_digest, value, flags, expires, now)

    def update(self, key_digest: bytes, change, expires: float, now: float) -> bool:
        """Read-modify-write of one entry under its set's lock: `change` takes the current value (None when
        absent, expired or unreadable) and returns the new one, so two processes updating the same key at once
        cannot lose either change. False when the new value is larger than a set."""
        index = self._set_of(key_digest)
        with self._locked(index):
            state, entry, _epoch = self.read(key_digest, now)
            return self._store(index, key_digest, change(entry[0] if state == FOUND else None), 0, expires, now)

    def _store(self, index: int, key_digest: bytes, value: bytes, flags: int, expires: float, now: float) -> bool:
        """write() under the set's lock."""
        span = -(-(HEAD.size + len(value)) // self.slot)
        if span > self.ways:
            return False
        base = self._base(index)
        header, epoch = self._open(base)
        own = self._find(header, key_digest)
        if own >= 0:
            self._drop(header, own)
        start, victims = self._place(base, header, span, now)
        for way in victims:
            self._drop(header, way)
        if victims and self.evictions_change_epoch:
            epoch = self._new_epoch()
        self._begin(base, index)
        head = HEAD.pack(key_digest, expires, len(value), flags, 0)
        crc = zlib.crc32(value, zlib.crc32(head[:32]))
        at = base + self.header + start * self.slot
        self.map[at:at + HEAD.size + len(value)] = HEAD.pack(key_digest, expires, len(value), flags, crc) + value
        header[32 + DIGEST_BYTES * start:32 + DIGEST_BYTES * (start + 1)] = key_digest
        header[self.spans_at + start] = span
        entries, used = struct.unpack_from("<HH", header, 24)
        struct.pack_into("<HH", header, 24, entries + 1, used + span)
        STAMP.pack_into(self.map, base + self.stamps_at + 4 * start, _stamp(now))
        self._commit(index, header, base, epoch)
        return True

    def repair(self, key_digest: bytes) -> None:
        """Make the key's set readable again: a set left torn by a dead writer, or with a bad header, is
        cleared; an entry of this key that fails its crc32 is dropped. Either way the epoch changes."""
        index = self._set_of(key_digest)
        base = self._base(index)
        with self._locked(index):
            header, epoch = self._open(base)
            way = self._find(header, key_digest)
            if way >= 0 and self._read_entry(base, way, header[self.spans_at + way], key_digest) is None:
                self._drop(header, way)
                epoch = self._new_epoch()
            self._begin(base, index)
            self._commit(index, header, base, epoch)

    def _open(self, base: int) -> tuple[bytearray, int]:
        """The set's header and epoch, under its lock; a torn or corrupt header comes back cleared, new epoch."""
        header = bytearray(self.map[base:base + self.header])
        hcrc, epoch, _, _ = META.unpack_from(header, 8)
        if header[0] & 1 or self._header_crc(header) != hcrc:
            seq = SEQ.unpack_from(header)[0]
            header = bytearray(self.header)
            SEQ.pack_into(header, 0, seq)
            epoch = self._new_epoch()
        return header, epoch

    def _place(self, base: int, header: bytearray, span: int, now: float) -> tuple[int, list[int]]:
        """Where an entry of `span` slots goes, and the entries it evicts: free or expired slots first,
        else the run whose most recently read victim was read longest ago (LRU), fewest victims on a tie."""
        owner = [-1] * self.ways
        for way, width in enumerate(header[self.spans_at:self.spans_at + self.ways]):
            if width:
                owner[way:way + width] = [way] * width
        # A run of free slots costs nothing (no victim beats it), so the first one is the answer, found without
        # reading any entry: every write while the table fills up, and most writes after.
        run = 0
        for way, holder in enumerate(owner):
            run = run + 1 if holder < 0 else 0
            if run == span:
                return way + 1 - span, []
        # Every slot's expiry field and last-read stamp in two reads (those of slots no entry starts at are unused).
        expiries = self._expiries.unpack_from(self.map, base + self.header)
        stamps = self._stamps.unpack_from(self.map, base + self.stamps_at)
        # head way -> (last read, expires) of each entry that has not expired; last read, then expiry: of two read
        # in the same millisecond, the older
        live = {way: (stamps[way], expiries[way]) for way in sorted(set(owner) - {-1}) if expiries[way] >= now}
        if span == 1:  # one victim wherever it goes: the first way of the lowest cost, as the loop below finds it
            start = min(range(self.ways), key=lambda way: (live[owner[way]], 1) if owner[way] in live
                        else ((-1, 0.0), 0))
            return start, [owner[start]]
        best = None
        for start in range(self.ways - span + 1):
            victims = sorted({owner[w] for w in range(start, start + span) if owner[w] >= 0})
            alive = [live[v] for v in victims if v in live]
            cost = (max(alive, default=(-1, 0.0)), len(alive), len(victims))
            if best is None or cost < best[0]:
                best = (cost, start, victims)
        return best[1], best[2]

    def _drop(self, header: bytearray, way: int) -> None:
        span = header[self.spans_at + way]
        header[32 + DIGEST_BYTES * way:32 + DIGEST_BYTES * (way + 1)] = EMPTY
        header[self.spans_at + way] = 0
        entries, used = struct.unpack_from("<HH", header, 24)
        struct.pack_into("<HH", header, 24, entries - 1, used - span)

    def _begin(self, base: int, index: int) -> None:
        seq = SEQ.unpack_from(self.map, base)[0]
        SEQ.pack_into(self.map, base, seq + 1 if seq % 2 == 0 else seq + 2)  # odd: readers keep off

    def _commit(self, index: int, header: bytearray, base: int, epoch: int) -> None:
        """Write the header (epoch and checksum included) and make seq even again."""
        struct.pack_into("<Q", header, 16, epoch)
        struct.pack_into("<I", header, 8, self._header_crc(header))
        self.map[base + 8:base + self.stamps_at] = header[8:self.stamps_at]
        seq = SEQ.unpack_from(self.map, base)[0]
        SEQ.pack_into(self.map, base, seq + 1 if seq % 2 else seq + 2)

    @contextmanager
    def _locked(self, index: int):
        with self._thread_locks[index % len(self._thread_locks)]:
            at = self.offset + index * self.set_bytes
            fcntl.lockf(self.memory.fd, fcntl.LOCK_EX, 1, at)
            try:
                yield
            finally:
                fcntl.lockf(self.memory.fd, fcntl.LOCK_UN, 1, at)

    # --- bookkeeping --------------------------------------------------------------------------------------

    def _set_of(self, key_digest: bytes) -> int:
        return int.from_bytes(key_digest[:8], "little") % self.sets

    def _base(self, index: int) -> int:
        return self.offset + index * self.set_bytes

    @staticmethod
    def _new_epoch() -> int:
        return secrets.randbits(64) or 1

    def usage(self) -> tuple[int, int]:
        """(entries, bytes of the slots they take) over the whole table; read without locks."""
        counts = np.ndarray((self.sets, 2), dtype="<u2", buffer=self.map, offset=self.offset + 24,
                            strides=(self.set_bytes, 2))
        entries, used = counts.sum(axis=0, dtype=np.int64)
        return int(entries), int(used) * self.slot


def geometry_for(max_entries: int, budget: int, slot: int, ways: int = 16) -> Geometry | None:
    """The largest table of `slot`-byte slots within `budget` bytes and `max_entries` entries (one entry a slot
    at most); fewer ways in a single set when the bounds are small; None when not even one slot fits."""
    full = Geometry(1, ways, slot)
    sets = min(budget // full.set_bytes, max_entries // ways)
    if sets >= 1:
        return Geometry(sets, ways, slot)
    for fewer in range(min(ways, max_entries), 0, -1):
        if Geometry(1, fewer, slot).set_bytes <= budget:
            return Geometry(1, fewer, slot)
    return None



class SharedIdSet:
    """A bounded set of ids (customer ids) in shared memory, seen by every process forked after it was made.

    For the Redis cache's owed invalidations (recsvc.cache.RedisCache): any worker adds a customer whose
    invalidation Redis did not take, every worker asks holds() before trusting a Redis entry, and whichever
    worker reaches Redis again sends them all and clears the set; so a worker that dies owes nothing.

    Layout: count u64 | bytes used u64 | pad to 64 | one flag byte per bucket | ids, each followed by NUL.
    holds() costs one 8-byte read while the set is empty (nearly always) and a crc32 and one byte otherwise;
    it has no false negatives, and a false positive (another id of a held id's bucket) only costs a miss.
    Writers hold a thread lock and a POSIX record lock on byte 0 (the kernel drops it when its holder dies).
    """

    COUNTS = struct.Struct("<QQ")
    BUCKETS_AT = 64

    def __init__(self, capacity_bytes: int = 2 * 2**20, buckets: int = 2**16):
        self.buckets = buckets
        self.ids_at = self.BUCKETS_AT + buckets
        self.capacity = capacity_bytes
        self.memory = SharedMemory(self.ids_at + 1 + capacity_bytes)  # a NUL before the first id
        self.map = self.memory.map
        self._thread_lock = threading.Lock()

    def __len__(self) -> int:
        return self.COUNTS.unpack_from(self.map, 0)[0]

    def holds(self, value: str) -> bool:
        """Might `value` be in the set? Never False for a value that is."""
        if not self.COUNTS.unpack_from(self.map, 0)[0]:
            return False
        return self.map[self.BUCKETS_AT + self._bucket(value.encode())] != 0

    def add(self, value: str) -> bool:
        """Add `value` (no NUL in it); False when the set is full."""
        raw = value.encode()
        with self._locked(blocking=True):
            count, used = self.COUNTS.unpack_from(self.map, 0)
            bucket = self.BUCKETS_AT + self._bucket(raw)
            if (count and self.map[bucket]
                    and self.map.find(b"\0" + raw + b"\0", self.ids_at, self.ids_at + 1 + used) >= 0):
                return True
            if used + len(raw) + 1 > self.capacity:
                return False
            start = self.ids_at + 1 + used
            self.map[start:start + len(raw) + 1] = raw + b"\0"
            self.map[bucket] = 1  # before the count: a reader that sees the count sees the flag
            self.COUNTS.pack_into(self.map, 0, count + 1, used + len(raw) + 1)
            return True

    @contextmanager
    def draining(self):
        """Yields every id held (a list), or None when another thread or process is draining the set now.
        The caller sends them and then calls clear(); ids cannot be added meanwhile (they wait for the lock)."""
        with self._locked(blocking=False) as locked:
            if not locked:
                yield None
                return
            _count, used = self.COUNTS.unpack_from(self.map, 0)
            held = self.map[self.ids_at + 1:self.ids_at + 1 + used].split(b"\0")[:-1]
            yield [value.decode() for value in held]

    def clear(self) -> None:
        """Empty the set; only inside draining()."""
        self.COUNTS.pack_into(self.map, 0, 0, 0)  # the count first: from now on holds() reads nothing else
        self.map[self.BUCKETS_AT:self.ids_at] = bytes(self.buckets)

    def _bucket(self, raw: bytes) -> int:
        return zlib.crc32(raw) % self.buckets

    @contextmanager
    def _locked(self, blocking: bool):
        if not self._thread_lock.acquire(blocking):
            yield False
            return
        try:
            try:
                fcntl.lockf(self.memory.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB), 1, 0)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.lockf(self.memory.fd, fcntl.LOCK_UN, 1, 0)
        finally:
            self._thread_lock.release()
