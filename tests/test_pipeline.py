"""The fit chain: data preparation, holdouts, evaluation, the quality gate, and the fit/evaluate commands."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from recsvc import artifacts
from recsvc.errors import InvalidInput
from recsvc.scoring import PopularityScorer
from training.cli import main as train_cli
from training.config import TrainConfig
from training.evaluate import Holdout, evaluate, split, split_by_time
from training.ingest import IngestOptions, load_interactions
from training.pipeline import fit_and_publish
from training.prepare import core_filter, prepare
from training.runlog import RunLog

DAY = 86_400
FAST_ALS = "[strategies.als]\nfactors = 16\niterations = 8\n"
DEGRADED_ALS = "[strategies.als]\nfactors = 1\niterations = 1\n"


def ids(array) -> list[str]:
    return [value.decode() for value in array]


def pairs(interactions) -> dict[tuple[str, str], float]:
    matrix = interactions.matrix().toarray()
    customers, items = ids(interactions.customers), ids(interactions.items)
    return {(customers[r], items[c]): round(float(matrix[r, c]), 6) for r, c in zip(*matrix.nonzero())}


# --- data preparation -------------------------------------------------------


def test_time_decay_halves_an_event_per_half_life_before_the_newest(tmp_path):
    path = tmp_path / "events.csv"
    newest = 1_790_000_000
    path.write_text("customer_id,item_id,event_type,timestamp\n"
                    f"ann,tv,purchase,{newest}\n"            # age 0: 8 x 1
                    f"ann,radio,view,{newest - 2 * DAY}\n"    # age 2 days = one half-life: 1 x 0.5
                    f"ann,radio,view,{newest - 4 * DAY}\n"    # two half-lives: 1 x 0.25, summed with the row above
                    f"bob,tv,click,{newest - 6 * DAY}\n")     # three half-lives: 2 x 0.125
    options = IngestOptions(event_weights={"view": 1, "click": 2, "purchase": 8}, half_life_days=2)
    prepared, report = prepare(load_interactions(path, options), options)
    assert pairs(prepared) == {("ann", "tv"): 8.0, ("ann", "radio"): 0.75, ("bob", "tv"): 0.25}
    assert report.reference_time == newest


def test_time_decay_without_timestamps_is_a_clear_error(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("customer_id,item_id\nann,tv\n")
    options = IngestOptions(half_life_days=7)
    with pytest.raises(InvalidInput, match="time decay .* needs a timestamp column"):
        prepare(load_interactions(path, options), options)


# Customers a..d, items 1..4. With at least 2 distinct items per customer and 2 distinct customers per item,
# each round judges everyone on what the previous round left:
# round 1 drops customer d (item 1 only) and item 4 (customer c only);
# round 2 drops customer c (left with item 3 only);
# round 3 drops item 3 (left with customer b only); then a and b hold items 1 and 2: stable.
K_CORE_ROWS = [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2"), ("b", "3"), ("c", "3"), ("c", "4"), ("d", "1"),
               ("a", "1")]  # a duplicate pair counts once


def test_minimum_filters_repeat_until_every_customer_and_item_qualifies(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("customer_id,item_id\n" + "".join(f"{c},{i}\n" for c, i in K_CORE_ROWS))
    options = IngestOptions(min_items_per_customer=2, min_customers_per_item=2)
    prepared, report = prepare(load_interactions(path, options), options)
    assert pairs(prepared) == {("a", "1"): 2.0, ("a", "2"): 1.0, ("b", "1"): 1.0, ("b", "2"): 1.0}
    assert ids(prepared.customers) == ["a", "b"] and ids(prepared.items) == ["1", "2"]
    assert (report.customers_removed, report.items_removed, report.rows_removed) == (2, 2, 4)
    assert report.rounds == 3


def test_core_filter_counts_distinct_pairs():
    customer, item = np.array([0, 0, 0, 1, 1]), np.array([0, 0, 0, 0, 1])  # customer 0: one item, three times
    keep_customers, keep_items, _ = core_filter(customer, item, (2, 2), 2, 1)
    assert keep_customers.tolist() == [False, True] and keep_items.tolist() == [True, True]


def test_filters_that_leave_nothing_are_refused(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("customer_id,item_id\na,1\nb,2\n")
    options = IngestOptions(min_items_per_customer=2)
    with pytest.raises(InvalidInput, match="no interactions left after the minimum filters"):
        prepare(load_interactions(path, options), options)


# --- holdouts and metrics ---------------------------------------------------


def test_random_split_partitions_every_pair_and_holds_out_the_fraction():
    matrix = sp.random(200, 60, density=0.2, format="csr", random_state=3, dtype=np.float32)
    train, test = split(matrix, Holdout(fraction=0.25, seed=1, max_customers=None))
    assert train.nnz + test.nnz == matrix.nnz and train.multiply(test).nnz == 0
    assert abs((train + test) - matrix).sum() == 0
    lengths, held = np.diff(matrix.indptr), np.diff(test.indptr)
    eligible = lengths >= 2
    assert (held[eligible] == np.maximum(1, lengths[eligible] - np.round(0.75 * lengths[eligible]))).all()
    assert (held[~eligible] == 0).all()


def test_time_split_tests_only_items_first_seen_after_the_cutoff():
    # customer 0: items 0, 1 early; item 2 late (new: tested), item 0 again late (known: not tested).
    # customer 1: only early items -> not sampled. customer 2: only one early item -> below min_items.
    customer = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    item = np.array([0, 1, 2, 0, 0, 1, 0, 3])
    timestamp = np.array([0, 1, 9, 9, 0, 1, 0, 9], dtype=float) * DAY
    strength = np.ones(8, dtype=np.float32)
    matrix = sp.csr_matrix((strength, (customer, item)), shape=(3, 4))
    train, test = split_by_time(matrix, customer, item, strength, timestamp,
                                Holdout(kind="time", days=3, max_customers=None))
    assert {(int(r), int(c)) for r, c in zip(*test.nonzero())} == {(0, 2)}
    assert train.toarray().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 1]]  # customer 0's late rows removed


def test_popular_is_evaluated_from_one_ranking_exactly_as_from_full_scores():
    matrix = sp.random(300, 80, density=0.1, format="csr", random_state=1, dtype=np.float32)
    train, test = split(matrix, Holdout(max_customers=None))
    popularity = np.random.default_rng(0).permutation(80).astype(np.float32)

    class ScoredOneByOne(PopularityScorer):  # the generic path: a full customers x items score matrix
        personal = True

    inactive = np.array([3, 17])
    fast = evaluate(PopularityScorer(popularity), train, test, exclude_items=inactive)
    assert fast == evaluate(ScoredOneByOne(popularity), train, test, exclude_items=inactive)
    assert fast["customers"] == int((np.diff(test.indptr) > 0).sum())


@pytest.mark.parametrize("personal", [False, True], ids=["one ranking", "full scores"])
def test_items_that_cannot_be_recommended_are_no_recommendations(personal):
    """Fewer recommendable items than k: the lists are short. An inactive item (or an owned one) padding a
    list is not recommended, so it is neither a hit nor coverage, and a short list is no crash."""
    train = sp.csr_matrix(np.array([[1, 0, 0], [1, 0, 0]], dtype=np.float32))
    test = sp.csr_matrix(np.array([[0, 0, 1], [0, 1, 0]], dtype=np.float32))  # customer 0 took item 2, now inactive

    class ScoredOneByOne(PopularityScorer):
        pass

    ScoredOneByOne.personal = personal
    metrics = evaluate(ScoredOneByOne(np.array([3, 2, 1], dtype=np.float32)), train, test, k=3,
                       exclude_items=np.array([2]))
    expected = {"precision@3": 1 / 6, "recall@3": 0.5, "ndcg@3": 0.5, "map@3": 0.5, "hit_rate@3": 0.5,
                "coverage@3": 1 / 3, "customers": 2}
    assert metrics == pytest.approx(expected)


# --- the fit command: bad rows, the quality gate ----------------------------


@pytest.fixture
def fit_args(demo_paths, tmp_path):
    config = tmp_path / "fast.toml"
    config.write_text(FAST_ALS)
    return ["fit", "--interactions", str(demo_paths["interactions"]), "--registry", str(tmp_path / "registry"),
            "--config", str(config)]


def run(args):
    return CliRunner().invoke(train_cli, args, catch_exceptions=False)


def test_gate_refuses_a_degraded_model_and_keeps_the_current_one(fit_args, tmp_path):
    registry = tmp_path / "registry"
    first = run(fit_args)
    assert first.exit_code == 0, first.output
    current = artifacts.current_version(registry)
    degraded = tmp_path / "degraded.toml"
    degraded.write_text(DEGRADED_ALS)
    result = run([*fit_args[:-1], str(degraded)])
    assert result.exit_code == 3, result.output
    assert "refused: the quality gate kept the current model: ndcg@10" in result.output
    assert "x the current model's" in result.output and current in result.output
    assert artifacts.current_version(registry) == current
    assert artifacts.list_versions(registry) == [current]  # nothing of the refused model was written


def test_force_publishes_what_the_gate_refuses(fit_args, tmp_path):
    registry = tmp_path / "registry"
    assert run(fit_args).exit_code == 0
    degraded = tmp_path / "degraded.toml"
    degraded.write_text(DEGRADED_ALS)
    result = run([*fit_args[:-1], str(degraded), "--force"])
    assert result.exit_code == 0, result.output
    manifest = artifacts.read_manifest(artifacts.versions_root(registry) / artifacts.current_version(registry))
    assert manifest["gate"]["forced"] is True and manifest["gate"]["threshold"] > manifest["gate"]["new_value"]
    assert manifest["strategies"]["als"]["params"]["factors"] == 1


def test_gate_refuses_to_compare_across_holdout_definitions(fit_args, tmp_path):
    assert run(fit_args).exit_code == 0
    other = tmp_path / "other.toml"
    other.write_text(FAST_ALS + "\n[evaluation.holdout]\nfraction = 0.3\n")
    result = run([*fit_args[:-1], str(other)])
    assert result.exit_code == 3
    assert "evaluated on a different basis" in result.output


def test_an_empty_holdout_cannot_replace_the_current_model(demo_paths, tmp_path):
    config = tmp_path / "empty.toml"
    config.write_text(FAST_ALS + "\n[evaluation.holdout]\nmin_items = 100000\n")
    args = ["fit", "--interactions", str(demo_paths["interactions"]), "--registry", str(tmp_path / "registry"),
            "--config", str(config)]
    first = CliRunner().invoke(train_cli, args)
    assert first.exit_code == 0 and "the holdout is empty" in first.stderr  # the first model: nothing to compare
    again = CliRunner().invoke(train_cli, args)
    assert again.exit_code == 3, again.output
    assert "the holdout is empty, so the new model could not be measured" in again.stderr
    assert CliRunner().invoke(train_cli, [*args, "--force"]).exit_code == 0


def test_event_weight_names_in_the_config_ignore_case_like_the_data(tmp_path):
    config = tmp_path / "weights.toml"
    config.write_text("[data.event_weights]\nPurchase = 100\n' Return ' = 0\n")
    weights = TrainConfig.from_file(config).ingest.event_weights
    assert weights["purchase"] == 100 and weights["return"] == 0 and "Purchase" not in weights


def test_bad_rows_are_reported_and_publishing_goes_on_below_the_threshold(tmp_path, demo_paths):
    lines = demo_paths["interactions"].read_text().splitlines()
    path = tmp_path / "some-bad.csv"
    path.write_text("\n".join([*lines[:3001], ",SKU-00001,view,2026-10-01T00:00:00Z", "C000001,SKU-00001,view,never"]))
    result = run(["fit", "--interactions", str(path), "--registry", str(tmp_path / "r"), "--strategies", "popular"])
    assert result.exit_code == 0, result.output
    assert "2 of 3002 rows rejected (0.07%)" in result.output
    assert "missing customer_id: 1" in result.output and "timestamp not ISO-8601 or Unix seconds: 1" in result.output
    registry = tmp_path / "r"
    manifest = artifacts.read_manifest(artifacts.versions_root(registry) / artifacts.current_version(registry))
    assert manifest["data"]["bad_rows"]["bad_rows"] == 2


def test_bad_share_above_the_configured_threshold_exits_2(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("customer_id,item_id,weight\n" + "c1,i1,1\nc2,i2,1\nc3,i1,-2\n")
    config = tmp_path / "strict.toml"
    config.write_text("[data]\nmax_bad_share = 0.2\n")
    result = run(["fit", "--interactions", str(path), "--registry", str(tmp_path / "r"), "--config", str(config)])
    assert result.exit_code == 2
    assert "too many bad rows (33.33% > the allowed 20.00%)" in result.output
    assert "weight not a positive number: 1" in result.output and "e.g. data row 3:" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r" / "CURRENT").exists()


def test_json_log_format_writes_one_object_per_line_and_a_summary(fit_args):
    result = CliRunner().invoke(train_cli, [*fit_args, "--log-format", "json"], catch_exceptions=False)
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.output.splitlines()]
    assert {r["step"] for r in records if "step" in r} >= {"ingest", "split", "fit.als", "evaluate.popular", "publish"}
    summary = records[-1]
    assert summary["event"] == "summary" and summary["published"] is True
    assert set(summary["metrics"]) == {"als", "popular"}


# --- the evaluate command ---------------------------------------------------


def test_evaluate_prints_the_table_with_popular_and_publishes_nothing(demo_paths, tmp_path):
    config = tmp_path / "fast.toml"
    config.write_text(FAST_ALS)
    result = run(["evaluate", "--interactions", str(demo_paths["interactions"]), "--strategies", "als",
                  "--k", "5", "--seed", "7", "--json", "--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["metrics"]) == {"als", "popular"} and report["holdout"]["seed"] == 7 and report["k"] == 5
    assert set(report["metrics"]["als"]) >= {"precision@5", "recall@5", "ndcg@5", "map@5", "hit_rate@5", "coverage@5"}
    assert report["metrics"]["als"]["ndcg@5"] > report["metrics"]["popular"]["ndcg@5"]
    assert not list(tmp_path.glob("**/CURRENT"))


def test_evaluate_with_a_time_holdout_from_the_config(demo_paths, tmp_path):
    config = tmp_path / "time.toml"
    config.write_text(FAST_ALS + "\n[evaluation.holdout]\nkind = \"time\"\ndays = 14\n")
    result = run(["evaluate", "--interactions", str(demo_paths["interactions"]), "--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert '"kind": "time"' in result.output and '"days": 14' in result.output
    assert "popular" in result.output and "als *" in result.output


def test_unknown_holdout_kind_is_a_clear_error(demo_paths, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[evaluation.holdout]\nkind = \"yesterday\"\n")
    result = run(["evaluate", "--interactions", str(demo_paths["interactions"]), "--config", str(config)])
    assert result.exit_code == 2
    assert "holdout kind must be one of random, time, not 'yesterday'" in result.output


@pytest.mark.parametrize("config_text, message", [
    ("[strategies.als]\nfactorz = 3\n", "unknown parameter(s) factorz"),
    ("[strategies]\nenabled = [\"ease_als\"]\n\n[strategies.ease_als]\nease_dropout = 1.0\n",
     "ease: dropout must be at least 0 and below 1, not 1.0"),  # a blend checks its parts' parameters up front
    # Misspellings are errors, not silent defaults: a section, a key, a strategy, a parameter of one not enabled.
    ("[strategie.als]\nfactors = 3\n", "unknown section [strategie]"),
    ("[data]\nhalf_life = 7\n", "unknown key half_life in [data]"),
    ("[nightly]\ninteraction = \"x.csv\"\n", "unknown key interaction in [nightly]"),
    ("[strategies.easy]\nl2 = 3.0\n", "[strategies.easy]: unknown strategy"),
    ("[strategies]\nenabled = [\"als\"]\n\n[strategies.bpr]\nfactorz = 3\n", "bpr: unknown parameter(s) factorz"),
    ("[evaluation.holdout]\nfrac = 0.5\n", "unknown key frac in [evaluation.holdout] (keys: kind, fraction,"),
    ("[gate]\ntol = 0.1\n", "unknown key tol in [gate] (keys: tolerance)"),
    ("[tuning]\nfold = 3\n", "unknown key fold in [tuning] (keys: folds,"),
    ("[tuning.space.alss]\nfactors = [8]\n", "[tuning.space.alss]: unknown strategy"),
    # Values the run would trip over, or that would quietly turn the gate off.
    ("[evaluation]\nk = 0\n", "evaluation.k must be at least 1, not 0"),
    ("[evaluation]\nprimary_metric = \"foo@10\"\n", "evaluation.primary_metric must be one of precision@10,"),
    ("[evaluation]\nk = 5\nprimary_metric = \"ndcg@10\"\n", "(@5: evaluation.k), not 'ndcg@10'"),
    ("[data]\nmax_bad_share = 7\n", "data.max_bad_share is a share of the rows, from 0 to 1, not 7"),
    # Wrong types name their key (they were tracebacks or Python's own words).
    ("[evaluation.holdout]\nseed = \"x\"\n", "evaluation.holdout.seed must be a whole number, not 'x'"),
    ("[evaluation.holdout]\nseed = -1\n", "seed >= 0"),
    ("[gate]\ntolerance = \"x\"\n", "gate.tolerance must be a number, not 'x'"),
    ("[data.event_weights]\nview = \"x\"\n", "data.event_weights must map event types to numbers of at least 0"),
    ("[strategies]\nenabled = \"als\"\n", "strategies.enabled must be a list of strategy names"),
    ("[nightly]\nwarm_top = -1\n", "nightly.warm_top must be at least 1, not -1"),
    ("[nightly]\nredis_url = \"redis://127.0.0.1:6379/abc\"\n", "the database after the host must be a number"),
    ("[nightly]\nredis_url = \"http://nope\"\n", "it must start with redis://, rediss:// or unix://"),
])
def test_a_wrong_strategy_parameter_exits_2_before_reading_data(tmp_path, config_text, message):
    config = tmp_path / "wrong.toml"
    config.write_text(config_text)
    result = run(["fit", "--interactions", str(tmp_path / "not-read.csv"), "--registry", str(tmp_path / "r"),
                  "--config", str(config)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_the_primary_metric_follows_k_unless_given():
    assert TrainConfig.from_dict({"evaluation": {"k": 5}}).primary_metric == "ndcg@5"
    assert TrainConfig.from_dict({}).primary_metric == "ndcg@10"
    assert TrainConfig.from_dict({"evaluation": {"k": 20, "primary_metric": "map@20"}}).primary_metric == "map@20"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere(demo_paths, tmp_path):
    config = TrainConfig(strategies=["popular"])
    terminal, pipe = Terminal(), io.StringIO()
    fit_and_publish(demo_paths["interactions"], tmp_path / "a", config, log=RunLog(stream=terminal))
    fit_and_publish(demo_paths["interactions"], tmp_path / "b", config, log=RunLog(stream=pipe))
    assert "recsvc-train:" in terminal.getvalue() and "step" in terminal.getvalue()  # tqdm's bar and unit
    assert "\r" not in pipe.getvalue() and "fit.popular: " in pipe.getvalue()
    quiet = io.StringIO()
    fit_and_publish(demo_paths["interactions"], tmp_path / "c", config, log=RunLog(stream=quiet, quiet=True))
    assert quiet.getvalue() == ""


def test_the_default_strategy_is_personal_even_when_trending_scores_higher():
    import numpy as np

    from recsvc.scoring import FactorScorer, PopularityScorer
    from training.pipeline import choose_default

    factors = FactorScorer(np.ones((2, 2), dtype=np.float32), np.ones((3, 2), dtype=np.float32))
    popularity = PopularityScorer(np.arange(3, dtype=np.float32))
    metrics = {"als": {"ndcg@10": 0.1}, "trending": {"ndcg@10": 0.3}, "popular": {"ndcg@10": 0.2}}
    scorers = {"als": factors, "trending": popularity, "popular": popularity}
    assert choose_default(metrics, "ndcg@10", scorers) == "als"
    only_popular = {"popular": {"ndcg@10": 0.2}, "trending": {"ndcg@10": 0.3}}
    assert choose_default(only_popular, "ndcg@10", scorers) == "trending"


@pytest.mark.parametrize("command", ["fit", "tune"])
def test_a_k_above_the_catalogue_is_refused_before_any_fitting(tmp_path, command):
    interactions = tmp_path / "interactions.csv"
    interactions.write_text("customer_id,item_id\n" + "".join(f"c{c},i{(c + i) % 5}\n" for c in range(30)
                                                               for i in range(3)))
    args = {"fit": ["fit", "--registry", str(tmp_path / "registry"), "--strategies", "als", "--log-format", "json"],
            "tune": ["tune", "--strategy", "als", "--trials", "1"]}[command]
    result = CliRunner().invoke(train_cli, [*args, "--interactions", str(interactions)])
    assert result.exit_code == 2, result.output
    assert "k = 10 is more than the 5 items there are to recommend" in result.stderr
    if command == "fit":
        lines = [json.loads(line) for line in result.stderr.splitlines()]
        assert not [line for line in lines if str(line.get("step", "")).startswith("fit.")]
    else:
        assert "--metric ndcg@10" in result.stderr and "trial" not in result.output


def test_fit_reads_a_base_file_and_the_days_a_pattern_matches_as_one_input(tmp_path, demo_paths):
    """The demo data cut into a Parquet base and exported days (one without events): the same model, metrics
    included, as from the whole file, and the manifest names every file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    header, *rows = demo_paths["interactions"].read_text().splitlines(keepends=True)
    (tmp_path / "base.csv").write_text(header + "".join(rows[:10_000]))
    pq.write_table(pacsv.read_csv(tmp_path / "base.csv"), tmp_path / "base.parquet")
    (tmp_path / "events").mkdir()
    for day, part in (("2026-11-29", rows[10_000:12_500]), ("2026-11-30", rows[12_500:]), ("2026-12-01", [])):
        (tmp_path / "events" / f"{day}.csv").write_text(header + "".join(part))
    several = run(["fit", "--interactions", str(tmp_path / "base.parquet"), "--interactions",
                   str(tmp_path / "events" / "*.csv"), "--registry", str(tmp_path / "several"),
                   "--strategies", "popular"])
    assert several.exit_code == 0, several.output
    whole = run(["fit", "--interactions", str(demo_paths["interactions"]), "--registry", str(tmp_path / "whole"),
                 "--strategies", "popular"])
    assert whole.exit_code == 0, whole.output
    manifests = [artifacts.read_manifest(artifacts.versions_root(registry) / artifacts.current_version(registry))
                 for registry in (tmp_path / "several", tmp_path / "whole")]
    several_data, whole_data = (manifest["data"] for manifest in manifests)
    assert several_data["rows"] == whole_data["rows"] == 15_000
    counts = ("interactions", "customer_item_pairs", "customers", "items")
    assert {key: several_data[key] for key in counts} == {key: whole_data[key] for key in counts}
    assert manifests[0]["strategies"]["popular"]["metrics"] == manifests[1]["strategies"]["popular"]["metrics"]
    assert [(Path(f["path"]).name, f["rows"]) for f in manifests[0]["data"]["files"]] == [
        ("base.parquet", 10_000), ("2026-11-29.csv", 2_500), ("2026-11-30.csv", 2_500), ("2026-12-01.csv", 0)]
