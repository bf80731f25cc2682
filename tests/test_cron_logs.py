"""Every command a cron job runs speaks --quiet and --log-format json: JSON lines on stderr (errors with their
exit_code and counts as fields), the result as one JSON line on stdout, text output as before."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner

from recsvc import artifacts
from recsvc.cache import event_stream_key
from recsvc.event_log import EVENT, FEEDBACK
from tests.conftest import free_port
from tests.test_events_export import redis_now
from tests.test_events_trim import FROM_T, T_ISO, T, around_t, experiment_log, log, publish
from tests.test_nightly import ENV, RECSVC_TRAIN, lock_held, nightly_config
from tests.test_registry import publish as publish_version
from training.cli import main

T_SHOWN = "2025-11-30T00:00:00.000Z"  # T_ISO as the commands show times: UTC, milliseconds


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), env={"RECSVC_REDIS_URL": None})


def json_lines(text: str) -> list[dict]:
    """Every line parsed as JSON: fails on any plain-text line."""
    return [json.loads(line) for line in text.splitlines()]


def summary_of(result) -> dict:
    """The one JSON line on stdout."""
    [summary] = json_lines(result.stdout)
    return summary


def one_error(result, exit_code: int) -> dict:
    """The run failed with `exit_code`, said so in exactly one JSON line on stderr and printed nothing on stdout."""
    assert result.exit_code == exit_code, result.output
    [error] = json_lines(result.stderr)
    assert error["level"] == "error" and error["exit_code"] == exit_code and error["ts"]
    assert "Traceback" not in result.output and result.stdout == ""
    return error


@pytest.fixture
def registry(tmp_path):
    """Three versions, v12 current, as test_registry writes them."""
    for day, ndcg in ((10, 0.30), (11, 0.31), (12, 0.32)):
        publish_version(tmp_path / "registry", f"v{day}", ndcg)
    return tmp_path / "registry"


# --- events export ----------------------------------------------------------------------------------------------


def test_export_in_json_mode_prints_its_figures_as_one_line_and_nothing_else(redis_client, redis_url, tmp_path):
    for n, event_id in enumerate(["e1", "e2", "e2"]):  # e2 retried after the log's dedupe window: in it twice
        log(redis_client, EVENT, f"{T + n}-0", customer_id="c-1", item_id=f"SKU-{n}", event_id=event_id,
            time=T / 1000)
    out = tmp_path / "events.csv"
    for quiet in ([], ["--quiet"]):
        result = invoke("events", "export", "--redis-url", redis_url, "--out", str(out), "--since", T_ISO,
                        "--log-format", "json", *quiet)
        assert result.exit_code == 0, result.output
        assert summary_of(result) == {"event": "summary", "outcome": "written", "events": 2, "repeated": 1,
                                      "path": str(out), "since": T_SHOWN, "until": None}
        assert result.stderr == ""
    text = invoke("events", "export", "--redis-url", redis_url, "--out", str(out))
    assert text.stdout == f"wrote 2 events to {out} (1 repeated event_ids left out)\n"


@pytest.mark.parametrize("options, exit_code, message", [
    (["--since", "yesterday"], 2, "Invalid value for '--since': 'yesterday'"),
    (["--since", "2026-12-01", "--until", "2026-11-30"], 2, "--since must be before --until"),
    (["--redis-url", ""], 2, "pass --redis-url or set RECSVC_REDIS_URL"),
    (["--redis-url", "redis://:secret@127.0.0.1:{dead}/0"], 1, "cannot read the event log from redis://***@127.0.0.1:"),
    (["--out-missing"], 2, "Missing option '--out'"),
])
def test_export_errors_in_json_mode_are_one_json_line_with_the_exit_code(tmp_path, options, exit_code, message):
    out = ["--out", str(tmp_path / "events.csv")]
    if options == ["--out-missing"]:
        out, options = [], []
    options = [option.format(dead=free_port()) for option in options]
    result = invoke("events", "export", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", *out, *options,
                    "--log-format", "json")
    error = one_error(result, exit_code)
    assert message in error["message"] and "secret" not in result.output
    assert not (tmp_path / "events.csv").exists()


# --- events trim ------------------------------------------------------------------------------------------------


def test_trim_in_json_mode_prints_per_stream_removed_and_left_as_one_line(redis_client, redis_url):
    around_t(redis_client)
    counted = invoke("events", "trim", "--redis-url", redis_url, "--before", T_ISO, "--dry-run", "--log-format", "json")
    assert counted.exit_code == 0, counted.output
    event = {"key": event_stream_key(EVENT), "removed": 3, "left": 3}
    assert summary_of(counted) == {"event": "summary", "outcome": "counted", "before": T_SHOWN, "dry_run": True,
                                   "streams": {"event": event}}
    trimmed = invoke("events", "trim", "--redis-url", redis_url, "--before", T_ISO, "--log-format", "json")
    assert trimmed.exit_code == 0, trimmed.output
    assert summary_of(trimmed) == {"event": "summary", "outcome": "trimmed", "before": T_SHOWN, "dry_run": False,
                                   "streams": {"event": event}}
    assert counted.stderr == trimmed.stderr == ""
    assert [entry_id.decode() for entry_id, _ in redis_client.xrange(event_stream_key(EVENT))] == FROM_T


def test_trim_warnings_are_json_lines_with_the_experiment_and_quiet_keeps_only_them(redis_client, redis_url):
    experiment_log(redis_client)  # banner (stopped) has 2 exposures 5 and 4 s before T, each with its feedback
    publish(redis_client, checkout="running", banner="stopped")
    args = ["events", "trim", "--redis-url", redis_url, "--before", "2025-11-29T23:59:59.000Z", "--stream", "exposure",
            "--stream", "feedback", "--dry-run"]
    loud, quiet = invoke(*args, "--log-format", "json"), invoke(*args, "--log-format", "json", "--quiet")
    assert loud.exit_code == quiet.exit_code == 0, loud.output
    note, warning = json_lines(loud.stderr)
    assert note["level"] == "info" and "count only the exposures and feedback left" in note["message"]
    assert warning["level"] == "warning" and warning["message"].startswith("experiment banner (stopped) has 2 ")
    assert {key: warning[key] for key in ("experiment", "status", "exposures", "first")} == {
        "experiment": "banner", "status": "stopped", "exposures": 2, "first": "2025-11-29T23:59:55.000Z"}
    assert [{key: value for key, value in line.items() if key != "ts"} for line in json_lines(quiet.stderr)] == [
        {key: value for key, value in warning.items() if key != "ts"}]
    assert summary_of(quiet)["streams"] == summary_of(loud)["streams"] == {
        kind: {"key": event_stream_key(kind), "removed": 2, "left": 3} for kind in ("exposure", "feedback")}
    # text: as before, and --quiet leaves the note out
    text, text_quiet = invoke(*args), invoke(*args, "--quiet")
    assert text.stderr.splitlines() == ["experiment reports count only the exposures and feedback left in the log",
                                        f"warning: {warning['message']}"]
    assert text_quiet.stderr.splitlines() == [f"warning: {warning['message']}"]
    assert text.stdout == text_quiet.stdout and "would remove 2 entries" in text.stdout


def test_a_refused_trim_in_json_mode_exits_3_with_its_summary_and_the_experiments_as_fields(redis_client, redis_url):
    experiment_log(redis_client)
    publish(redis_client, checkout="running", banner="stopped")
    result = invoke("events", "trim", "--redis-url", redis_url, "--before", T_ISO, "--stream", "feedback",
                    "--log-format", "json", "--quiet")
    assert result.exit_code == 3, result.output
    assert summary_of(result) == {"event": "summary", "outcome": "refused", "before": T_SHOWN, "dry_run": False,
                                  "streams": {}}
    [refusal] = json_lines(result.stderr)
    assert refusal["level"] == "warning" and refusal["message"].startswith("refused: experiment checkout (running)")
    assert refusal["experiments"] == [{"experiment": "checkout", "status": "running", "exposures": 2,
                                       "first": "2025-11-29T23:59:59.000Z"}]
    assert redis_client.xlen(event_stream_key(FEEDBACK)) == 5


@pytest.mark.parametrize("options, exit_code, message", [
    (["--before", "2062-01-01", "--redis-url", "{live}"], 2,  # judged by Redis's clock
     "--before 2062-01-01T00:00:00.000Z is more than 60 s ahead of Redis's clock ("),
    (["--before", "soon"], 2, "Invalid value for '--before'"),
    (["--before", T_ISO, "--stream", "clicks"], 2, "Invalid value for '--stream'"),
    (["--before", T_ISO, "--redis-url", "redis://:secret@127.0.0.1:{dead}/0"], 1,
     "cannot trim the event log in redis://***@127.0.0.1:"),
])
def test_trim_errors_in_json_mode_are_one_json_line_with_the_exit_code(options, exit_code, message, redis_url):
    options = [option.format(dead=free_port(), live=redis_url) for option in options]
    result = invoke("events", "trim", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", *options,
                    "--log-format", "json")
    assert message in one_error(result, exit_code)["message"] and "secret" not in result.output


def test_a_trim_that_fails_after_a_stream_says_in_its_json_error_what_was_trimmed(redis_client, redis_url):
    around_t(redis_client)
    redis_client.set(event_stream_key(FEEDBACK), "not a stream")  # Redis refuses XTRIM on it (WRONGTYPE)
    result = invoke("events", "trim", "--redis-url", redis_url, "--before", T_ISO, "--stream", "event", "--stream",
                    "feedback", "--log-format", "json")
    error = one_error(result, 1)
    assert "cannot trim the event log in" in error["message"] and "WRONGTYPE" in error["message"]
    assert error["streams"] == {"event": {"key": event_stream_key(EVENT), "removed": 3, "left": 3}}


# --- interrupts -------------------------------------------------------------------------------------------------


def interrupted_while_waiting(command: list[str], signum: int, log_format: str) -> tuple[int, list[str], str]:
    """Run the console script, send `signum` once it logged that it waits for Redis's clock, and return its exit
    code, its stderr lines (the waiting line first) and its stdout."""
    started = time.monotonic()
    process = subprocess.Popen([RECSVC_TRAIN, *command, "--log-format", log_format], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        waiting = process.stderr.readline()  # logged before the wait starts
        assert "ahead of Redis's clock: waiting for it to pass" in waiting, waiting
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert time.monotonic() - started < 8  # it stopped at the signal, not at the end of the wait
    return process.returncode, [waiting.rstrip("\n"), *stderr.splitlines()], stdout


@pytest.mark.parametrize("signum, exit_code, message", [
    (signal.SIGINT, 130, "interrupted by SIGINT"),  # Ctrl-C: not click's "Aborted!", exit 1
    (signal.SIGTERM, 143, "terminated by SIGTERM"),
])
def test_an_interrupted_export_says_so_in_a_json_line_with_its_exit_code(redis_client, redis_url, tmp_path, signum,
                                                                         exit_code, message):
    until = f"{redis_now(redis_client) + 10:.3f}"  # ahead of Redis's clock: the export waits for it
    out = tmp_path / "events.csv"
    returncode, stderr, stdout = interrupted_while_waiting(
        ["events", "export", "--redis-url", redis_url, "--out", str(out), "--until", until], signum, "json")
    assert returncode == exit_code and stdout == "" and not out.exists()
    waiting, error = json_lines("\n".join(stderr))
    assert waiting["level"] == "info" and waiting["waiting_seconds"] > 5
    assert error["level"] == "error" and error["message"] == message and error["exit_code"] == exit_code


def test_an_interrupted_trim_says_so_and_removes_nothing(redis_client, redis_url):
    around_t(redis_client)
    before = f"{redis_now(redis_client) + 10:.3f}"
    returncode, stderr, stdout = interrupted_while_waiting(
        ["events", "trim", "--redis-url", redis_url, "--before", before], signal.SIGINT, "text")
    assert returncode == 130 and stdout == "" and stderr[1:] == ["error: interrupted by SIGINT"]
    assert redis_client.xlen(event_stream_key(EVENT)) == 6


# --- warm-cache -------------------------------------------------------------------------------------------------


def test_warm_cache_in_json_mode_logs_progress_as_json_and_prints_its_figures(trained_registry, redis_url,
                                                                            redis_client):
    args = ["warm-cache", "--registry", str(trained_registry), "--redis-url", redis_url, "--top", "25",
            "--workers", "1"]
    result = invoke(*args, "--log-format", "json")
    assert result.exit_code == 0, result.output
    [progress] = json_lines(result.stderr)
    assert progress["level"] == "info" and progress["message"] == "warm-up: 25/25 customers computed"
    summary = summary_of(result)
    assert summary["event"] == "summary" and summary["outcome"] == "warmed" and summary["entries"] == 25
    assert summary["version"] == artifacts.current_version(trained_registry) and summary["workers"] == 1
    assert summary["seconds"] > 0 and summary["compute_seconds"] > 0
    quiet = invoke(*args, "--log-format", "json", "--quiet")
    assert quiet.stderr == "" and summary_of(quiet)["entries"] == 25
    text, text_quiet = invoke(*args), invoke(*args, "--quiet")
    assert text.stderr == "warm-up: 25/25 customers computed\n" and text_quiet.stderr == ""
    assert text_quiet.stdout.startswith("warmed 25 entries") and "entries/s" in text_quiet.stdout


@pytest.mark.parametrize("registry, redis, options, exit_code, message", [
    ("{empty}", "{redis}", [], 2, "has no current model version"),
    ("{registry}", "http://example.org", [], 2, "is not a Redis URL"),
    ("{registry}", "redis://127.0.0.1:{dead}/0", [], 1, "cannot reach Redis at redis://127.0.0.1:"),
    ("{registry}", "{redis}", ["--top", "0"], 2, "Invalid value for '--top'"),
])
def test_warm_cache_errors_in_json_mode_are_one_json_line_with_the_exit_code(trained_registry, redis_url, tmp_path,
                                                                             registry, redis, options, exit_code,
                                                                             message):
    values = {"empty": str(tmp_path), "redis": redis_url, "registry": str(trained_registry), "dead": free_port()}
    result = invoke("warm-cache", "--registry", registry.format(**values), "--redis-url", redis.format(**values),
                    *options, "--log-format", "json")
    assert message in one_error(result, exit_code)["message"]


# --- registry ---------------------------------------------------------------------------------------------------


def test_rollback_in_json_mode_prints_from_and_to_as_one_line(registry):
    rolled = invoke("registry", "rollback", "--registry", str(registry), "--log-format", "json")
    assert rolled.exit_code == 0, rolled.output
    assert summary_of(rolled) == {"event": "summary", "outcome": "rolled_back", "from": "v12", "to": "v11"}
    same = invoke("registry", "rollback", "--registry", str(registry), "v11", "--log-format", "json", "--quiet")
    assert summary_of(same) == {"event": "summary", "outcome": "unchanged", "from": "v11", "to": "v11"}
    assert rolled.stderr == same.stderr == "" and artifacts.current_version(registry) == "v11"
    text = invoke("registry", "rollback", "--registry", str(registry), "v12", "--quiet")
    assert text.stdout == "CURRENT: v11 -> v12\n"


def test_rollback_errors_in_json_mode_are_one_json_line_with_the_exit_code(registry):
    missing = invoke("registry", "rollback", "--registry", str(registry), "v99", "--log-format", "json")
    assert one_error(missing, 2)["message"].endswith("no version v99")
    with lock_held(registry):
        busy = invoke("registry", "rollback", "--registry", str(registry), "--log-format", "json")
    assert "another run (fit, nightly or rollback) is in progress" in one_error(busy, 4)["message"]
    assert artifacts.current_version(registry) == "v12"


def test_registry_list_and_show_in_json_mode_print_their_data_on_one_line_and_errors_as_json(registry, tmp_path):
    listed = invoke("registry", "list", "--registry", str(registry), "--log-format", "json")
    assert listed.exit_code == 0 and listed.stderr == ""
    versions = summary_of(listed)
    assert [(v["version"], v["current"]) for v in versions] == [("v10", False), ("v11", False), ("v12", True)]
    assert json.loads(invoke("registry", "list", "--registry", str(registry), "--json").stdout) == versions
    shown = invoke("registry", "show", "--registry", str(registry), "v11", "--log-format", "json")
    assert shown.exit_code == 0 and summary_of(shown)["version"] == "v11"
    for command in ("list", "show"):
        result = invoke("registry", command, "--registry", str(tmp_path / "nothing"), "--log-format", "json")
        assert "not a model registry" in one_error(result, 2)["message"]


# --- experiments report -----------------------------------------------------------------------------------------


def test_experiments_report_in_json_mode_prints_the_report_on_one_line_and_errors_as_json(redis_client, redis_url,
                                                                                         tmp_path):
    experiment_log(redis_client)
    publish(redis_client, checkout="running", banner="stopped")
    chart = tmp_path / "checkout.html"
    result = invoke("experiments", "report", "checkout", "--redis-url", redis_url, "--chart", str(chart),
                    "--log-format", "json")
    assert result.exit_code == 0, result.output
    report = summary_of(result)
    assert report["experiment"] == "checkout" and sum(v["exposures"] for v in report["variants"]) == 3
    [wrote] = json_lines(result.stderr)
    assert wrote["message"] == f"wrote {chart}" and wrote["chart"] == str(chart) and chart.exists()
    assert invoke("experiments", "report", "checkout", "--redis-url", redis_url, "--chart", str(chart),
                  "--log-format", "json", "--quiet").stderr == ""
    unknown = invoke("experiments", "report", "nothing", "--redis-url", redis_url, "--log-format", "json")
    assert "no experiment named 'nothing'" in one_error(unknown, 2)["message"]
    dead = invoke("experiments", "report", "checkout", "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
                  "--log-format", "json")
    assert "cannot read the event log from" in one_error(dead, 1)["message"]


# --- the bad-row refusal, and mistakes in the command line ------------------------------------------------------


@pytest.mark.parametrize("rows, bad_rows, by_reason", [
    ("c1,i1,1\nc2,i2,1\nc3,i1,-2\n", 1, {"weight not a positive number": 1}),  # 33% > the allowed 20%
    (",i1,1\nc3,i1,-2\n", 2, {"missing customer_id": 1, "weight not a positive number": 1}),  # none usable
])
def test_a_refused_input_gives_its_bad_row_counts_as_fields_of_the_json_error(tmp_path, rows, bad_rows, by_reason):
    path = tmp_path / "bad.csv"
    path.write_text("customer_id,item_id,weight\n" + rows)
    config = tmp_path / "strict.toml"
    config.write_text("[data]\nmax_bad_share = 0.2\n")
    result = invoke("fit", "--interactions", str(path), "--registry", str(tmp_path / "r"), "--config", str(config),
                    "--log-format", "json")
    assert result.exit_code == 2, result.output
    error = json_lines(result.stderr)[-1]
    assert error["level"] == "error" and error["exit_code"] == 2
    total = rows.count("\n")
    assert (error["bad_rows"], error["total_rows"], error["by_reason"]) == (bad_rows, total, by_reason)
    assert f"{bad_rows} of {total} rows rejected" in error["message"]


def test_bad_rows_below_the_threshold_are_a_warning_with_the_same_fields_as_the_refusal(tmp_path):
    path = tmp_path / "some-bad.csv"
    rows = "".join(f"c{customer},i{item},1\n" for customer in range(10) for item in range(12))
    path.write_text("customer_id,item_id,weight\n" + rows + ",i1,1\n")  # 1 bad row of 121: below the allowed 5%
    result = invoke("fit", "--interactions", str(path), "--registry", str(tmp_path / "r"), "--strategies", "popular",
                    "--log-format", "json")
    assert result.exit_code == 0, result.output
    [warning] = [line for line in json_lines(result.stderr) if line["level"] == "warning"]
    assert (warning["bad_rows"], warning["total_rows"], warning["by_reason"]) == (1, 121, {"missing customer_id": 1})
    assert warning["message"].startswith("1 of 121 rows rejected")


def test_a_mistake_in_the_command_line_is_a_json_line_in_json_mode_and_usage_text_otherwise(tmp_path):
    for args, message in ((["fit", "--registry", str(tmp_path), "--frobnicate"], "No such option '--frobnicate'"),
                          (["nightly"], "Missing option '--config'.")):
        assert one_error(invoke(*args, "--log-format", "json"), 2)["message"].startswith(message)
        text = invoke(*args)
        assert text.exit_code == 2 and "Usage: " in text.stderr and "Error: " in text.stderr
    assert one_error(invoke("registry", "list", "--log-format=json"), 2)["message"] == "Missing option '--registry'."


# --- fit and nightly in text -----------------------------------------------------------------------------------


def test_fit_and_nightly_print_their_result_on_stdout_with_quiet_too(demo_paths, tmp_path):
    """As the other cron commands: --quiet leaves out the log lines (stderr), not the result (stdout)."""
    fit = ["fit", "--interactions", str(demo_paths["interactions"]), "--registry", str(tmp_path / "fitted"),
           "--strategies", "popular"]
    loud, quiet = invoke(*fit), invoke(*fit, "--quiet")
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert loud.stdout.splitlines()[-1].startswith("published ") and "ingest: " in loud.stderr
    [published] = quiet.stdout.splitlines()
    assert published.startswith("published ") and quiet.stderr == ""
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], tmp_path / "registry",
                            strategies='[strategies]\nenabled = ["popular"]\n')
    first, again = (invoke("nightly", "--config", str(config), "--quiet") for _ in range(2))
    assert first.exit_code == again.exit_code == 0, first.output + again.output
    [published] = first.stdout.splitlines()
    assert published.startswith(f"published {artifacts.current_version(tmp_path / 'registry')} ")
    [nothing_to_do] = again.stdout.splitlines()
    assert nothing_to_do.endswith("nothing to do") and first.stderr == again.stderr == ""


# --- the nightly recipe of docs/training.md ---------------------------------------------------------------------


def test_the_nightly_recipe_with_log_format_json_writes_nothing_but_json_lines(demo_paths, redis_url, redis_client,
                                                                              tmp_path):
    """export, trim, nightly, as cron runs them (the console script, stdout and stderr into one .jsonl), with a
    mistake in the first attempt at the export: every line of the log is JSON."""
    # an event the log took an hour before T: exported, then trimmed
    log(redis_client, EVENT, f"{T - 3_600_000}-0", event_id="e1", customer_id="c-1", item_id="SKU-00001",
        time=T / 1000 - 3600)
    day = tmp_path / "events" / "2025-11-29.csv"
    day.parent.mkdir()
    config = nightly_config(tmp_path / "nightly.toml", demo_paths["interactions"], tmp_path / "registry",
                            strategies='[strategies]\nenabled = ["popular"]\n')
    jsonl = tmp_path / "nightly.jsonl"
    steps = [(["events", "export", "--redis-url", redis_url, "--since", "yesterday", "--out", str(day)], 2),
             (["events", "export", "--redis-url", redis_url, "--since", "2025-11-29", "--until", T_ISO, "--out",
               str(day)], 0),
             (["events", "trim", "--redis-url", redis_url, "--before", T_ISO], 0),
             (["nightly", "--config", str(config), "--quiet"], 0)]
    with jsonl.open("a") as output:
        for args, code in steps:
            done = subprocess.run([RECSVC_TRAIN, *args, "--log-format", "json"], stdout=output,
                                  stderr=subprocess.STDOUT, timeout=240, env=ENV)
            assert done.returncode == code, jsonl.read_text()
    records = json_lines(jsonl.read_text())
    assert records[0]["level"] == "error" and records[0]["exit_code"] == 2 and "'--since'" in records[0]["message"]
    summaries = [record for record in records if record.get("event") == "summary"]
    assert [s["outcome"] for s in summaries] == ["written", "trimmed", "published"]
    assert summaries[0]["events"] == 1 and summaries[1]["streams"]["event"]["removed"] == 1
