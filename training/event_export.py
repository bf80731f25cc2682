"""The events the API kept (POST /v1/events) as an interactions file in the data contract's format."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recsvc.errors import InvalidInput, RecsvcError
from recsvc.files import replacing

# The data contract's columns, in its order, whatever an event left out: files of different days concatenate.
SCHEMA = pa.schema([("customer_id", pa.string()), ("item_id", pa.string()), ("event_type", pa.string()),
                    ("timestamp", pa.timestamp("ms", tz="UTC")), ("weight", pa.float64())])
FORMATS = {".csv.gz": "csv.gz", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}  # longest suffix first
BATCH_ROWS = 50_000  # rows converted and written at once: a long stream is never held whole


@dataclass
class ExportResult:
    path: Path
    rows: int
    repeated: int  # records whose event_id an earlier record had (a retry the log kept twice), left out

    def summary(self) -> str:
        text = f"wrote {self.rows:,} events to {self.path}"
        if self.repeated:
            text += f" ({self.repeated:,} repeated event_ids left out)"
        if not self.rows:
            text += ("; the file holds only the header, which `fit` and `nightly` refuse on its own (exit 2) "
                     "and read as no rows beside other interactions files")
        return text

    def as_dict(self) -> dict:
        """The figures of the summary: events written, repeated event_ids left out, the file."""
        return {"events": self.rows, "repeated": self.repeated, "path": str(self.path)}


def output_format(path: Path) -> str:
    """csv, csv.gz or parquet, by the name's suffix; InvalidInput for any other name."""
    name = Path(path).name.lower()
    for suffix, kind in FORMATS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return kind
    raise InvalidInput(f"--out {path}: end the name in .csv, .csv.gz or .parquet (the format follows the name)")


def export_events(read: Callable[[], Iterable[dict]], path: Path) -> ExportResult:
    """Write event records (recsvc.event_log, kind "event") to `path` as customer_id, item_id, event_type,
    timestamp (the event's own, else when the API received it; UTC, milliseconds), weight (empty: none given).

    The file appears whole or not at all (written beside it, fsync'd, renamed over): an error while reading
    the records leaves an existing file as it was. A record whose event_id came earlier is left out; a record
    without an event_id (not written by the API, which gives every event one) is never left out: nothing says
    it is a copy, and two equal interactions can both be real (a customer buying one item twice).

    `read()` returns the records, oldest first; it is called a second time only when two records may share
    an event_id. The log keeps a repeated event_id only after its dedupe window (RECSVC_EVENT_DEDUPE_TTL,
    7 days) let the first copy's marker expire, so copies are days apart: no window of recent ids would
    catch them. Instead of every id (a set of strings, ~110 bytes an event) the first pass keeps an
    8-byte hash per event; equal hashes are settled exactly in a second pass, holding only their ids."""
    kind = output_format(path)
    with replacing(path) as staging:
        rows, hashes = _write(read(), staging, kind, skip=None)
        suspects = _repeated(hashes)
        if not suspects:
            return ExportResult(Path(path), rows, 0)
        rows, _ = _write(_stopping_at(read(), hashes), staging, kind, skip=_FirstCopies(suspects))
    return ExportResult(Path(path), rows, len(hashes) - rows)


def _write(records: Iterable[dict], path: Path, kind: str, skip) -> tuple[int, np.ndarray]:
    """Write the records (those `skip` does not take), BATCH_ROWS at a time; the number written and the hash
    of every record's identity (_identity)."""
    rows = 0
    hashes: list[np.ndarray] = []
    batch: list[dict] = []
    with _writer(path, kind) as write:
        for record in records:
            batch.append(record)
            if len(batch) == BATCH_ROWS:
                rows += _write_batch(batch, hashes, write, skip)
                batch = []
        rows += _write_batch(batch, hashes, write, skip)  # also when empty: a CSV gets its header
    return rows, np.concatenate(hashes)


def _write_batch(batch: list[dict], hashes: list[np.ndarray], write, skip) -> int:
    hashes.append(np.fromiter((_identity(record) for record in batch), np.int64, len(batch)))
    if skip is not None:
        batch = [record for record in batch if not skip(record)]
    write(_table(batch))
    return len(batch)


def _identity(record: dict) -> int:
    """The hash of the record's event_id; of its whole content when it has none, so that records without one do
    not all look alike (they are never left out: _FirstCopies), and a second pass still checks it reads them."""
    event_id = record.get("event_id")
    return hash(event_id if event_id is not None else json.dumps(record, sort_keys=True, default=str))


def _repeated(hashes: np.ndarray) -> set[int]:
    """The hashes more than one record has: repeated event_ids, or (rarely) different ids that hash alike."""
    ordered = np.sort(hashes)
    return set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())


class _FirstCopies:
    """Called with each record in order: True for a later copy of an event_id whose hash is a suspect."""

    def __init__(self, suspects: set[int]):
        self.suspects = suspects
        self.seen: set = set()

    def __call__(self, record: dict) -> bool:
        event_id = record.get("event_id")
        if event_id is None or _identity(record) not in self.suspects:
            return False
        if event_id in self.seen:
            return True
        self.seen.add(event_id)
        return False


def _stopping_at(records: Iterable[dict], hashes: np.ndarray) -> Iterator[dict]:
    """The records of the first pass again: events the log took since are left for the next export, and a
    stream trimmed meanwhile is an error, not a file that silently lacks events."""
    position = 0
    for record in records:
        if position == len(hashes):
            return
        if _identity(record) != hashes[position]:
            break
        position += 1
        yield record
    if position < len(hashes):
        raise RecsvcError("the event stream changed while it was exported (trimmed meanwhile?); run the export "
                          "again")


def _table(records: list[dict]) -> pa.Table:
    def column(name: str) -> list:
        return [record.get(name) for record in records]

    milliseconds = [round(1000 * (r["timestamp"] if r.get("timestamp") is not None else r["time"])) for r in records]
    return pa.table([column("customer_id"), column("item_id"), column("event_type"),
                     pa.array(milliseconds, pa.int64()).cast(SCHEMA.field("timestamp").type), column("weight")],
                    schema=SCHEMA)


@contextlib.contextmanager
def _writer(path: Path, kind: str) -> Iterator[Callable[[pa.Table], None]]:
    if kind == "parquet":
        with pq.ParquetWriter(str(path), SCHEMA) as writer:
            yield writer.write_table
        return
    with pa.OSFile(str(path), "wb") as raw, \
            (pa.CompressedOutputStream(raw, "gzip") if kind == "csv.gz" else contextlib.nullcontext(raw)) as sink, \
            pacsv.CSVWriter(sink, SCHEMA) as writer:
        yield writer.write_table
