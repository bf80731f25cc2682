"""recsvc-train experiments report and replay: the same numbers as the API, clear errors, a chart."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from recsvc.experiment_report import Tally, VariantCounts, build_report, confidence_label, wilson
from recsvc.experiments import load_experiments
from tests.conftest import free_port
from tests.test_experiments import experiment_settings, start_app, stop_app  # noqa: F401 (fixture)
from training.cli import main
from training.experiments_cli import chart_html, format_report


def _run_experiment(settings, auth, customers: int = 300) -> dict:
    """Serve customers, accept every third list, and return the API's report."""
    app = start_app(settings)
    try:
        client = app.test_client()
        for i in range(customers):
            body = client.get(f"/v1/customers/cli-{i}/recommendations?limit=2", headers=auth).get_json()
            if i % 3 == 0:
                client.post("/v1/feedback", headers=auth, json={
                    "request_id": body["request_id"], "customer_id": f"cli-{i}",
                    "item_id": body["items"][0]["item_id"], "action": "accepted"})
        return client.get("/v1/experiments/als-vs-pop/report", headers=auth).get_json()
    finally:
        stop_app(app)


def test_cli_report_matches_the_api_with_definitions_from_redis_or_file(experiment_settings, auth,  # noqa: F811
                                                                        tmp_path):
    api_report = _run_experiment(experiment_settings, auth)
    runner = CliRunner()
    url = experiment_settings.redis_url
    from_redis = runner.invoke(main, ["experiments", "report", "als-vs-pop", "--redis-url", url, "--json"])
    assert from_redis.exit_code == 0, from_redis.output
    assert json.loads(from_redis.output)["variants"] == api_report["variants"]
    chart = tmp_path / "chart.html"
    from_file = runner.invoke(main, ["experiments", "report", "als-vs-pop", "--redis-url", url, "--experiments",
                                     str(experiment_settings.experiments_path), "--chart", str(chart)])
    assert from_file.exit_code == 0, from_file.output
    assert "control (control)" in from_file.output and "srm_p_value" in from_file.output
    page = chart.read_text(encoding="utf-8")
    assert page.count("<svg") == 2 and "treatment" in page and "<script" not in page
    assert sum(r["customers_exposed"] for r in api_report["variants"]) == 300
    assert sum(r["customers_accepted"] for r in api_report["variants"]) == 100


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_png_chart_without_matplotlib_fails_fast_with_exit_2_and_prints_no_report(
        experiment_settings, auth, tmp_path, monkeypatch, log_format):  # noqa: F811
    _run_experiment(experiment_settings, auth, customers=20)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError, as when missing
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    png = tmp_path / "chart.png"
    result = CliRunner().invoke(main, ["experiments", "report", "als-vs-pop", "--redis-url",
                                       experiment_settings.redis_url, "--chart", str(png), "--log-format", log_format])
    assert result.exit_code == 2 and result.stdout == "" and not png.exists()
    message = "--chart FILE.png needs matplotlib (pip install 'recsvc[charts]'); or use --chart FILE.html"
    if log_format == "json":
        [error] = [json.loads(line) for line in result.stderr.splitlines()]
        assert error["message"] == message and error["exit_code"] == 2
    else:
        assert result.stderr == f"error: {message}\n"


def test_a_chart_path_that_cannot_be_written_fails_before_the_report(experiment_settings, auth, tmp_path):  # noqa: F811
    _run_experiment(experiment_settings, auth, customers=20)
    chart = tmp_path / "missing" / "chart.html"
    result = CliRunner().invoke(main, ["experiments", "report", "als-vs-pop", "--redis-url",
                                       experiment_settings.redis_url, "--chart", str(chart)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: No such file or directory: {chart.parent}\n"


def test_cli_report_errors_are_messages_with_exit_codes(experiment_settings, tmp_path):  # noqa: F811
    runner = CliRunner()
    unknown = runner.invoke(main, ["experiments", "report", "nope", "--redis-url", experiment_settings.redis_url,
                                   "--experiments", str(experiment_settings.experiments_path)])
    assert unknown.exit_code == 2 and "no experiment named 'nope' (known: als-vs-pop)" in unknown.output
    bad_chart = runner.invoke(main, ["experiments", "report", "als-vs-pop", "--redis-url",
                                     experiment_settings.redis_url, "--chart", str(tmp_path / "chart.svg")])
    assert bad_chart.exit_code == 2 and "--chart must end in .html or .png" in bad_chart.output
    down = runner.invoke(main, ["experiments", "report", "als-vs-pop", "--redis-url",
                                f"redis://:wrongpass@127.0.0.1:{free_port()}/0"])
    assert down.exit_code == 1 and "cannot read the event log from redis://***@127.0.0.1:" in down.output
    assert "wrongpass" not in down.output
    assert "Traceback" not in unknown.output + bad_chart.output + down.output


def test_cli_replay_evaluates_each_variant_on_the_customers_it_would_get(experiment_settings, demo_paths):  # noqa: F811
    result = CliRunner().invoke(main, ["experiments", "replay", "als-vs-pop", "--experiments",
                                       str(experiment_settings.experiments_path), "--interactions",
                                       str(demo_paths["interactions"]), "--catalog", str(demo_paths["catalog"]),
                                       "--json"])
    assert result.exit_code == 0, result.output
    replay = json.loads(result.output[result.output.index("{"):])
    experiment = load_experiments(experiment_settings.experiments_path).get("als-vs-pop")
    control, treatment = replay["variants"]["control"], replay["variants"]["treatment"]
    assert (control["strategy"], treatment["strategy"]) == ("als", "popular")
    assert control["customers"] > 200 and treatment["customers"] > 200  # about half of ~600 customers each
    # The planted taste structure makes the personal strategy beat popularity offline.
    assert control["hit_rate@10"] > treatment["hit_rate@10"]
    assert replay["expected_relative_lift"]["treatment"] == treatment["hit_rate@10"] / control["hit_rate@10"] - 1
    assert experiment.control == replay["control"] == "control"


def test_cli_replay_reads_several_interactions_files_as_one(experiment_settings, demo_paths, tmp_path):  # noqa: F811
    header, *rows = demo_paths["interactions"].read_text().splitlines(keepends=True)
    (tmp_path / "base.csv").write_text(header + "".join(rows[:9_000]))
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "2026-11-30.csv").write_text(header + "".join(rows[9_000:]))
    replays = []
    for interactions in ([demo_paths["interactions"]], [tmp_path / "base.csv", tmp_path / "events" / "*.csv"]):
        result = CliRunner().invoke(main, ["experiments", "replay", "als-vs-pop", "--experiments",
                                           str(experiment_settings.experiments_path),
                                           *(arg for path in interactions for arg in ("--interactions", str(path))),
                                           "--catalog", str(demo_paths["catalog"]), "--json"])
        assert result.exit_code == 0, result.output
        replays.append(json.loads(result.output[result.output.index("{"):]))
    assert replays[0] == replays[1]


def test_cli_replay_reads_the_definitions_the_servers_published_to_redis(experiment_settings, auth,  # noqa: F811
                                                                          demo_paths, tmp_path):
    _run_experiment(experiment_settings, auth, customers=3)  # a server publishes its definitions at start
    arguments = ["experiments", "replay", "als-vs-pop", "--interactions", str(demo_paths["interactions"]),
                 "--catalog", str(demo_paths["catalog"]), "--json"]
    runner = CliRunner(env={"RECSVC_EXPERIMENTS": None, "RECSVC_REDIS_URL": None})
    from_redis = runner.invoke(main, [*arguments, "--redis-url", experiment_settings.redis_url])
    assert from_redis.exit_code == 0, from_redis.output
    from_file = runner.invoke(main, [*arguments, "--experiments", str(experiment_settings.experiments_path)])
    assert json.loads(from_redis.output[from_redis.output.index("{"):]) == \
        json.loads(from_file.output[from_file.output.index("{"):])
    neither = runner.invoke(main, arguments)
    assert neither.exit_code == 2 and "pass --experiments FILE" in neither.output and "--redis-url" in neither.output
    unreachable = runner.invoke(main, [*arguments, "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
    assert unreachable.exit_code == 1 and "cannot read the published experiment definitions" in unreachable.output
    assert "Traceback" not in unreachable.output


def test_cli_replay_refuses_an_unknown_strategy_before_reading_data(tmp_path):
    from tests.test_experiments import SERVED, write_definitions

    definitions = write_definitions(tmp_path / "experiments.json", {**SERVED, "variants": [
        {"name": "control", "strategy": "als", "weight": 1}, {"name": "b", "strategy": "nosuch", "weight": 1}]})
    result = CliRunner().invoke(main, ["experiments", "replay", "als-vs-pop", "--experiments", str(definitions),
                                       "--interactions", str(tmp_path / "absent.csv")])
    assert result.exit_code == 2 and "unknown strategy nosuch" in result.output


def test_the_table_chart_and_methods_name_the_confidence_level_alpha_asks_for():
    counts = Tally({"c": VariantCounts(200, 260, 30, 35, 45, 380, 50),
                    "t": VariantCounts(200, 250, 40, 44, 52, 330, 60)})
    report = build_report("exp", "c", [("c", "als", 1), ("t", "popular", 1)], counts, alpha=0.1)
    assert report["variants"][0]["acceptance_rate"] == wilson(30, 200, confidence=0.9)
    assert "90% Wilson" in report["methods"]["acceptance_rate"]
    table, page = format_report({**report, "status": "running"}), chart_html(report)
    assert "acceptance rate (90% CI)" in table and "rel. lift (90% CI)" in table and "95%" not in table
    assert "share, 90% CI" in page and "95%" not in page
    assert confidence_label(0.05) == "95%" and confidence_label(0.001) == "99.9%"


def test_the_chart_escapes_variant_names():
    counts = Tally({"a<b": VariantCounts(20, 20, 3, 3, 3, 20, 3), "x&y": VariantCounts(20, 20, 4, 4, 4, 20, 4)})
    page = chart_html(build_report("exp", "a<b", [("a<b", "als", 1), ("x&y", "popular", 1)], counts))
    assert ">a&lt;b</text>" in page and ">x&amp;y</text>" in page and "samples too small in a&lt;b, x&amp;y" in page
    assert "a<b" not in page and "x&y" not in page
