"""Reading interaction and catalog files (CSV, CSV.gz, Parquet) into id-mapped arrays, with a bad-row report."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsvc.artifacts import Catalog
from recsvc.errors import InvalidInput

MAX_ID_LENGTH = 128
REQUIRED_COLUMNS = ("customer_id", "item_id")
EXAMPLES_PER_REASON = 3


@dataclass
class IngestOptions:
    """How raw events become interaction strengths."""

    event_weights: dict[str, float] = field(default_factory=lambda: {
        "view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "support_ticket": 3.0,
    })
    unknown_event_weight: float = 1.0
    max_bad_share: float = 0.05


@dataclass
class BadRowReport:
    total_rows: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def bad_rows(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def bad_share(self) -> float:
        return self.bad_rows / self.total_rows if self.total_rows else 0.0

    def add(self, reason: str, mask: np.ndarray, table: pa.Table) -> None:
        rows = np.flatnonzero(mask)
        if not len(rows):
            return
        self.counts[reason] += len(rows)
        shown = self.examples.setdefault(reason, [])
        for row in rows[: EXAMPLES_PER_REASON - len(shown)]:
            values = {name: table.column(name)[int(row)].as_py() for name in table.column_names}
            shown.append(f"row {int(row) + 2}: {values}")  # +2: 1-based, after the header line

    def summary(self) -> str:
        lines = [f"{self.bad_rows} of {self.total_rows} rows rejected ({self.bad_share:.2%})"]
        for reason, count in self.counts.most_common():
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    e.g. {example}" for example in self.examples.get(reason, []))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"total_rows": self.total_rows, "bad_rows": self.bad_rows, "by_reason": dict(self.counts)}


@dataclass
class Interactions:
    """Interaction rows mapped to positions in sorted id arrays (see recsvc.artifacts.IdIndex)."""

    customers: np.ndarray
    items: np.ndarray
    customer: np.ndarray  # int32 position per row
    item: np.ndarray  # int32 position per row
    strength: np.ndarray  # float32 event weight x weight column
    timestamp: np.ndarray | None  # float64 Unix seconds per row, when the file had them
    report: BadRowReport
    fingerprint: str

    def __len__(self) -> int:
        return len(self.customer)

    def matrix(self) -> sp.csr_matrix:
        """Customers x items, strengths of duplicate pairs summed."""
        shape = (len(self.customers), len(self.items))
        matrix = sp.csr_matrix((self.strength, (self.customer, self.item)), shape=shape, dtype=np.float32)
        matrix.sum_duplicates()
        return matrix


def read_table(path: Path) -> pa.Table:
    """The file as an Arrow table of its raw columns; InvalidInput when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        string_columns = {name: pa.string() for name in ("customer_id", "item_id", "event_type", "timestamp", "weight",
                                                         "title", "category", "active")}
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=string_columns,
                                                                           strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot be read as {'Parquet' if path.suffix == '.parquet' else 'CSV'}: {exc}") from exc


def _require_columns(table: pa.Table, path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InvalidInput(
            f"{path}: required column(s) {', '.join(missing)} missing; found {', '.join(table.column_names) or 'none'}. "
            "An interactions file needs a header with customer_id and item_id "
            "(optional: event_type, timestamp, weight)."
        )


def _id_problems(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(missing, too long) masks for an id column."""
    as_text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    missing = pc.fill_null(pc.equal(pc.utf8_length(as_text), 0), True).to_numpy(zero_copy_only=False)
    too_long = pc.fill_null(pc.greater(pc.utf8_length(as_text), MAX_ID_LENGTH), False).to_numpy(zero_copy_only=False)
    return missing, too_long


def parse_timestamp(value) -> float | None:
    """Unix seconds from Unix seconds or ISO-8601 (naive times are UTC); None when unparseable."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def _timestamps(column: pa.ChunkedArray) -> np.ndarray:
    """Float64 Unix seconds; NaN where missing or unparseable."""
    if pa.types.is_timestamp(column.type):
        seconds = pc.divide(pc.cast(pc.cast(column, pa.timestamp("us")), pa.int64()), 1_000_000)
        return pc.cast(seconds, pa.float64()).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    for target in (pa.float64(), pa.timestamp("us", tz="UTC")):
        try:
            return _timestamps(pc.cast(column, target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    parsed = [parse_timestamp(v) for v in column.to_pylist()]
    return np.array([np.nan if v is None else v for v in parsed], dtype=np.float64)


def _weights(column: pa.ChunkedArray) -> np.ndarray:
    """Float64 weights; NaN where missing or not a number."""
    try:
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        def number(value):
            try:
                return float(value)
            except (TypeError, ValueError):
                return np.nan
        return np.array([number(v) for v in column.to_pylist()], dtype=np.float64)


def _event_strengths(column: pa.ChunkedArray, options: IngestOptions) -> np.ndarray:
    encoded = pc.dictionary_encode(pc.fill_null(pc.utf8_lower(pc.cast(column, pa.string())), "")).combine_chunks()
    per_type = np.array([options.event_weights.get(name, options.unknown_event_weight)
                         for name in encoded.dictionary.to_pylist()], dtype=np.float64)
    return per_type[encoded.indices.to_numpy(zero_copy_only=False)] if len(per_type) else np.ones(len(column))


def _positions(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids as UTF-8 bytes, int32 position of each row's id)."""
    encoded = pc.dictionary_encode(pc.utf8_trim_whitespace(pc.cast(column, pa.string()))).combine_chunks()
    ids = np.array([s.encode("utf-8") for s in encoded.dictionary.to_pylist()], dtype=np.bytes_)
    order = np.argsort(ids, kind="stable")
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return ids[order], rank[encoded.indices.to_numpy(zero_copy_only=False)]


def fingerprint_file(path: Path) -> str:
    """SHA-256 of the file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_interactions(path: Path, options: IngestOptions | None = None) -> Interactions:
    """Read, validate and id-map an interactions file.

    Bad rows are dropped and counted by reason; raises InvalidInput when the file
    lacks a required column, has no usable row, or its bad share exceeds
    options.max_bad_share.
    """
    options = options or IngestOptions()
    path = Path(path)
    table = read_table(path)
    _require_columns(table, path)
    report = BadRowReport(total_rows=table.num_rows)
    bad = np.zeros(table.num_rows, dtype=bool)

    def reject(reason: str, mask: np.ndarray) -> None:
        nonlocal bad
        mask = mask & ~bad
        report.add(reason, mask, table)
        bad |= mask

    for column in REQUIRED_COLUMNS:
        missing, too_long = _id_problems(table.column(column))
        reject(f"missing {column}", missing)
        reject(f"{column} longer than {MAX_ID_LENGTH} characters", too_long)

    strength = _event_strengths(table.column("event_type"), options) if "event_type" in table.column_names \
        else np.ones(table.num_rows)
    if "weight" in table.column_names:
        weight = _weights(table.column("weight"))
        weight = np.where(np.isnan(weight) & table.column("weight").is_null().to_numpy(zero_copy_only=False), 1.0, weight)
        reject("weight not a positive number", ~(weight > 0) | ~np.isfinite(weight))
        strength = strength * np.where(bad, 1.0, weight)
    timestamp = None
    if "timestamp" in table.column_names:
        timestamp = _timestamps(table.column("timestamp"))
        reject("timestamp not ISO-8601 or Unix seconds", np.isnan(timestamp))

    _check_bad_share(report, options, path)
    keep = pa.array(~bad)
    customers, customer = _positions(table.column("customer_id").filter(keep))
    items, item = _positions(table.column("item_id").filter(keep))
    return Interactions(
        customers=customers, items=items, customer=customer, item=item,
        strength=strength[~bad].astype(np.float32),
        timestamp=None if timestamp is None else timestamp[~bad],
        report=report, fingerprint=fingerprint_file(path),
    )


def _check_bad_share(report: BadRowReport, options: IngestOptions, path: Path) -> None:
    if report.total_rows == report.bad_rows:
        raise InvalidInput(f"{path}: no usable interaction rows.\n{report.summary()}")
    if report.bad_share > options.max_bad_share:
        raise InvalidInput(
            f"{path}: too many bad rows ({report.bad_share:.2%} > the allowed {options.max_bad_share:.2%}).\n"
            f"{report.summary()}", details=report.as_dict())


def load_catalog(path: Path, items: np.ndarray) -> Catalog:
    """Catalog attributes aligned with the sorted item ids; catalog rows for items without interactions are ignored."""
    path = Path(path)
    table = read_table(path)
    if "item_id" not in table.column_names:
        raise InvalidInput(f"{path}: a catalog file needs an item_id column; found {', '.join(table.column_names)}")
    n_rows = table.num_rows
    column = {name: (table.column(name).to_pylist() if name in table.column_names else [None] * n_rows)
              for name in ("item_id", "title", "category", "active")}
    titles, categories = [""] * len(items), [""] * len(items)
    active = np.ones(len(items), dtype=bool)
    for row, item_id in enumerate(column["item_id"]):
        key = str(item_id or "").strip().encode("utf-8")
        pos = int(np.searchsorted(items, key))
        if pos >= len(items) or items[pos] != key:
            continue
        titles[pos] = str(column["title"][row] or "")
        categories[pos] = str(column["category"][row] or "")
        active[pos] = str(column["active"][row]).strip().lower() not in ("false", "0", "no", "n", "f")
    return Catalog(np.array(titles, dtype=str), np.array(categories, dtype=str), active)
