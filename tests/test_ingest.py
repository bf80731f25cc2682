"""Reading the interaction contract: CSV, CSV.gz and Parquet, bad rows, and the CLI's refusal of unusable files."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from recsvc.errors import InvalidInput
from training.cli import main as train_cli
from training.ingest import IngestOptions, load_catalog, load_interactions

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
        ("bob", "phone"): 1, ("bob", "case"): 2 * 0.5,  # carol's row has no timestamp: rejected
    }
    assert list(interactions.customers) == [b"alice", b"bob"]  # sorted: position = id index


def test_timestamps_accept_iso_and_unix_seconds(csv_path):
    interactions = load_interactions(csv_path, IngestOptions(max_bad_share=0.5))
    # carol's empty timestamp is a bad row: 4 usable rows remain
    assert len(interactions) == 4
    assert interactions.report.counts == {"timestamp not ISO-8601 or Unix seconds": 1}
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
])
def test_bad_rows_are_counted_by_reason_with_examples(tmp_path, row, reason):
    path = tmp_path / "bad.csv"
    path.write_text("customer_id,item_id,event_type\n" + "ok,item,view\n" * 9 + row + "\n")
    interactions = load_interactions(path, IngestOptions(max_bad_share=0.2))
    assert interactions.report.counts == {reason: 1}
    assert interactions.report.examples[reason][0].startswith("row 11:")
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
