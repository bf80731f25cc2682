"""The events the API kept (POST /v1/events) as an interactions file in the data contract's format."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recsvc.errors import InvalidInput
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
            text += ("; the file holds only the header, which `recsvc-train fit` refuses on its own (exit 2): "
                     "concatenate it with the rest of the interactions")
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


def export_events(records: Iterable[dict], path: Path) -> ExportResult:
    """Write event records (recsvc.event_log, kind "event") to `path` as customer_id, item_id, event_type,
    timestamp (the event's own, else when the API received it; UTC, milliseconds), weight (empty: none given).

    The file appears whole or not at all (written beside it, fsync'd, renamed over): an error while reading
    the records leaves an existing file as it was. A record whose event_id came earlier is left out."""
    kind = output_format(path)
    rows = repeated = 0
    seen: set[str] = set()
    batch: list[dict] = []
    with replacing(path) as staging, _writer(staging, kind) as write:
        for record in records:
            event_id = record.get("event_id")
            if event_id in seen:
                repeated += 1
                continue
            seen.add(event_id)
            batch.append(record)
            if len(batch) == BATCH_ROWS:
                write(_table(batch))
                rows, batch = rows + len(batch), []
        write(_table(batch))  # also when empty: a CSV gets its header
        rows += len(batch)
    return ExportResult(Path(path), rows, repeated)


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
