"""recsvc-train events export: the events the API kept, as an interactions file that fit reads as is."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from recsvc.cache import event_seen_key, event_stream_key
from recsvc.event_log import EVENT, RedisStreams
from tests.conftest import free_port
from tests.test_feedback import redis_app  # noqa: F401 (fixture)
from training.cli import main
from training.ingest import load_interactions

HEADER = "customer_id,item_id,event_type,timestamp,weight"


def export(redis_url: str, out, *options: str):
    return CliRunner().invoke(main, ["events", "export", "--redis-url", redis_url, "--out", str(out), *options])


def rows_of(path) -> list[tuple]:
    """(customer, item, event type, Unix seconds, weight) per row."""
    table = pq.read_table(path) if path.suffix == ".parquet" else \
        pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    micros = table.column("timestamp").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
    return list(zip(table.column("customer_id").to_pylist(), table.column("item_id").to_pylist(),
                    table.column("event_type").to_pylist(), (micros / 1e6).round(3).tolist(),
                    table.column("weight").to_pylist()))


def redis_now(client) -> float:
    """Redis's clock (TIME), which stamps stream entry ids, in Unix seconds."""
    seconds, microseconds = client.time()
    return seconds + microseconds / 1e6


def post(app, auth, events: list[dict]) -> None:
    assert app.test_client().post("/v1/events", headers=auth, json=events).status_code == 202


def test_posted_events_export_with_their_own_time_else_when_received_their_type_and_weight(
        redis_app, redis_client, redis_url, auth, tmp_path):  # noqa: F811
    before = time.time()
    post(redis_app, auth, [
        {"customer_id": "c-1", "item_id": "SKU-1", "event_type": "view", "timestamp": "2026-11-01T10:00:00.250Z",
         "weight": 2.5},
        {"customer_id": "c-1", "item_id": "SKU-2", "event_type": "purchase"},
        {"customer_id": "c-2", "item_id": "SKU-1", "timestamp": 1_790_000_000}])
    after = time.time()
    out = tmp_path / "events.csv"
    result = export(redis_url, out)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote 3 events to {out}"
    assert out.read_text(encoding="utf-8").splitlines()[0].replace('"', "") == HEADER
    first, received, third = rows_of(out)
    iso = dt.datetime(2026, 11, 1, 10, 0, 0, 250_000, tzinfo=dt.timezone.utc).timestamp()
    assert first == ("c-1", "SKU-1", "view", iso, 2.5)
    assert received[:3] == ("c-1", "SKU-2", "purchase") and received[4] is None
    assert before - 0.001 <= received[3] <= after + 0.001
    assert third == ("c-2", "SKU-1", None, 1_790_000_000.0, None)
    # what training makes of them: event-type weight x weight (view 1, purchase 8, no type 1)
    interactions = load_interactions(out)
    strengths = {(interactions.customers[c].decode(), interactions.items[i].decode()): s
                 for c, i, s in zip(interactions.customer, interactions.item, interactions.strength)}
    assert strengths == {("c-1", "SKU-1"): 2.5, ("c-1", "SKU-2"): 8.0, ("c-2", "SKU-1"): 1.0}


def test_since_and_until_select_by_when_the_log_took_the_events_so_windows_export_each_once(
        redis_app, redis_client, redis_url, auth, tmp_path):  # noqa: F811
    def batch(name: str) -> None:
        # an old timestamp of its own does not move an event out of the window it arrived in
        post(redis_app, auth, [{"customer_id": name, "item_id": f"SKU-{n}", "timestamp": "2020-01-01"}
                               for n in range(3)])
        time.sleep(0.02)

    batch("early")
    first_cut = time.time()
    time.sleep(0.02)
    batch("middle")
    second_cut = time.time()
    time.sleep(0.02)
    batch("late")
    iso_cut = dt.datetime.fromtimestamp(first_cut, dt.timezone.utc).isoformat()  # ISO-8601 reads the same
    windows = {"before": ["--until", str(first_cut)], "middle": ["--since", iso_cut, "--until", str(second_cut)],
               "after": ["--since", str(second_cut)], "all": []}
    customers = {}
    for name, options in windows.items():
        result = export(redis_url, tmp_path / f"{name}.csv", *options)
        assert result.exit_code == 0, result.output
        customers[name] = [row[0] for row in rows_of(tmp_path / f"{name}.csv")]
    assert customers["before"] == ["early"] * 3 and customers["middle"] == ["middle"] * 3
    assert customers["after"] == ["late"] * 3
    assert customers["before"] + customers["middle"] + customers["after"] == customers["all"]


def test_an_event_retried_with_its_event_id_is_exported_once(redis_app, redis_client, redis_url, auth,  # noqa: F811
                                                             tmp_path):
    event = {"customer_id": "c-1", "item_id": "SKU-1", "event_type": "click", "event_id": "evt-0001"}
    post(redis_app, auth, [event])
    post(redis_app, auth, [event])  # a retry: the log keeps it once
    # a retry that came after the log's dedupe window (RECSVC_EVENT_DEDUPE_TTL) is in the stream twice
    record = {"kind": EVENT, "customer_id": "c-1", "item_id": "SKU-2", "event_id": "evt-0002", "timestamp": None,
              "time": time.time()}
    streams = RedisStreams(redis_client, dedupe_ttl=60)
    streams.add(record)
    redis_client.delete(*redis_client.keys(event_seen_key("*")))  # the window passed
    streams.add(record)
    assert len(list(streams.read(EVENT))) == 3
    out = tmp_path / "events.csv"
    result = export(redis_url, out)
    assert result.exit_code == 0, result.output
    assert "wrote 2 events" in result.output and "1 repeated event_ids left out" in result.output
    assert [row[:3] for row in rows_of(out)] == [("c-1", "SKU-1", "click"), ("c-1", "SKU-2", None)]


def test_an_unreachable_redis_exits_1_with_a_message_and_leaves_the_file_as_it_was(tmp_path):
    out = tmp_path / "events.csv"
    out.write_text("yesterday's export\n", encoding="utf-8")
    result = export(f"redis://:secret@127.0.0.1:{free_port()}/0", out)
    assert result.exit_code == 1
    assert "cannot read the event log from redis://***@127.0.0.1:" in result.output
    assert f"; {out} not written" in result.output
    assert "secret" not in result.output and "Traceback" not in result.output
    assert out.read_text(encoding="utf-8") == "yesterday's export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["events.csv"]  # no temporary file left behind


@pytest.mark.parametrize("skew", [0, 120])
def test_an_until_more_than_a_minute_ahead_of_redis_clock_is_refused_also_on_a_machine_whose_clock_is_ahead(
        redis_client, redis_url, tmp_path, monkeypatch, skew):
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)  # this machine's clock `skew` s ahead of Redis's
    until = redis_now(redis_client) + 90
    result = export(redis_url, tmp_path / "events.csv", "--until", f"{until:.3f}")
    assert result.exit_code == 2, result.output
    assert "is more than 60 s ahead of Redis's clock (" in result.stderr and "Traceback" not in result.stderr
    assert "; give a time at most 60 s ahead of Redis's clock (a time ahead is waited for)" in result.stderr
    assert "the file would lack the events the log takes until then" in result.stderr
    assert not (tmp_path / "events.csv").exists()


@pytest.mark.parametrize("options, message", [
    (["--since", "yesterday"], "Invalid value for '--since'"),
    (["--until", "40000000000"], "out of range"),  # the year 3237
    (["--since", "2026-12-01", "--until", "2026-11-30"], "--since must be before --until"),
    (["--out-name", "events.json"], "end the name in .csv, .csv.gz or .parquet"),
    (["--out-name", "missing/events.csv"], "No such file or directory"),
    (["--redis-url", "http://127.0.0.1:6379"], "--redis-url 'http://127.0.0.1:6379' is not a Redis URL"),
    (["--redis-url", ""], "pass --redis-url or set RECSVC_REDIS_URL"),
])
def test_bad_options_exit_2_with_a_message_before_redis_is_asked(tmp_path, options, message):
    port = free_port()  # nothing listens: an option checked after connecting would exit 1 instead
    out = tmp_path / "events.csv"
    if options[0] == "--out-name":
        out, options = tmp_path / options[1], []
    arguments = ["events", "export", "--redis-url", f"redis://127.0.0.1:{port}/0", "--out", str(out), *options]
    result = CliRunner().invoke(main, arguments, env={"RECSVC_REDIS_URL": None})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_exported_events_train_with_fit_in_every_format_and_an_empty_export_is_refused_by_it(
        redis_client, redis_url, demo_paths, tmp_path):
    """The demo interactions, kept by the real event log as the API keeps events, come back as the same data."""
    demo = pacsv.read_csv(demo_paths["interactions"]).to_pylist()
    received = time.time()
    RedisStreams(redis_client, dedupe_ttl=3600).add_many([
        {"kind": EVENT, "event_id": uuid.uuid4().hex, "customer_id": row["customer_id"], "item_id": row["item_id"],
         "event_type": row["event_type"], "timestamp": row["timestamp"].timestamp(), "time": received}
        for row in demo])
    original = load_interactions(demo_paths["interactions"])
    for name in ("events.csv", "events.csv.gz", "events.parquet"):
        result = export(redis_url, tmp_path / name)
        assert result.exit_code == 0 and f"wrote {len(demo):,} events" in result.output, result.output
        exported = load_interactions(tmp_path / name)
        assert exported.report.bad_rows == 0
        assert np.array_equal(exported.customers, original.customers)
        assert np.array_equal(exported.items, original.items)
        assert (exported.matrix() != original.matrix()).nnz == 0
        assert np.array_equal(exported.timestamp, original.timestamp)
    assert pq.read_schema(tmp_path / "events.parquet").names == HEADER.split(",")

    fit = CliRunner().invoke(main, ["fit", "--interactions", str(tmp_path / "events.csv"), "--registry",
                                    str(tmp_path / "registry"), "--strategies", "als", "--quiet"])
    assert fit.exit_code == 0 and "published" in fit.output, fit.output

    nothing = export(redis_url, tmp_path / "empty.csv", "--since", str(time.time() + 60))
    assert nothing.exit_code == 0 and "wrote 0 events" in nothing.output and "only the header" in nothing.output
    assert "beside other interactions files" in nothing.output  # they are read as one input: no concatenating
    assert (tmp_path / "empty.csv").read_text(encoding="utf-8").replace('"', "").strip() == HEADER
    refused = CliRunner().invoke(main, ["fit", "--interactions", str(tmp_path / "empty.csv"), "--registry",
                                        str(tmp_path / "registry")])
    assert refused.exit_code == 2 and "no data rows" in refused.output


def generated_events(count: int, repeats: dict[int, int]):
    """`count` event records, oldest first; record i takes the event_id of record repeats[i] (a late retry)."""
    for n in range(count):
        yield {"kind": EVENT, "event_id": f"{repeats.get(n, n):032x}", "timestamp": None, "customer_id": f"C{n % 997}",
               "item_id": f"SKU-{n % 89}", "event_type": "view", "time": 1_790_000_000 + n / 1000}


def test_a_long_stream_is_exported_once_per_event_id_without_holding_every_id(tmp_path, monkeypatch):
    """Copies of an event_id are days apart in the log (after its dedupe window), so export cannot dedupe within
    a window; it must not keep every id either. Peak traced by tracemalloc: 15.0 MB with every id in a set of
    strings, 4.5 MB with an 8-byte hash each (0.8 MB of them)."""
    import tracemalloc

    from training import event_export

    monkeypatch.setattr(event_export, "BATCH_ROWS", 1_000)  # the batch, held either way, out of the figure
    count, repeats = 100_000, {99_990: 5, 99_995: 50_000, 99_999: 5}
    tracemalloc.start()
    try:
        result = event_export.export_events(lambda: generated_events(count, repeats), tmp_path / "events.csv")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (result.rows, result.repeated) == (count - 3, 3)
    customers = [row[0] for row in rows_of(tmp_path / "events.csv")]
    assert customers == [f"C{n % 997}" for n in range(count) if n not in repeats]  # the first copy, in order
    assert peak < 8_000_000, f"peak {peak / 1e6:.1f} MB"


def test_a_stream_trimmed_between_the_two_passes_is_an_error_and_no_file(tmp_path):
    from training.event_export import export_events

    passes = iter([generated_events(10, {9: 1}), generated_events(6, {})])
    out = tmp_path / "events.csv"
    with pytest.raises(Exception, match="the event stream changed while it was exported"):
        export_events(lambda: next(passes), out)
    assert not out.exists()
    # events the log took after the first pass wait for the next export
    passes = iter([generated_events(10, {9: 1}), generated_events(12, {9: 1})])
    assert export_events(lambda: next(passes), out).rows == 9 and len(rows_of(out)) == 9


def test_records_without_an_event_id_are_each_exported_as_themselves(redis_client, redis_url, tmp_path):
    """The API gives every event an event_id; a record written to the stream by other means may lack one. Nothing
    says such a record is a copy, and two equal interactions can both be real (one item bought twice), so each
    counts: before, all records without an event_id counted as one event."""
    received = time.time()
    without_id = [{"kind": EVENT, "customer_id": "c-1", "item_id": f"SKU-{n}", "event_type": "view",
                   "timestamp": None, "time": received + n} for n in range(3)]
    twice = {"kind": EVENT, "customer_id": "c-2", "item_id": "SKU-9", "event_type": "purchase", "timestamp": 1.5e9,
             "time": received}
    with_id = {"kind": EVENT, "event_id": "evt-7", "customer_id": "c-3", "item_id": "SKU-1", "timestamp": None,
               "time": received}
    for record in [*without_id, twice, twice, with_id, with_id]:
        redis_client.xadd(event_stream_key(EVENT), {"r": json.dumps(record)})
    out = tmp_path / "events.csv"
    result = export(redis_url, out)
    assert result.exit_code == 0, result.output
    assert "wrote 6 events" in result.output and "1 repeated event_ids left out" in result.output
    assert [row[:2] for row in rows_of(out)] == [("c-1", "SKU-0"), ("c-1", "SKU-1"), ("c-1", "SKU-2"),
                                                 ("c-2", "SKU-9"), ("c-2", "SKU-9"), ("c-3", "SKU-1")]
