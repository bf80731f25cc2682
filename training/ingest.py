"""Reading interaction and catalog files (CSV, CSV.gz, Parquet) into id-mapped arrays, with a bad-row report."""

from __future__ import annotations

import csv
import datetime as dt
import glob
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from recsvc.event_log import EVENT_TIME_MAX_AHEAD_SECONDS

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
    half_life_days: float | None = None  # time decay (needs timestamps); None: every event counts fully
    min_items_per_customer: int = 1  # distinct items; customers below are left out of the model
    min_customers_per_item: int = 1  # distinct customers; items below are left out of the model


@dataclass
class BadRowReport:
    total_rows: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    # Data-row numbers (1-based) of the lines that were no row (malformed), which the table lacks; None when the
    # file's lines are not one row each (a quoted line break, a blank line), so that their places are unknown.
    skipped_rows: np.ndarray | None = field(default_factory=lambda: np.empty(0, dtype=np.int64))

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
            shown.append(f"{self.row_name(int(row))}: {values}")

    def row_name(self, row: int) -> str:
        """How the report names the table's row `row`: "data row N", N its place after the header (1-based)
        among the file's rows, the malformed ones counted, so that it can be found in the file."""
        if self.skipped_rows is None:
            return f"well-formed row {row + 1}"
        well_formed_before = self.skipped_rows - np.arange(len(self.skipped_rows))  # + 1, at each skipped row
        return f"data row {row + 1 + int(np.searchsorted(well_formed_before, row + 1, side='right'))}"

    def summary(self) -> str:
        lines = [f"{self.bad_rows} of {self.total_rows} rows rejected ({self.bad_share:.2%})"]
        for reason, count in self.counts.most_common():
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    e.g. {example}" for example in self.examples.get(reason, []))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"total_rows": self.total_rows, "bad_rows": self.bad_rows, "by_reason": dict(self.counts)}

    @classmethod
    def joined(cls, reports: Sequence[tuple[Path, "BadRowReport"]]) -> "BadRowReport":
        """Several files' reports as one over all their rows; each example names its file
        ("events/2026-12-01.csv, data row 3: ..."), the first files' first."""
        joined = cls()
        for path, report in reports:
            joined.total_rows += report.total_rows
            joined.counts.update(report.counts)
            for reason, examples in report.examples.items():
                shown = joined.examples.setdefault(reason, [])
                shown.extend(f"{path}, {example}" for example in examples[: EXAMPLES_PER_REASON - len(shown)])
        return joined


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
    fingerprint: str  # see FileFingerprints.input and data_fingerprint
    files: list[dict] = field(default_factory=list)  # {"path", "fingerprint", "rows"} per file read, in order

    def __len__(self) -> int:
        return len(self.customer)

    def matrix(self) -> sp.csr_matrix:
        """Customers x items, strengths of duplicate pairs summed."""
        shape = (len(self.customers), len(self.items))
        matrix = sp.csr_matrix((self.strength, (self.customer, self.item)), shape=shape, dtype=np.float32)
        matrix.sum_duplicates()
        return matrix


CATEGORY_COLUMNS = ("event_type",)  # few distinct values: read dictionary-encoded, unified cheaply
TEXT_COLUMNS = ("customer_id", "item_id", "timestamp", "weight", "title", "category", "active", "tags")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class RawTable:
    """An interactions file's rows as read, with what could not be read as a row at all."""

    table: pa.Table
    malformed: list[str] = field(default_factory=list)  # lines that are no CSV row of the header's width
    skipped_rows: np.ndarray | None = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # see BadRowReport
    not_utf8: np.ndarray | None = None  # rows with a text cell that is not UTF-8 (now null)


def read_table(path: Path) -> pa.Table:
    """The file as an Arrow table of its raw columns; InvalidInput when it cannot be read (any bad line: a
    catalog is small and hand-made, so it is fixed rather than partly read)."""
    return _read(Path(path), tolerant=False).table


def read_interactions_table(path: Path) -> RawTable:
    """Like read_table, but a line that is no row (wrong number of fields) and text that is not UTF-8 are
    left out and reported, as bad rows are: one broken line of an export must not refuse the whole night."""
    return _read(Path(path), tolerant=True)


def _read(path: Path, tolerant: bool) -> RawTable:
    _check_is_file(path)
    parquet = _is_parquet(path)
    try:
        if parquet:
            names = pq.read_schema(path).names
            raw = RawTable(pq.read_table(path, read_dictionary=[c for c in CATEGORY_COLUMNS if c in names]))
            raw.table = raw.table.rename_columns(_column_names(names, path))
        else:
            raw = _read_csv(path, tolerant)
        raw.table = raw.table.unify_dictionaries()
        return raw
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot be read as {'Parquet' if parquet else 'CSV'}: {exc}") from exc


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise InvalidInput(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise InvalidInput(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")


def interactions_files(sources: Path | str | Iterable[Path | str]) -> list[Path]:
    """The files an interactions input names, in order. Each source is a file or a glob pattern (`*`, `?`,
    `[...]`, as the shell has them) whose matching files come sorted by name; like the shell's, a pattern skips
    hidden files (the export's temporary ones). A file named twice (by a name and a pattern) is read once.
    InvalidInput when a named file does not exist or is no file, or a pattern matches no file."""
    files: list[Path] = []
    seen: set[str] = set()
    for source in [sources] if isinstance(sources, (str, Path)) else sources:
        source = Path(source)
        if source.exists() or not glob.has_magic(str(source)):  # a file whose name holds a `[` is that file
            _check_is_file(source)
            matches = [source]
        else:
            matches = [Path(match) for match in sorted(glob.glob(str(source))) if os.path.isfile(match)]
            if not matches:
                raise InvalidInput(f"{source}: no file matches this pattern")
        for path in matches:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                files.append(path)
    if not files:
        raise InvalidInput("no interactions file given")
    return files


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        return fh.read(4) == b"PAR1"  # whatever the name says


def _column_names(names: list[str], path: Path) -> list[str]:
    """Header names as recsvc spells them ("Customer_ID " is customer_id); a name twice is refused."""
    normalised = [name.strip().lower() for name in names]
    repeated = sorted({name for name in normalised if normalised.count(name) > 1})
    if repeated:
        raise InvalidInput(f"{path}: the header names column(s) {', '.join(repeated)} more than once "
                           f"({', '.join(names)})")
    return normalised


def _read_csv(path: Path, tolerant: bool, text_type: pa.DataType = pa.string(), use_threads: bool = True) -> RawTable:
    first_line, more = _first_line(path)
    header = next(csv.reader([first_line]), [])
    names = _column_names(header, path)
    column_types = {name: text_type for name in TEXT_COLUMNS}
    column_types.update({name: pa.dictionary(pa.int32(), text_type) for name in CATEGORY_COLUMNS})
    if header and not more:  # a header without a line break: Arrow would fail to skip it
        return RawTable(pa.table({name: pa.array([], column_types.get(name, text_type)) for name in names}))
    malformed: list[tuple[int | None, str]] = []  # (Arrow's row number, the header's 1, when known; what it was)

    def skip(row) -> str:
        malformed.append((row.number, f"{row.text[:200]!r} ({row.actual_columns} fields, not {row.expected_columns})"))
        return "skip"

    try:
        table = pacsv.read_csv(
            path, read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=use_threads),
            parse_options=pacsv.ParseOptions(invalid_row_handler=skip if tolerant else None),
            # Only an empty cell is missing: "NA", "NULL" or "nan" can be someone's id.
            convert_options=pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=True,
                                                 null_values=[""]))
    except pa.ArrowInvalid as exc:
        if not tolerant or text_type != pa.string() or "UTF8" not in str(exc):
            raise
        return _without_invalid_text(_read_csv(path, tolerant, pa.binary(), use_threads))
    if malformed and use_threads:
        # Read in parallel, Arrow cannot tell where a malformed line was, so neither where the rows after it
        # are; in one thread it can. Only files with such a line pay for the second read.
        return _read_csv(path, tolerant, text_type, use_threads=False)
    if not malformed:
        return RawTable(table)
    if any(number is None for number, _ in malformed):  # not in one thread; then the rows' places are unknown
        return RawTable(table, [f"a line: {text}" for _, text in malformed], None)
    # Arrow counts rows as the report does (a quoted line break inside one, blank lines not), the header first.
    return RawTable(table, [f"data row {number - 1}: {text}" for number, text in malformed],
                    np.array(sorted(number - 1 for number, _ in malformed), dtype=np.int64))


def _first_line(path: Path) -> tuple[str, bool]:
    """(the header line (of a .csv.gz too) without a byte-order mark, whether a line break ends it)."""
    head = b""
    with pa.input_stream(path, compression="detect") as stream:
        while b"\n" not in head and (block := stream.read(1 << 16)):
            head += block
    return head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8-sig"), b"\n" in head


def _without_invalid_text(raw: RawTable) -> RawTable:
    """Binary text columns as strings; a value that is not UTF-8 becomes null and marks its rows. Decoded per
    distinct value, so only files that need it pay."""
    table, not_utf8 = raw.table, np.zeros(raw.table.num_rows, dtype=bool)
    for index, name in enumerate(table.column_names):
        column = table.column(name)
        dictionary_type = pa.types.is_dictionary(column.type)
        if not (pa.types.is_binary(column.type) or dictionary_type and pa.types.is_binary(column.type.value_type)):
            continue
        encoded = (column if dictionary_type else pc.dictionary_encode(column)).combine_chunks()
        texts = [_utf8_or_none(value) for value in encoded.dictionary.to_pylist()]
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        invalid = np.append(np.array([t is None for t in texts], dtype=bool), False)
        not_utf8 |= invalid[codes]
        decoded = pa.DictionaryArray.from_arrays(encoded.indices, pa.array(texts, pa.string()))
        table = table.set_column(index, name, decoded if dictionary_type else decoded.dictionary_decode())
    return RawTable(table, raw.malformed, raw.skipped_rows, not_utf8)


def _utf8_or_none(value: bytes | None) -> str | None:
    try:
        return None if value is None else value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _require_columns(table: pa.Table, path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InvalidInput(
            f"{path}: required column(s) {', '.join(missing)} missing; "
            f"found {', '.join(table.column_names) or 'none'}. "
            "An interactions file needs a header with customer_id and item_id "
            "(optional: event_type, timestamp, weight)."
        )


@dataclass
class EncodedIds:
    """An id column as distinct trimmed values plus one code per row (-1: missing)."""

    values: pa.Array  # distinct ids after trimming whitespace
    codes: np.ndarray  # int64 index into values per row, -1 where the id is missing or empty

    @classmethod
    def of(cls, column: pa.ChunkedArray) -> "EncodedIds":
        if not pa.types.is_dictionary(column.type):
            # One hash table over all chunks; combining afterwards only concatenates the codes.
            column = pc.dictionary_encode(pc.cast(column, pa.string()))
        encoded = column.combine_chunks() if column.num_chunks else pc.dictionary_encode(pa.array([], pa.string()))
        raw_codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        # Trimming can make two raw values equal (" a" and "a"): encode the trimmed values once more.
        trimmed = pc.dictionary_encode(pc.utf8_trim_whitespace(pc.cast(encoded.dictionary, pa.string())))
        remap = np.append(trimmed.indices.to_numpy(zero_copy_only=False).astype(np.int64), -1)
        codes = remap[raw_codes]  # raw -1 picks the appended -1
        empty = np.append(pc.equal(pc.utf8_length(trimmed.dictionary), 0).to_numpy(zero_copy_only=False), True)
        codes[empty[np.where(codes < 0, len(empty) - 1, codes)]] = -1
        return cls(trimmed.dictionary, codes)

    @classmethod
    def joined(cls, parts: Sequence["EncodedIds"]) -> "EncodedIds":
        """Several files' id columns as one, in order: their distinct values encoded once more, so that an id in
        two files has one code."""
        joined = pc.dictionary_encode(pa.concat_arrays([part.values for part in parts]))
        remap = np.append(joined.indices.to_numpy(zero_copy_only=False).astype(np.int64), -1)
        offsets = np.cumsum([0, *(len(part.values) for part in parts)])
        codes = np.concatenate([np.where(part.codes < 0, -1, part.codes + offset)
                                for part, offset in zip(parts, offsets)])
        return cls(joined.dictionary, remap[codes])  # -1 picks the appended -1

    def too_long(self) -> np.ndarray:
        """Per-row mask of ids longer than MAX_ID_LENGTH characters."""
        return self._rows(pc.greater(pc.utf8_length(self.values), MAX_ID_LENGTH))

    def with_control_characters(self) -> np.ndarray:
        """Per-row mask of ids holding a control character (a quoted newline, a tab): the API refuses those in
        ids, so no agent could ask for such a customer or item."""
        return self._rows(pc.match_substring_regex(self.values, r"[\x00-\x1f\x7f]"))

    def _rows(self, per_value: pa.Array) -> np.ndarray:
        flags = np.append(per_value.to_numpy(zero_copy_only=False), False)  # code -1 (missing) picks False
        return flags[np.where(self.codes < 0, len(flags) - 1, self.codes)]

    def positions(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct ids of the kept rows as UTF-8 bytes, int32 position of each kept row's id)."""
        codes = self.codes[keep]
        used = np.flatnonzero(np.bincount(codes, minlength=len(self.values)) > 0)
        ids = self.values.take(pa.array(used)).cast(pa.binary()).to_numpy(zero_copy_only=False).astype(np.bytes_)
        order = np.argsort(ids, kind="stable")
        rank = np.full(len(self.values), -1, dtype=np.int32)
        rank[used[order]] = np.arange(len(order), dtype=np.int32)
        return ids[order], rank[codes]


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




def _check_timestamps(column: pa.ChunkedArray, rows: "_RowCheck", needed: bool) -> np.ndarray | None:
    """Unix seconds per row (NaN where missing), rejecting what cannot be a time of an interaction.

    One timestamp in milliseconds (or the year 9999) would be the newest event: time decay would weigh
    every real row as ancient and the time holdout would test that one row. A missing cell is no mistake
    unless time decay or the time holdout needs the time; None when no row has one and none is needed.
    """
    seconds = _timestamps(column)
    missing = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        missing |= pc.equal(pc.utf8_trim_whitespace(column), "").fill_null(True).to_numpy(zero_copy_only=False)
    rows.reject("timestamp not ISO-8601 or Unix seconds", ~missing & ~np.isfinite(seconds))
    rows.reject("timestamp in the future (Unix milliseconds?)", seconds > time.time() + EVENT_TIME_MAX_AHEAD_SECONDS)
    rows.reject("timestamp before 1970", seconds < 0)
    if needed:
        rows.reject("missing timestamp (time decay or the time holdout needs one)", missing)
    elif missing.all():
        return None
    return np.where(missing, np.nan, seconds)


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
    """Float64 event-type weight per row; missing and unknown types weigh options.unknown_event_weight."""
    encoded = EncodedIds.of(column)
    names = [name.lower() for name in encoded.values.to_pylist()]
    per_type = np.array([options.event_weights.get(name, options.unknown_event_weight) for name in names]
                        + [options.unknown_event_weight], dtype=np.float64)
    return per_type[encoded.codes]  # code -1 picks the appended unknown weight


ROWLESS_MAX_BYTES = 1 << 16  # a header (or an empty Parquet file) is smaller: bigger files are taken to hold rows


@dataclass(frozen=True)
class FileFingerprint:
    """A file's SHA-256 (hex), and whether it surely adds no row to an input: see rowless_file."""

    sha256: str
    rowless: bool


def fingerprint_file(path: Path) -> str:
    """SHA-256 of the file's bytes (hex)."""
    return file_fingerprint(path).sha256


def file_fingerprint(path: Path) -> FileFingerprint:
    """The file's SHA-256 and whether it is rowless (rowless_file), from one read of its bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        first = fh.read(1 << 20)
        digest.update(first)
        whole = True  # `first` is the whole file
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            whole = False
    small = whole and len(first) <= ROWLESS_MAX_BYTES
    return FileFingerprint(digest.hexdigest(), small and rowless_file(Path(path), first))


def rowless_file(path: Path, content: bytes) -> bool:
    """Whether an interactions file of these bytes adds no row to an input and ingest takes it: a CSV (CSV.gz)
    of one header line naming customer_id and item_id, then nothing but line breaks, or a Parquet file of no row
    whose columns ingest takes (an exported day without events). Anything else, and whatever cannot be told
    for sure, counts as rows: at worst `nightly` trains once more, never skips new rows."""
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES or content[:4] == b"PAR1":
            if pq.read_metadata(pa.BufferReader(content)).num_rows:
                return False
            table = pq.read_table(pa.BufferReader(content))
            table = table.rename_columns(_column_names(table.column_names, path))
            _require_columns(table, path)
            _check_column_types(table, path)
            return True
        codec = _compression(path)
        if codec is not None:
            content = pa.CompressedInputStream(pa.BufferReader(content), codec).read(ROWLESS_MAX_BYTES + 1)
            if len(content) > ROWLESS_MAX_BYTES:
                return False
        header = content.rstrip(b"\r\n")
        if b"\n" in header or b"\r" in header:  # a second line (Arrow ends a line at \r too): rows, or unsure
            return False
        names = _column_names(next(csv.reader([header.decode("utf-8-sig")]), []), path)
        return all(name in names for name in REQUIRED_COLUMNS)
    except (pa.ArrowException, InvalidInput, OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return False


def _compression(path: Path) -> str | None:
    """The codec Arrow reads the file with, by its name's extension (.gz: gzip), as ingest opens it."""
    try:
        return pa.Codec.detect(str(path)).name
    except (TypeError, ValueError):  # pyarrow raises TypeError for a name without a codec's extension
        return None


class FileFingerprints:
    """Files' fingerprints (file_fingerprint) computed once in a run: nightly's up-to-date check hashes the input,
    and the ingest that follows takes those values instead of reading every file again. A file is hashed again
    when its identity (inode, device, size, modification time) is not the one it had when hashed, so that a file
    rewritten in between is not taken for the one hashed."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple[int, int, int, int], FileFingerprint]] = {}

    def entry(self, path: Path) -> FileFingerprint:
        identity = _identity(path)
        known = self._known.get(path)
        if known is not None and known[0] == identity:
            return known[1]
        fingerprint = file_fingerprint(path)
        if _identity(path) == identity:  # unchanged while hashed: the value holds for this identity
            self._known[path] = (identity, fingerprint)
        return fingerprint

    def file(self, path: Path) -> str:
        """SHA-256 of the file's bytes (hex)."""
        return self.entry(path).sha256

    def input(self, paths: Sequence[Path]) -> str:
        """The fingerprint of an interactions input (hex): that of its files that are not rowless, in reading
        order (data_fingerprint). A header-only file (a day without events) leaves it as it was."""
        return data_fingerprint([entry.sha256 for entry in map(self.entry, paths) if not entry.rowless])


def data_fingerprint(fingerprints: Sequence[str]) -> str:
    """One file's fingerprint is fingerprint_file's, as it was before an input could be several files (a
    registry trained on one file stays up to date); several files' is the SHA-256 of their fingerprints, one a
    line, in reading order: reading order can change the model (summed duplicates round differently in float32,
    and ALS carries the difference on), so another order is other data."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256("".join(f"{fingerprint}\n" for fingerprint in fingerprints).encode()).hexdigest()


@dataclass
class _CheckedRows:
    """Rows read and checked: ids, strength and time per row, and which rows are bad, with the report on them."""

    ids: dict[str, EncodedIds]
    strength: np.ndarray  # float64
    timestamp: np.ndarray | None  # float64 Unix seconds, NaN where missing; None when no row has one
    bad: np.ndarray
    report: BadRowReport


def load_interactions(source: Path | str | Iterable[Path | str], options: IngestOptions | None = None,
                      need_timestamps: bool = False, fingerprints: FileFingerprints | None = None) -> Interactions:
    """Read, validate and id-map an interactions input: one file, or several files and glob patterns
    (interactions_files), read in order as one.

    Bad rows are dropped and counted by reason over the whole input; raises InvalidInput when a file is
    missing, lacks a required column or changed while being read, a pattern matches nothing, the input has
    no usable row, or its bad share exceeds options.max_bad_share. A file with only a header adds no row.
    `need_timestamps`: rows without one are bad (time decay and the time holdout need them;
    options.half_life_days implies it). `fingerprints`: the files' fingerprints known already (nightly's).
    """
    options = options or IngestOptions()
    fingerprints = fingerprints or FileFingerprints()
    need_timestamps = need_timestamps or bool(options.half_life_days)
    paths = interactions_files(source)
    before = [_identity(path) for path in paths]
    checked = [_check_file(path, options, need_timestamps) for path in paths]
    rows = checked[0] if len(checked) == 1 else _joined(paths, checked, need_timestamps)
    _check_bad_share(rows.report, options, _input_name(paths), several=len(paths) > 1)
    keep = ~rows.bad
    customers, customer = rows.ids["customer_id"].positions(keep)
    items, item = rows.ids["item_id"].positions(keep)
    file_fingerprints = [fingerprints.entry(path) for path in paths]
    for path, identity in zip(paths, before):
        if _identity(path) != identity:
            raise InvalidInput(f"{path}: the file changed while it was read (is the export still writing it?); "
                               "run again once it is complete")
    return Interactions(
        customers=customers, items=items, customer=customer, item=item,
        strength=rows.strength[keep].astype(np.float32),
        timestamp=None if rows.timestamp is None else rows.timestamp[keep],
        # A file left out of the fingerprint is one FileFingerprints.input leaves out too, and that adds no row.
        report=rows.report, fingerprint=data_fingerprint([
            fingerprint.sha256 for fingerprint, file in zip(file_fingerprints, checked)
            if not (fingerprint.rowless and file.report.total_rows == 0)]),
        files=[{"path": str(path), "fingerprint": fingerprint.sha256, "rows": file.report.total_rows}
               for path, fingerprint, file in zip(paths, file_fingerprints, checked)],
    )


def _check_file(path: Path, options: IngestOptions, need_timestamps: bool) -> _CheckedRows:
    """One interactions file read and checked row by row (the bad share is checked over the whole input)."""
    raw = read_interactions_table(path)
    table = raw.table
    _require_columns(table, path)
    _check_column_types(table, path)
    rows = _RowCheck(table, raw.malformed, raw.skipped_rows)
    if raw.not_utf8 is not None:
        rows.reject("text that is not UTF-8", raw.not_utf8)
    # Arrow releases the GIL while hashing: encode both id columns at once.
    with ThreadPoolExecutor(max_workers=len(REQUIRED_COLUMNS)) as pool:
        ids = dict(zip(REQUIRED_COLUMNS, pool.map(EncodedIds.of, (table.column(c) for c in REQUIRED_COLUMNS))))
    for column, encoded in ids.items():
        rows.reject(f"missing {column}", encoded.codes < 0)
        rows.reject(f"{column} longer than {MAX_ID_LENGTH} characters", encoded.too_long())
        rows.reject(f"{column} with a control character", encoded.with_control_characters())
    strength = _row_strengths(table, options, rows)
    timestamp = None
    if "timestamp" in table.column_names:
        timestamp = _check_timestamps(table.column("timestamp"), rows, need_timestamps)
    return _CheckedRows(ids, strength, timestamp, rows.bad, rows.report)


def _check_column_types(table: pa.Table, path: Path) -> None:
    for name in (*REQUIRED_COLUMNS, *CATEGORY_COLUMNS):
        kind = table.schema.field(name).type if name in table.column_names else pa.string()
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)):
            raise InvalidInput(f"{path}: column {name} holds {kind}; ids and event types must be text or whole numbers")


def _joined(paths: list[Path], files: list[_CheckedRows], need_timestamps: bool) -> _CheckedRows:
    """Several files' checked rows as one input, in order. A file without a timestamp column has rows
    without a time (NaN), as empty cells would be; when the times are needed it is refused, since each of its
    rows would be a bad one."""
    timed = any(file.timestamp is not None for file in files)
    for path, file in zip(paths, files):
        if need_timestamps and timed and file.timestamp is None and len(file.bad):
            raise InvalidInput(f"{path}: no timestamp column, which time decay or the time holdout needs for every "
                               "row (other interactions files have one)")
    return _CheckedRows(
        ids={name: EncodedIds.joined([file.ids[name] for file in files]) for name in REQUIRED_COLUMNS},
        strength=np.concatenate([file.strength for file in files]),
        timestamp=np.concatenate([np.full(len(file.bad), np.nan) if file.timestamp is None else file.timestamp
                                  for file in files]) if timed else None,
        bad=np.concatenate([file.bad for file in files]),
        report=BadRowReport.joined([(path, file.report) for path, file in zip(paths, files)]),
    )


def _input_name(paths: list[Path]) -> str:
    """How messages about the whole input name it: the file, or the files (the first two and the last)."""
    if len(paths) == 1:
        return str(paths[0])
    names = [str(path) for path in paths]
    shown = ", ".join(names) if len(names) <= 3 else f"{names[0]}, {names[1]}, ... {names[-1]}"
    return f"{len(paths)} interactions files ({shown})"


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten or replaced: inode, device, size, modification time."""
    stat = path.stat()
    return stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns


class _RowCheck:
    """Accumulates the bad-row mask and report; a row is counted under its first reason only."""

    def __init__(self, table: pa.Table, malformed: list[str] = (), skipped_rows: np.ndarray | None = None):
        self.table = table
        self.report = BadRowReport(total_rows=table.num_rows + len(malformed),
                                   skipped_rows=np.empty(0, dtype=np.int64) if not malformed else skipped_rows)
        self.bad = np.zeros(table.num_rows, dtype=bool)
        if malformed:  # never rows of the table: counted and shown as the lines they were
            reason = "malformed line (wrong number of fields)"
            self.report.counts[reason] = len(malformed)
            self.report.examples[reason] = list(malformed[:EXAMPLES_PER_REASON])

    def reject(self, reason: str, mask: np.ndarray) -> None:
        mask = mask & ~self.bad
        self.report.add(reason, mask, self.table)
        self.bad |= mask


def _row_strengths(table: pa.Table, options: IngestOptions, rows: _RowCheck) -> np.ndarray:
    """Event-type weight x the weight column (missing weight: 1); rejects weights that are not positive numbers."""
    strength = _event_strengths(table.column("event_type"), options) if "event_type" in table.column_names \
        else np.ones(table.num_rows)
    if "weight" not in table.column_names:
        return strength
    weight = _weights(table.column("weight"))
    weight = np.where(np.isnan(weight) & table.column("weight").is_null().to_numpy(zero_copy_only=False), 1.0, weight)
    rows.reject("weight not a positive number", ~(weight > 0) | ~np.isfinite(weight))
    strength = strength * np.where(rows.bad, 1.0, weight)
    rows.reject("weight too large", strength > np.finfo(np.float32).max / 1e6)  # room to sum and decay in float32
    return strength


def _check_bad_share(report: BadRowReport, options: IngestOptions, path: Path | str, several: bool = False) -> None:
    # details: the counts as fields of the error's JSON log line (--log-format json), for monitoring to alert on
    if not report.total_rows:
        raise InvalidInput(f"{path}: no data rows: {'every file' if several else 'the file'} holds only column names",
                           details=report.as_dict())
    if report.total_rows == report.bad_rows:
        raise InvalidInput(f"{path}: no usable interaction rows.\n{report.summary()}", details=report.as_dict())
    if report.bad_share > options.max_bad_share:
        digits = 2
        while f"{report.bad_share:.{digits}%}" == f"{options.max_bad_share:.{digits}%}" and digits < 6:
            digits += 1  # 5,001 bad rows of 100,000 is not "5.00% > 5.00%"
        raise InvalidInput(
            f"{path}: too many bad rows ({report.bad_share:.{digits}%} > the allowed "
            f"{options.max_bad_share:.{digits}%}).\n"
            f"{report.summary()}", details=report.as_dict())


ACTIVE_VALUES = ("", "true", "1", "yes", "y", "t")  # an empty cell: active, like an item with no catalog row
INACTIVE_VALUES = ("false", "0", "no", "n", "f")


def load_catalog(path: Path, items: np.ndarray, warn: Callable[[str], None] | None = None) -> Catalog:
    """Catalog attributes aligned with the sorted item ids; catalog rows for items without interactions are ignored.
    An item listed twice keeps its last row; `warn` is told which ids were (the first few, with their rows)."""
    path = Path(path)
    table = read_table(path)
    if "item_id" not in table.column_names:
        raise InvalidInput(f"{path}: a catalog file needs an item_id column; found {', '.join(table.column_names)}")
    n_rows = table.num_rows
    column = {name: (table.column(name).to_pylist() if name in table.column_names else [None] * n_rows)
              for name in ("item_id", "title", "category", "active", "tags")}
    titles, categories = [""] * len(items), [""] * len(items)
    item_tags: list[tuple[str, ...]] = [()] * len(items)
    active = np.ones(len(items), dtype=bool)
    matched = 0
    first_row: dict[int, int] = {}
    repeated: list[tuple[str, int, int]] = []
    for row, item_id in enumerate(column["item_id"]):
        flag = str(column["active"][row] if column["active"][row] is not None else "").strip().lower()
        if flag not in ACTIVE_VALUES and flag not in INACTIVE_VALUES:
            raise InvalidInput(f"{path}: row {row + 2}: active must be true or false (or 1/0, yes/no), "
                               f"not {column['active'][row]!r}")
        key = str(item_id or "").strip().encode("utf-8")
        pos = int(np.searchsorted(items, key))
        if pos >= len(items) or items[pos] != key:
            continue
        if pos in first_row:
            repeated.append((key.decode("utf-8"), first_row[pos] + 2, row + 2))
        else:
            first_row[pos] = row
            matched += 1
        titles[pos] = str(column["title"][row] or "")
        categories[pos] = str(column["category"][row] or "")
        item_tags[pos] = split_tags(column["tags"][row])
        active[pos] = flag not in INACTIVE_VALUES
    if n_rows and not matched:
        raise InvalidInput(f"{path}: none of the catalog's {n_rows:,} item ids is among the interactions' items "
                           f"(is it the catalog of this data?)")
    if len(items) and not active.any():  # the API would have nothing to suggest to anyone
        raise InvalidInput(f"{path}: every one of the {len(items):,} items of the interactions is inactive in the "
                           "catalog, so nothing could be suggested (is its active column right?)")
    if repeated and warn is not None:
        examples = "; ".join(f"{item_id!r} in rows {first} and {again}" for item_id, first, again in repeated[:3])
        warn(f"{path}: {len(repeated):,} catalog rows repeat an item id listed before; the last row of each is used "
             f"(e.g. {examples})")
    tags = tag_matrix(item_tags) if "tags" in table.column_names else None
    return Catalog(np.array(titles, dtype=str), np.array(categories, dtype=str), active, tags)


TAG_SEPARATOR = "|"


def split_tags(cell: object) -> tuple[str, ...]:
    """A catalog row's tags: `|`-separated labels (or a Parquet list of them), each stripped; empty ones and repeats
    dropped, order kept."""
    parts = [str(part) for part in cell if part is not None] if isinstance(cell, (list, tuple)) else [str(cell or "")]
    labels = (label.strip() for part in parts for label in part.split(TAG_SEPARATOR))
    return tuple(dict.fromkeys(label for label in labels if label))


def tag_matrix(item_tags: Sequence[Sequence[str]]) -> sp.csr_matrix:
    """items x tags, 1.0 where an item carries a tag; tags in sorted order (their names are not needed)."""
    names = sorted({tag for tags in item_tags for tag in tags})
    column = {name: j for j, name in enumerate(names)}
    indptr = np.cumsum([0, *(len(tags) for tags in item_tags)])
    indices = np.fromiter((column[tag] for tags in item_tags for tag in tags), dtype=np.int32, count=int(indptr[-1]))
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr),
                         shape=(len(item_tags), len(names)))
