"""recsvc-train events trim: the log's streams lose what it took before a time, and nothing an export or a running
experiment's report still needs."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import orjson
import pytest
from click.testing import CliRunner

from recsvc import event_log
from recsvc.cache import event_stream_key
from recsvc.event_log import EVENT, EXPOSURE, FEEDBACK, KINDS, RedisStreams
from recsvc.experiments import ExperimentRouter, parse_experiments
from tests.conftest import free_port
from tests.test_events_export import export, post, redis_now, rows_of
from tests.test_feedback import redis_app  # noqa: F401 (fixture)
from training.cli import main
from training.event_trim import shown_time

T = 1_764_460_800_000  # 2025-11-30T00:00:00Z in milliseconds, in the past: the trim time of most tests
T_ISO = "2025-11-30T00:00:00Z"


def trim(redis_url: str, *options: str):
    return CliRunner().invoke(main, ["events", "trim", "--redis-url", redis_url, *options])


def log(client, kind: str, entry_id: str, **record) -> None:
    """A record as the event log keeps it, under an explicit stream entry id ("<ms>-<seq>"): the time the log
    took it."""
    client.xadd(event_stream_key(kind), {"r": orjson.dumps({"kind": kind, **record})}, id=entry_id)


def ids(client, kind: str) -> list[str]:
    return [entry_id.decode() for entry_id, _fields in client.xrange(event_stream_key(kind))]


# Entries around T: three the log took before it (a second, a millisecond, and a later one of that millisecond)
# and three at or after it (T itself, a later one of T's millisecond, a millisecond later).
BEFORE = [f"{T - 1000}-0", f"{T - 1}-0", f"{T - 1}-7"]
FROM_T = [f"{T}-0", f"{T}-3", f"{T + 1}-0"]


def around_t(client, kind: str = EVENT) -> None:
    for n, entry_id in enumerate(BEFORE + FROM_T):
        log(client, kind, entry_id, event_id=f"e{n}", customer_id="c-1", item_id=f"SKU-{n}", request_id=f"r{n}",
            action="accepted", experiment="exp", variant="a", strategy="als", time=T / 1000)


def publish(client, **statuses: str) -> None:
    """Experiment definitions as the servers publish them to Redis at start-up."""
    definitions = parse_experiments({"experiments": [
        {"name": name, "salt": name, "status": status, "control": "a",
         "variants": [{"name": "a", "strategy": "als", "weight": 1}, {"name": "b", "strategy": "popular", "weight": 1}]}
        for name, status in statuses.items()]})
    ExperimentRouter(definitions, event_log=None).publish(client)


def test_entries_the_log_took_before_the_time_go_exactly_and_the_others_stay(redis_client, redis_url):
    for kind in KINDS:
        around_t(redis_client, kind)
    result = trim(redis_url, "--before", T_ISO)
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"event ({event_stream_key(EVENT)}): removed 3 entries the log took before "
                             "2025-11-30T00:00:00.000Z, 3 left\n")
    assert ids(redis_client, EVENT) == FROM_T
    # the default is the event stream alone: experiment reports read the other two
    assert ids(redis_client, FEEDBACK) == ids(redis_client, EXPOSURE) == BEFORE + FROM_T
    again = trim(redis_url, "--before", str(T / 1000))  # Unix seconds read the same; nothing left to remove
    assert again.exit_code == 0 and "removed 0 entries" in again.output and "3 left" in again.output


def test_a_long_stream_is_trimmed_in_steps_to_the_exact_millisecond(redis_client, redis_url, monkeypatch):
    monkeypatch.setattr(event_log, "TRIM_STEP", 1_000)  # Redis nodes hold 100 entries: several steps, then the rest
    pipe = redis_client.pipeline(transaction=False)
    for n in range(20_000):
        pipe.xadd(event_stream_key(EVENT), {"r": b"{}"}, id=f"{T - 20_000 + n}-0")
    for n in range(555):
        pipe.xadd(event_stream_key(EVENT), {"r": b"{}"}, id=f"{T + n}-0")
    pipe.execute()
    result = trim(redis_url, "--before", T_ISO)
    assert result.exit_code == 0 and "removed 20,000 entries" in result.output and "555 left" in result.output
    assert redis_client.xlen(event_stream_key(EVENT)) == 555 and ids(redis_client, EVENT)[0] == f"{T}-0"


def test_a_dry_run_counts_what_would_go_and_changes_nothing(redis_client, redis_url):
    around_t(redis_client, EVENT)
    around_t(redis_client, FEEDBACK)
    log(redis_client, FEEDBACK, f"{T + 2}-0", request_id="r9", customer_id="c-2", item_id="SKU-9", action="shown")
    result = trim(redis_url, "--before", T_ISO, "--dry-run", "--stream", "feedback", "--stream", "event")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"feedback ({event_stream_key(FEEDBACK)}): would remove 3 entries the log took before "
        "2025-11-30T00:00:00.000Z, 4 would be left",
        f"event ({event_stream_key(EVENT)}): would remove 3 entries the log took before 2025-11-30T00:00:00.000Z, "
        "3 would be left"]
    assert ids(redis_client, EVENT) == BEFORE + FROM_T
    assert ids(redis_client, FEEDBACK) == BEFORE + FROM_T + [f"{T + 2}-0"]


def test_export_until_then_trim_before_the_same_time_loses_no_event(
        redis_app, redis_client, redis_url, auth, tmp_path):  # noqa: F811
    def batch(name: str) -> None:
        post(redis_app, auth, [{"customer_id": name, "item_id": f"SKU-{n}"} for n in range(3)])
        time.sleep(0.02)

    batch("yesterday")
    cut = dt.datetime.fromtimestamp(time.time(), dt.timezone.utc).isoformat()
    time.sleep(0.02)
    batch("today")
    assert export(redis_url, tmp_path / "yesterday.csv", "--until", cut).exit_code == 0
    trimmed = trim(redis_url, "--before", cut)
    assert trimmed.exit_code == 0 and "removed 3 entries" in trimmed.output and "3 left" in trimmed.output
    batch("tonight")  # arrives after the trim
    assert export(redis_url, tmp_path / "today.csv", "--since", cut).exit_code == 0
    assert [row[0] for row in rows_of(tmp_path / "yesterday.csv")] == ["yesterday"] * 3
    assert [row[0] for row in rows_of(tmp_path / "today.csv")] == ["today"] * 3 + ["tonight"] * 3


@pytest.mark.parametrize("options, message", [
    (["--before", "yesterday"], "Invalid value for '--before'"),
    (["--before", "40000000000"], "out of range"),
    (["--before", T_ISO, "--stream", "events"], "Invalid value for '--stream'"),
    ([], "Missing option '--before'"),
    (["--before", T_ISO, "--redis-url", "http://127.0.0.1:6379"], "is not a Redis URL"),
    (["--before", T_ISO, "--redis-url", ""], "pass --redis-url or set RECSVC_REDIS_URL"),
])
def test_bad_options_exit_2_with_a_message_before_redis_is_asked(options, message):
    port = free_port()  # nothing listens: an option checked after connecting would exit 1 instead
    result = CliRunner().invoke(
        main, ["events", "trim", "--redis-url", f"redis://127.0.0.1:{port}/0", *options],
        env={"RECSVC_REDIS_URL": None})
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr


def test_export_until_a_time_ahead_of_redis_clock_then_trim_before_it_loses_no_event(
        redis_app, redis_client, redis_url, auth, tmp_path):  # noqa: F811
    post(redis_app, auth, [{"customer_id": "early", "item_id": "SKU-1"}])
    cut = f"{redis_now(redis_client) + 1.5:.3f}"  # "now" by a cron machine's clock 1.5 s ahead of Redis's
    # taken while the export runs, before the cut by Redis's clock: the export must hold it, since the trim removes it
    late = threading.Timer(0.5, post, [redis_app, auth, [{"customer_id": "late", "item_id": "SKU-2"}]])
    late.start()
    exported = export(redis_url, tmp_path / "until.csv", "--until", cut)
    late.join()
    assert exported.exit_code == 0, exported.output
    assert [row[0] for row in rows_of(tmp_path / "until.csv")] == ["early", "late"]
    post(redis_app, auth, [{"customer_id": "after", "item_id": "SKU-3"}])
    trimmed = trim(redis_url, "--before", cut)
    assert trimmed.exit_code == 0 and "removed 2 entries" in trimmed.output and "1 left" in trimmed.output
    assert export(redis_url, tmp_path / "since.csv", "--since", cut).exit_code == 0
    assert [row[0] for row in rows_of(tmp_path / "since.csv")] == ["after"]
    waited = f"--until {shown_time(float(cut))} is "
    assert waited in exported.stderr and "ahead of Redis's clock: waiting for it to pass" in exported.stderr


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_time_a_little_ahead_of_redis_clock_waits_for_it_so_what_the_log_takes_until_then_goes_too(
        redis_client, redis_url, dry_run):
    now = redis_now(redis_client)
    log(redis_client, EVENT, f"{int(now * 1000) - 5000}-0", event_id="e1")
    before = f"{now + 1:.3f}"
    record = {"kind": EVENT, "event_id": "e2", "customer_id": "c-1", "item_id": "SKU-1", "time": now}
    late = threading.Timer(0.3, RedisStreams(redis_client, dedupe_ttl=60).add, [record])  # before `before`
    late.start()
    result = trim(redis_url, "--before", before, *(["--dry-run"] if dry_run else []))
    late.join()
    assert result.exit_code == 0, result.output
    if dry_run:
        assert "would remove 2 entries" in result.stdout and "0 would be left" in result.stdout
        assert len(ids(redis_client, EVENT)) == 2
    else:
        assert "removed 2 entries" in result.stdout and "0 left" in result.stdout
        assert ids(redis_client, EVENT) == []
    waited = f"--before {shown_time(float(before))} is "
    assert waited in result.stderr and "ahead of Redis's clock: waiting for it to pass" in result.stderr


@pytest.mark.parametrize("skew, ahead, exit_code", [
    (0, 90, 2),  # a typo or a wrong zone, not a clock difference: it would remove what no export has read yet
    (120, 90, 2),  # this machine's clock 2 minutes ahead of Redis's: "now" by it is still too far ahead
    (-120, -1, 0),  # this machine's clock 2 minutes behind: a time Redis's clock has passed is taken
])
def test_how_far_ahead_a_time_is_is_judged_by_redis_clock_not_this_machines(
        redis_client, redis_url, monkeypatch, skew, ahead, exit_code):
    now = redis_now(redis_client)
    log(redis_client, EVENT, f"{int(now * 1000) - 5000}-0", event_id="e1")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    before = f"{now + ahead:.3f}"
    result = trim(redis_url, "--before", before)
    assert result.exit_code == exit_code, result.output
    if exit_code == 2:
        assert f"--before {shown_time(float(before))} is more than 60 s ahead of Redis's clock (" in result.stderr
        assert "; give a time at most 60 s ahead of Redis's clock (a time ahead is waited for)" in result.stderr
        assert "Traceback" not in result.stderr and ids(redis_client, EVENT) == [f"{int(now * 1000) - 5000}-0"]
    else:
        assert "removed 1 entries" in result.stdout and ids(redis_client, EVENT) == []


def test_a_typo_far_in_the_future_is_refused_and_removes_nothing(redis_client, redis_url):
    log(redis_client, EVENT, f"{T}-0", event_id="e1")
    result = trim(redis_url, "--before", "2062-01-01")  # for 2026
    assert result.exit_code == 2
    assert "--before 2062-01-01T00:00:00.000Z is more than 60 s ahead of Redis's clock (" in result.stderr
    assert ids(redis_client, EVENT) == [f"{T}-0"]


def test_an_unreachable_redis_exits_1_naming_the_url_without_its_password():
    result = trim(f"redis://:secret@127.0.0.1:{free_port()}/0", "--before", T_ISO)
    assert result.exit_code == 1
    assert "cannot trim the event log in redis://***@127.0.0.1:" in result.stderr
    assert "secret" not in result.output and "Traceback" not in result.stderr


def report(redis_url: str, name: str) -> dict:
    result = CliRunner().invoke(main, ["experiments", "report", name, "--redis-url", redis_url,
                                                       "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def experiment_log(client) -> None:
    """Experiment "checkout" (running) from 1 s before T on, "banner" (stopped) before that; each exposure with
    an accept."""
    for n, (entry_ms, name) in enumerate([(T - 5000, "banner"), (T - 4000, "banner"), (T - 1000, "checkout"),
                                          (T - 500, "checkout"), (T + 1000, "checkout")]):
        log(client, EXPOSURE, f"{entry_ms}-0", request_id=f"r{n}", customer_id=f"c{n}", experiment=name,
            variant="ab"[n % 2], strategy="als", time=entry_ms / 1000)
        log(client, FEEDBACK, f"{entry_ms + 1}-0", request_id=f"r{n}", customer_id=f"c{n}", item_id="SKU-1",
            action="accepted", time=entry_ms / 1000)


@pytest.mark.parametrize("streams", [["exposure", "feedback"], ["feedback"], ["exposure"]])
def test_trimming_a_running_experiments_exposures_or_feedback_is_refused_and_its_report_kept(
        redis_client, redis_url, streams):
    experiment_log(redis_client)
    publish(redis_client, checkout="running", banner="stopped")
    before = report(redis_url, "checkout")
    options = [option for stream in streams for option in ("--stream", stream)]
    for dry_run in ([], ["--dry-run"]):
        result = trim(redis_url, "--before", T_ISO, *options, *dry_run)
        assert result.exit_code == 3, result.output
        assert ("experiment checkout (running) has 2 exposures the log took before 2025-11-30T00:00:00.000Z, the "
                "first at 2025-11-29T23:59:59.000Z") in result.stderr
        assert "--before 2025-11-29T23:59:59.000Z or earlier" in result.stderr and "Traceback" not in result.stderr
    assert "would remove" in result.stdout  # the dry run still counts
    assert redis_client.xlen(event_stream_key(EXPOSURE)) == redis_client.xlen(event_stream_key(FEEDBACK)) == 5
    assert report(redis_url, "checkout") == before
    # the time it suggests takes only the stopped experiment's records, with a warning naming it; checkout's
    # figures stay (only the count of feedback matching no exposure grows when banner's exposures go alone)
    result = trim(redis_url, "--before", "2025-11-29T23:59:59.000Z", *options)
    assert result.exit_code == 0, result.output
    assert "warning: experiment banner (stopped) has 2 exposures" in result.stderr
    assert "experiment reports count only the exposures and feedback left in the log" in result.stderr
    assert all("removed 2 entries" in line and "3 left" in line for line in result.stdout.splitlines())
    assert report(redis_url, "checkout")["variants"] == before["variants"]


def test_an_experiment_not_published_to_redis_is_protected_and_allow_report_loss_trims_anyway(
        redis_client, redis_url):
    experiment_log(redis_client)
    publish(redis_client, banner="stopped")  # checkout's servers never published it
    refused = trim(redis_url, "--before", T_ISO, "--stream", "exposure", "--stream", "feedback")
    assert refused.exit_code == 3 and "experiment checkout (not published to Redis)" in refused.stderr
    forced = trim(redis_url, "--before", T_ISO, "--stream", "exposure", "--stream", "feedback", "--allow-report-loss")
    assert forced.exit_code == 0, forced.output
    assert "warning: experiment checkout (not published to Redis) has 2 exposures" in forced.stderr
    assert "its report no longer counts them and their feedback" in forced.stderr
    assert ids(redis_client, EXPOSURE) == [f"{T + 1000}-0"] and ids(redis_client, FEEDBACK) == [f"{T + 1001}-0"]
