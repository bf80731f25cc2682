"""Reading the interaction contract: CSV, CSV.gz and Parquet, bad rows, and the CLI's refusal of unusable files."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from recsvc.errors import InvalidInput
from training import ingest
from training.cli import main as train_cli
from training.ingest import FileFingerprints, IngestOptions, fingerprint_file, load_catalog, load_interactions

CSV = """customer_id,item_id,event_type,timestamp,weight
alice,router,purchase,2026-10-01T10:00:00Z,
alice,router,view,1790848800,2
bob,phone,view,2026-10-02 09:30:00,
bob,case,click,2026-10-02T09:31:00+02:00,0.5
carol,phone,view,,
"""


@pytest.fixture
def csv_path(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text(CSV)
    return path


def _as_dict(interactions):
    matrix = interactions.matrix().toarray()
    customers = [c.decode() for c in interactions.customers]
    items = [i.decode() for i in interactions.items]
    return {(customers[r], items[c]): float(matrix[r, c]) for r, c in zip(*matrix.nonzero())}


def test_csv_rows_are_weighted_by_event_type_and_weight_column(csv_path):
    options = IngestOptions(event_weights={"view": 1, "click": 2, "purchase": 8}, max_bad_share=0.5)
    interactions = load_interactions(csv_path, options)
    assert _as_dict(interactions) == {
        ("alice", "router"): 8 + 1 * 2,  # duplicates are summed
        ("bob", "phone"): 1, ("bob", "case"): 2 * 0.5,
        ("carol", "phone"): 1,  # no timestamp: nothing here needs one
    }
    assert list(interactions.customers) == [b"alice", b"bob", b"carol"]  # sorted: position = id index


def test_timestamps_accept_iso_and_unix_seconds(csv_path):
    interactions = load_interactions(csv_path, IngestOptions(max_bad_share=0.5), need_timestamps=True)
    # carol's empty timestamp is a bad row when timestamps are needed: 4 usable rows remain
    assert len(interactions) == 4
    assert interactions.report.counts == {"missing timestamp (time decay or the time holdout needs one)": 1}
    assert interactions.timestamp[:2].tolist() == [1790848800.0, 1790848800.0]  # 2026-10-01T10:00:00Z both ways
    assert interactions.timestamp[2] == 1790933400.0  # naive ISO times are UTC
    assert interactions.timestamp[3] == 1790933460.0 - 2 * 3600


def test_parquet_and_gzip_read_like_csv(tmp_path, csv_path):
    table = pa.csv.read_csv(csv_path) if hasattr(pa, "csv") else None
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(
        column_types={"timestamp": pa.string(), "weight": pa.float64()}))
    pq.write_table(table, tmp_path / "i.parquet")
    (tmp_path / "i.csv.gz").write_bytes(gzip.compress(csv_path.read_bytes()))
    options = IngestOptions(max_bad_share=0.5)
    expected = _as_dict(load_interactions(csv_path, options))
    assert _as_dict(load_interactions(tmp_path / "i.parquet", options)) == expected
    assert _as_dict(load_interactions(tmp_path / "i.csv.gz", options)) == expected


def test_parquet_with_typed_timestamps(tmp_path):
    table = pa.table({"customer_id": ["a", "b"], "item_id": ["x", "y"],
                      "timestamp": pa.array(np.array([1_700_000_000, 1_700_000_060], dtype="datetime64[s]"))})
    pq.write_table(table, tmp_path / "t.parquet")
    interactions = load_interactions(tmp_path / "t.parquet")
    assert interactions.timestamp.tolist() == [1_700_000_000.0, 1_700_000_060.0]


@pytest.mark.parametrize("row, reason", [
    (",item,view", "missing customer_id"),
    ("cust,,view", "missing item_id"),
    ("c" * 129 + ",item,view", "customer_id longer than 128 characters"),
    ('"a\nb",item,view', "customer_id with a control character"),
    ("cust,it\tem,view", "item_id with a control character"),
])
def test_bad_rows_are_counted_by_reason_with_examples(tmp_path, row, reason):
    path = tmp_path / "bad.csv"
    path.write_text("customer_id,item_id,event_type\n" + "ok,item,view\n" * 9 + row + "\n")
    interactions = load_interactions(path, IngestOptions(max_bad_share=0.2))
    assert interactions.report.counts == {reason: 1}
    assert interactions.report.examples[reason][0].startswith("data row 10:")
    assert len(interactions) == 9


def test_bad_share_above_threshold_is_refused(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("customer_id,item_id,weight\n" + "ok,item,1\n" * 8 + "ok,item,-1\nok,item,abc\n")
    with pytest.raises(InvalidInput, match=r"too many bad rows \(20.00% > the allowed 5.00%\)") as info:
        load_interactions(path)
    assert "weight not a positive number: 2" in info.value.message


def test_file_without_customer_id_exits_2_with_a_clear_message(tmp_path):
    path = tmp_path / "nocustomer.csv"
    path.write_text("user,item_id\nu1,i1\n")
    result = CliRunner().invoke(train_cli, ["fit", "--interactions", str(path), "--registry", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "required column(s) customer_id missing; found user, item_id" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r" / "CURRENT").exists()


def test_console_script_reports_missing_file_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training.cli", "fit", "--interactions", str(tmp_path / "none.csv"),
                             "--registry", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "none.csv: no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_catalog_aligns_with_item_index(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("item_id,title,category,active\nrouter,Wi-Fi router,Broadband,true\n"
                    "phone,Smartphone,Devices,false\nghost,Not traded,Misc,true\n")
    catalog = load_catalog(path, np.array([b"case", b"phone", b"router"]))
    assert catalog.title.tolist() == ["", "Smartphone", "Wi-Fi router"]
    assert catalog.category.tolist() == ["", "Devices", "Broadband"]
    assert catalog.active.tolist() == [True, False, True]


def test_a_catalog_that_makes_every_item_inactive_is_refused(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("item_id,title,active\nphone,Smartphone,false\nrouter,Wi-Fi router,0\nghost,Not traded,true\n")
    with pytest.raises(InvalidInput, match="every one of the 2 items .* is inactive"):
        load_catalog(path, np.array([b"phone", b"router"]))


def _write(tmp_path, text: str | bytes, name: str = "i.csv"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD = "".join(f"c{i % 7},i{i % 5},{1_700_000_000 + i}\n" for i in range(40))


@pytest.mark.parametrize("value, reason", [
    ("1700000000000", "timestamp in the future (Unix milliseconds?)"),
    ("9999-12-31T00:00:00", "timestamp in the future (Unix milliseconds?)"),
    ("-5", "timestamp before 1970"),
    ("inf", "timestamp not ISO-8601 or Unix seconds"),
    ("1e309", "timestamp not ISO-8601 or Unix seconds"),
    ("nan", "timestamp not ISO-8601 or Unix seconds"),
])
def test_a_timestamp_no_interaction_can_have_is_a_bad_row_and_leaves_decay_intact(tmp_path, value, reason):
    path = _write(tmp_path, "customer_id,item_id,timestamp\n" + GOOD + f"c1,i1,{value}\n")
    interactions = load_interactions(path, IngestOptions(half_life_days=30))
    assert interactions.report.counts == {reason: 1} and len(interactions) == 40
    assert np.nanmax(interactions.timestamp) == 1_700_000_039  # the newest real event stays the reference


def test_ids_spelled_like_null_tokens_are_ids_and_a_nan_weight_is_bad(tmp_path):
    tokens = ["NA", "N/A", "NULL", "null", "nan", "NaN", "#N/A", "None"]
    rows = "".join(f"{token},item,1\n" for token in tokens) + "".join(f"c,{token},1\n" for token in tokens)
    path = _write(tmp_path, "customer_id,item_id,weight\n" + rows + "c,item,NaN\n")
    interactions = load_interactions(path, IngestOptions(max_bad_share=0.1))
    assert {c.decode() for c in interactions.customers} == {*tokens, "c"}
    assert {i.decode() for i in interactions.items} >= set(tokens)
    assert interactions.report.counts == {"weight not a positive number": 1}


def test_a_malformed_line_is_a_bad_row_not_a_refused_file(tmp_path):
    path = _write(tmp_path, "customer_id,item_id,timestamp\n" + GOOD + "c1,i1\nc1,i1,1700000000,extra\n")
    interactions = load_interactions(path)
    assert len(interactions) == 40 and interactions.report.total_rows == 42
    reason = "malformed line (wrong number of fields)"
    assert interactions.report.counts == {reason: 2}
    assert "'c1,i1' (2 fields, not 3)" in interactions.report.examples[reason][0]
    with pytest.raises(InvalidInput, match="too many bad rows"):
        load_interactions(path, IngestOptions(max_bad_share=0.01))


@pytest.mark.parametrize("compress", [False, True], ids=["csv", "csv.gz"])
def test_rows_after_a_malformed_line_keep_their_numbers(tmp_path, compress):
    """A skipped line is still a row of the file: the rows after it are named by their place in the file,
    so that an engineer finds the row the report shows."""
    text = ("customer_id,item_id\n" + '"c\nx",i9\n' + "c1,i1\n" * 19 + "\n" + "c1\n" + "c2,i2\n" * 3 + ",i3\n"
            + "c1,i1,x\n" + "c4,\n")  # a row over two lines counts once, a blank line not at all
    path = _write(tmp_path, gzip.compress(text.encode()) if compress else text, "i.csv.gz" if compress else "i.csv")
    report = load_interactions(path, IngestOptions(max_bad_share=0.5)).report
    assert report.examples["customer_id with a control character"][0].startswith("data row 1: ")
    assert report.examples["missing customer_id"][0].startswith("data row 25: ")
    assert report.examples["missing item_id"][0].startswith("data row 27: ")
    assert report.examples["malformed line (wrong number of fields)"] == [
        "data row 21: 'c1' (1 fields, not 2)", "data row 26: 'c1,i1,x' (3 fields, not 2)"]


@pytest.mark.parametrize("text", ["customer_id,item_id\n", "\ufeffcustomer_id,item_id\r\n", "customer_id,item_id"])
def test_a_file_with_only_a_header_says_so(tmp_path, text):
    result = CliRunner().invoke(train_cli, ["evaluate", "--interactions", str(_write(tmp_path, text))])
    assert result.exit_code == 2
    assert "i.csv: no data rows: the file holds only column names" in result.output
    assert "0 of 0 rows" not in result.output


def test_text_that_is_not_utf8_is_a_bad_row(tmp_path):
    rows = "".join(f"c{i % 7},i{i % 5},view\n" for i in range(40)).encode()
    path = _write(tmp_path, b"customer_id,item_id,event_type\n" + rows + b"caf\xe9,i1,view\nc1,i\xff,view\n")
    interactions = load_interactions(path)
    assert interactions.report.counts == {"text that is not UTF-8": 2} and len(interactions) == 40
    assert {c.decode() for c in interactions.customers} == {f"c{i}" for i in range(7)}


@pytest.mark.parametrize("header, message", [
    ("customer_id,customer_id,item_id", "names column(s) customer_id more than once"),
    ("customer_id,item_id,timestamp,Timestamp", "names column(s) timestamp more than once"),
])
def test_a_column_named_twice_is_refused(tmp_path, header, message):
    path = _write(tmp_path, header + "\nc1,c2,i1,1\n")
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_interactions(path)


def test_header_names_ignore_case_and_spaces(tmp_path):
    path = _write(tmp_path, "\ufeff Customer_ID ,ITEM_ID,Timestamp\n" + GOOD)
    interactions = load_interactions(path)
    assert len(interactions) == 40 and interactions.timestamp is not None


def test_empty_timestamps_are_missing_not_bad_unless_needed(tmp_path):
    path = _write(tmp_path, "customer_id,item_id,timestamp\n" + "".join(f"c{i},i{i % 3},\n" for i in range(20)))
    interactions = load_interactions(path)
    assert interactions.report.bad_rows == 0 and interactions.timestamp is None and len(interactions) == 20
    with pytest.raises(InvalidInput, match="missing timestamp"):
        load_interactions(path, IngestOptions(half_life_days=7))


def test_parquet_is_recognised_by_pq_suffix_and_by_content(tmp_path):
    table = pa.table({"customer_id": ["a", "b"], "item_id": ["x", "y"]})
    for name in ("t.pq", "t.PARQUET", "export.dat"):
        pq.write_table(table, tmp_path / name)
        assert len(load_interactions(tmp_path / name)) == 2


def test_a_share_just_over_the_limit_is_not_printed_as_equal(tmp_path):
    rows = "c,i,1\n" * 94_999 + "c,i,-1\n" * 5_001  # 5.001%
    path = _write(tmp_path, "customer_id,item_id,weight\n" + rows)
    with pytest.raises(InvalidInput, match=r"5\.001% > the allowed 5\.000%"):
        load_interactions(path)


def test_a_file_rewritten_while_it_is_read_is_refused(tmp_path, monkeypatch):
    path = _write(tmp_path, "customer_id,item_id\n" + "c1,i1\n" * 10)
    read = ingest.read_interactions_table

    def read_then_the_export_rewrites_it(file):
        raw = read(file)
        file.write_text("customer_id,item_id\n" + "c1,i1\n" * 20)
        return raw

    monkeypatch.setattr(ingest, "read_interactions_table", read_then_the_export_rewrites_it)
    with pytest.raises(InvalidInput, match="changed while it was read"):
        load_interactions(path)


# Several files as one input: a base history and the API's exported days (training.ingest.interactions_files).

DAY_HEADER = '"customer_id","item_id","event_type","timestamp","weight"\n'  # as `events export` writes it


def _day(tmp_path, name: str, rows: str = ""):
    """An exported day's file under events/; without rows, the header-only file of a day with no events."""
    (tmp_path / "events").mkdir(exist_ok=True)
    data = (DAY_HEADER + rows).encode()
    return _write(tmp_path / "events", gzip.compress(data) if name.endswith(".gz") else data, name)


def test_several_files_in_any_mix_of_formats_read_as_their_concatenation(tmp_path):
    """A Parquet base with integer ids, typed times and no event_type, then the days a pattern matches (one
    gzip'd, one header-only): the same interactions as one CSV holding every row in that order."""
    pq.write_table(pa.table({"customer_id": [7, 8, 8], "item_id": ["router", "phone", "case"],
                             "timestamp": pa.array(np.array([1_790_000_000, 1_790_000_100, 1_790_000_200],
                                                            dtype="datetime64[s]"))}), tmp_path / "base.parquet")
    _day(tmp_path, "2026-10-01.csv.gz", '"7","phone","purchase",2026-10-01 10:00:00Z,\n'
                                        '"alice","router","view",2026-10-01 11:00:00Z,2\n')
    _day(tmp_path, "2026-10-02.csv")
    _day(tmp_path, "2026-10-03.csv", '"8","router","click",1790933400,\n')
    one = _write(tmp_path, "customer_id,item_id,event_type,timestamp,weight\n7,router,,1790000000,\n"
                           "8,phone,,1790000100,\n8,case,,1790000200,\n7,phone,purchase,2026-10-01 10:00:00Z,\n"
                           "alice,router,view,2026-10-01 11:00:00Z,2\n8,router,click,1790933400,\n", "one.csv")
    several = load_interactions([tmp_path / "base.parquet", tmp_path / "events" / "*"])
    expected = load_interactions(one)
    assert _as_dict(several) == _as_dict(expected) == {
        ("7", "router"): 1, ("8", "phone"): 1, ("8", "case"): 1, ("7", "phone"): 8, ("alice", "router"): 2,
        ("8", "router"): 2}
    assert several.timestamp.tolist() == expected.timestamp.tolist()
    assert several.report.total_rows == 6 and several.report.bad_rows == 0
    assert [(Path(f["path"]).name, f["rows"]) for f in several.files] == [
        ("base.parquet", 3), ("2026-10-01.csv.gz", 2), ("2026-10-02.csv", 0), ("2026-10-03.csv", 1)]


def test_a_file_without_timestamps_among_timed_ones_has_rows_without_a_time(tmp_path):
    _write(tmp_path, "customer_id,item_id\nc1,i1\nc2,i2\n", "base.csv")
    _day(tmp_path, "2026-10-01.csv", '"c1","i2","view",1790000000,\n')
    interactions = load_interactions([tmp_path / "base.csv", tmp_path / "events" / "*.csv"])
    assert np.isnan(interactions.timestamp[:2]).all() and interactions.timestamp[2] == 1_790_000_000
    with pytest.raises(InvalidInput, match=r"base\.csv: no timestamp column, which time decay or the time holdout"):
        load_interactions([tmp_path / "base.csv", tmp_path / "events" / "*.csv"], IngestOptions(half_life_days=7))


def test_bad_rows_are_counted_over_every_file_and_named_by_file_and_row(tmp_path):
    """The threshold applies to the whole input: 1 bad row of 4 in one day is 25%, but 2 of 100 rows in all."""
    base = _write(tmp_path, "customer_id,item_id,weight\n" + "c1,i1,1\n" * 95 + ",i2,1\n", "base.csv")
    day = _day(tmp_path, "2026-10-01.csv", '"c2","i1","view",,\n"c3","i2","view",,-1\n"c3","i1",,,\n"c4","i1",,,\n')
    with pytest.raises(InvalidInput, match="too many bad rows"):
        load_interactions(day)
    interactions = load_interactions([base, day])
    assert interactions.report.total_rows == 100 and len(interactions) == 98
    assert interactions.report.counts == {"missing customer_id": 1, "weight not a positive number": 1}
    assert interactions.report.examples["missing customer_id"] == [
        f"{base}, data row 96: {{'customer_id': None, 'item_id': 'i2', 'weight': '1'}}"]
    assert interactions.report.examples["weight not a positive number"][0].startswith(f"{day}, data row 2: ")
    with pytest.raises(InvalidInput, match=r"2 interactions files \(.*base\.csv, .*2026-10-01\.csv\): too many bad "
                                           r"rows \(2.00% > the allowed 1.00%\)") as refused:
        load_interactions([base, day], IngestOptions(max_bad_share=0.01))
    assert f"e.g. {day}, data row 2: " in refused.value.message


def test_a_file_named_twice_is_read_once(tmp_path):
    base = _write(tmp_path, "customer_id,item_id\nc1,i1\n", "base.csv")
    interactions = load_interactions([base, tmp_path / "*.csv"])
    assert len(interactions) == 1 and [f["path"] for f in interactions.files] == [str(base)]


def test_one_file_keeps_the_fingerprint_of_its_bytes_and_several_fingerprint_every_file_with_rows(tmp_path):
    """A registry trained on one file stays up to date; another file with rows, or another file's bytes, is new
    data; a header-only file (a day without events) is none."""
    base = _write(tmp_path, "customer_id,item_id\nc1,i1\n", "base.csv")
    assert load_interactions(base).fingerprint == hashlib.sha256(base.read_bytes()).hexdigest()
    assert load_interactions([tmp_path / "base.*"]).fingerprint == load_interactions(base).fingerprint
    _day(tmp_path, "2026-10-01.csv")
    with_empty_day = load_interactions([base, tmp_path / "events" / "*.csv"]).fingerprint
    assert with_empty_day == load_interactions(base).fingerprint == FileFingerprints().input(
        [base, tmp_path / "events" / "2026-10-01.csv"])
    _day(tmp_path, "2026-10-02.csv", '"c2","i1","view",,\n')
    with_day = load_interactions([base, tmp_path / "events" / "*.csv"]).fingerprint
    assert with_day != with_empty_day
    assert load_interactions([base, tmp_path / "events" / "*.csv"]).fingerprint == with_day
    _day(tmp_path, "2026-10-02.csv", '"c2","i2","view",,\n')
    assert load_interactions([base, tmp_path / "events" / "*.csv"]).fingerprint != with_day
    # Reading order stays in it: under time decay the same rows in another order sum to other float32 strengths
    # (and ALS carries the difference on to other suggestions).
    assert load_interactions([tmp_path / "events" / "2026-10-02.csv", base]).fingerprint != with_day


@pytest.mark.parametrize("name, content, rowless", [
    ("day.csv", b"customer_id,item_id\n", True),
    ("day.csv", b"customer_id,item_id", True),
    ("day.csv", b"\xef\xbb\xbf\"Customer_ID\",item_id,timestamp\r\n\r\n", True),
    ("day.csv", b"customer_id,item_id\r", True),
    ("day.csv.gz", gzip.compress(DAY_HEADER.encode()), True),
    ("day.csv", b"customer_id,item_id\nc2,i1\n", False),
    ("day.csv", b"customer_id,item_id\n \n", False),  # a malformed row: counted in the bad share
    ("day.csv", b"customer_id,item_id\rc2,i1", False),
    ("day.csv.gz", gzip.compress(b"customer_id,item_id\nc2,i1\n"), False),
    ("day.csv.gz", b"customer_id,item_id\n", False),  # not gzip: ingest refuses it
    ("day.csv", b"customer,item_id\n", False),  # ingest refuses it: it must not be "up to date"
    ("day.csv", b"customer_id,item_id,Item_ID\n", False),
    ("day.csv", b"", False),
])
def test_only_a_file_that_surely_adds_no_row_leaves_the_fingerprint_as_it_was(tmp_path, name, content, rowless):
    """Whatever adds a row, or cannot be read, changes the fingerprint; where the export's header-only file
    leaves it, ingest reads no row from the file."""
    base = _write(tmp_path, "customer_id,item_id\nc1,i1\n", "base.csv")
    day = _write(tmp_path, content, name)
    assert (FileFingerprints().input([base, day]) == fingerprint_file(base)) is rowless
    if rowless:
        interactions = load_interactions([base, day])
        assert interactions.fingerprint == fingerprint_file(base)
        assert len(interactions) == 1 and interactions.files[1]["rows"] == 0


def test_a_parquet_file_without_rows_leaves_the_fingerprint_as_it_was(tmp_path):
    base = _write(tmp_path, "customer_id,item_id\nc1,i1\n", "base.csv")
    empty = tmp_path / "day.parquet"
    pq.write_table(pa.table({"customer_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string())}), empty)
    assert load_interactions([base, empty]).fingerprint == FileFingerprints().input([base, empty]) \
        == fingerprint_file(base)
    pq.write_table(pa.table({"customer_id": pa.array([], pa.float64()), "item_id": pa.array([], pa.string())}), empty)
    assert FileFingerprints().input([base, empty]) != fingerprint_file(base)
    with pytest.raises(InvalidInput, match="column customer_id holds double"):
        load_interactions([base, empty])
    pq.write_table(pa.table({"customer_id": ["c2"], "item_id": ["i1"]}), empty)
    assert load_interactions([base, empty]).fingerprint == FileFingerprints().input([base, empty]) \
        != fingerprint_file(base)


@pytest.mark.parametrize("command", ["fit", "evaluate"])
@pytest.mark.parametrize("second, message", [
    ("events/*.csv", "events/*.csv: no file matches this pattern"),
    ("events/2026-10-02.csv", "events/2026-10-02.csv: no such file"),
    ("events", "events: is a directory, not a file"),
])
def test_a_missing_file_or_a_pattern_that_matches_nothing_exits_2_before_reading(tmp_path, monkeypatch, command,
                                                                                 second, message):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "customer_id,item_id\nc1,i1\n", "base.csv")
    (tmp_path / "events").mkdir()
    _write(tmp_path / "events", "customer_id,item_id\nc1,i1\n", "2026-10-01.csv.gz")  # not *.csv
    args = [command, "--interactions", "base.csv", "--interactions", second,
            *(["--registry", "registry"] if command == "fit" else [])]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "registry" / "CURRENT").exists()


def test_an_input_of_header_only_files_is_refused_as_one_such_file_is(tmp_path):
    _day(tmp_path, "2026-10-01.csv")
    _day(tmp_path, "2026-10-02.csv")
    result = CliRunner().invoke(train_cli, ["evaluate", "--interactions", str(tmp_path / "events" / "*.csv")])
    assert result.exit_code == 2
    assert "2 interactions files (" in result.output
    assert "no data rows: every file holds only column names" in result.output


def test_file_fingerprints_hash_a_file_again_only_when_it_changed(tmp_path):
    base = _write(tmp_path, "customer_id,item_id\nc1,i1\n", "base.csv")
    fingerprints = FileFingerprints()
    first = fingerprints.file(base)
    assert first == fingerprint_file(base)
    assert load_interactions(base, fingerprints=fingerprints).fingerprint == first
    base.write_text("customer_id,item_id\nc1,i1\nc2,i1\n")  # rewritten since it was hashed: hashed again
    assert fingerprints.file(base) == fingerprint_file(base) != first
    assert load_interactions(base, fingerprints=fingerprints).fingerprint == fingerprint_file(base)


def test_catalog_tags_are_split_on_bars_and_aligned_with_the_item_index(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("item_id,title,category,tags\nrouter,Wi-Fi router,Broadband, home | wifi |home|\n"
                    "phone,Smartphone,Devices,\ncase,Phone case,Devices,accessory|phone\nghost,Gone,Misc,ghostly\n")
    catalog = load_catalog(path, np.array([b"case", b"phone", b"router", b"sim"]))
    tags = catalog.tags.toarray()
    # Tags in sorted order: accessory, home, phone, wifi; "ghostly" belongs to no traded item.
    assert tags.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]
    assert load_catalog(_write(tmp_path, "item_id,title\nphone,Smartphone\n", "plain.csv"),
                        np.array([b"phone"])).tags is None, "no tags column: no tags"
