"""recsvc-train tune: search on a validation split from the training part, leaderboard, best parameters saved."""

from __future__ import annotations

import csv
import json
import re
import resource
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from recsvc.errors import InvalidInput
from training.cli import main
from training.config import TrainConfig, Tuning
from training.evaluate import Holdout, evaluate, split
from training.pipeline import load_prepared
from training.runlog import RunLog
from training.strategies import STRATEGIES, TrainingData
from training.tune import candidates, parse_metric, tune, tuning_splits

CONFIG = """# nightly settings, kept by tune
[strategies]
enabled = ["als", "ease"]  # the order matters to us

[strategies.als]
factors = 16

[evaluation.holdout]
fraction = 0.2
seed = 5
"""


def prepared(path, config):
    return load_prepared(path, config, None, RunLog(sink=lambda _line: None))


def pairs(matrix) -> set[tuple[int, int]]:
    rows, cols = matrix.nonzero()
    return set(zip(rows.tolist(), cols.tolist()))


def test_validation_is_carved_from_the_training_part_only(demo_paths):
    holdout = Holdout(fraction=0.25, seed=42, max_customers=None)
    config = TrainConfig(holdout=holdout)
    data = prepared(demo_paths["interactions"], config)
    [(fit_part, validation)], test = tuning_splits(data, config)
    train, expected_test = split(data.matrix, holdout)
    assert pairs(test) == pairs(expected_test), "the test split is exactly the one `fit` evaluates on"
    assert pairs(fit_part) | pairs(validation) == pairs(train)
    assert not pairs(fit_part) & pairs(validation)
    assert not (pairs(fit_part) | pairs(validation)) & pairs(test), "tuning never sees a test pair"
    assert validation.nnz > 0.15 * train.nnz


def test_folds_are_distinct_validation_splits_of_the_training_part_with_the_configured_fraction(demo_paths):
    holdout = Holdout(fraction=0.25, seed=42, max_customers=None)
    config = TrainConfig(holdout=holdout, tuning=Tuning(folds=3, validation_fraction=0.1))
    data = prepared(demo_paths["interactions"], config)
    folds, test = tuning_splits(data, config)
    train, _ = split(data.matrix, holdout)
    assert len(folds) == 3
    for fit_part, validation in folds:
        assert pairs(fit_part) | pairs(validation) == pairs(train) and not pairs(fit_part) & pairs(validation)
        assert not pairs(validation) & pairs(test)
        assert 0.05 * train.nnz < validation.nnz < 0.15 * train.nnz, "about a tenth of the training pairs"
    assert len({frozenset(pairs(validation)) for _, validation in folds}) == 3, "each fold has its own seed"


def test_tune_scores_a_trial_by_its_mean_over_the_folds(demo_paths):
    config = TrainConfig(params={"ease": {"l2": 50.0}}, tuning=Tuning(folds=2, validation_fraction=0.2))
    data = prepared(demo_paths["interactions"], config)
    result = tune(data, "ease", config, trials=1, metric="ndcg@5", log=lambda _line: None)
    [(fit_a, val_a), (fit_b, val_b)], _test = tuning_splits(data, config)
    strategy = STRATEGIES["ease"](l2=50.0)
    expected = np.mean([evaluate(strategy.fit(TrainingData(fit)), fit, val, k=5)["ndcg@5"]
                        for fit, val in ((fit_a, val_a), (fit_b, val_b))])
    current = next(t for t in result.trials if t.current)
    assert current.metrics["ndcg@5"] == pytest.approx(expected)
    assert result.folds == 2


def test_the_configs_search_space_replaces_the_strategys_own(demo_paths):
    config = TrainConfig(params={"als": {"factors": 8, "iterations": 3}},
                         tuning=Tuning(space={"als": {"factors": [8, 12], "ensemble": [1, 2]}}))
    data = prepared(demo_paths["interactions"], config)
    result = tune(data, "als", config, trials=10, metric="ndcg@5", log=lambda _line: None)
    assert sorted((t.params["factors"], t.params["ensemble"]) for t in result.trials) == [(8, 1), (8, 2), (12, 1),
                                                                                          (12, 2)]


def test_a_search_space_with_an_unknown_parameter_is_refused(demo_paths):
    config = TrainConfig(tuning=Tuning(space={"ease": {"lambda": [1.0]}}))
    with pytest.raises(InvalidInput, match="lambda not among ease's parameters"):
        tune(prepared(demo_paths["interactions"], config), "ease", config, trials=1, log=lambda _line: None)


def test_candidates_are_distinct_and_seeded():
    space = {"a": [1, 2, 3], "b": [10, 20]}
    picked = candidates(space, 4, "random", seed=1)
    assert len(picked) == 4 and len({tuple(sorted(p.items())) for p in picked}) == 4
    assert picked == candidates(space, 4, "random", seed=1)
    assert candidates(space, 100, "random", seed=1) == candidates(space, 100, "grid", seed=1)
    assert len(candidates(space, 100, "grid", seed=1)) == 6 and candidates(space, 2, "grid", 1) == [
        {"a": 1, "b": 10}, {"a": 1, "b": 20}]


def test_validation_under_a_time_holdout_never_sees_the_test_split(demo_paths):
    config = TrainConfig(holdout=Holdout(kind="time", days=14, seed=42, max_customers=None))
    data = prepared(demo_paths["interactions"], config)
    [(fit_part, validation)], test = tuning_splits(data, config)
    assert test.nnz > 0 and validation.nnz > 0
    assert not (pairs(fit_part) | pairs(validation)) & pairs(test)


def test_tune_ranks_trials_best_first_and_includes_the_current_parameters(demo_paths):
    config = TrainConfig(params={"ease": {"l2": 50.0}})
    data = prepared(demo_paths["interactions"], config)
    result = tune(data, "ease", config, trials=3, metric="recall@5", log=lambda _line: None)
    values = [t.metrics["recall@5"] for t in result.trials]
    assert values == sorted(values, reverse=True) and result.best.metrics["recall@5"] == max(values)
    assert [t.params for t in result.trials if t.current] == [{"l2": 50.0, "dropout": 0.0}]
    assert len({tuple(sorted(t.params.items())) for t in result.trials}) == len(result.trials) >= 3
    assert len({round(v, 6) for v in values}) > 1, "different parameters give different validation scores"


def test_cli_prints_a_leaderboard_and_writes_the_best_into_the_toml_keeping_the_rest(demo_paths, tmp_path):
    config_path = tmp_path / "recsvc.toml"
    config_path.write_text(CONFIG, encoding="utf-8")
    result = CliRunner().invoke(main, ["tune", "--interactions", str(demo_paths["interactions"]), "--strategy", "ease",
                                       "--trials", "3", "--metric", "ndcg@10", "--folds", "2", "--config",
                                       str(config_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "ranked by ndcg@10, the mean over 2 validation fold(s)" in lines[0]
    board = [line.split() for line in lines[3:] if line.strip() and line.split()[0].isdigit()]
    assert len(board) >= 3 and [row[0] for row in board] == [str(i) for i in range(1, len(board) + 1)]
    scores = [float(row[1]) for row in board]
    assert scores == sorted(scores, reverse=True)
    best = dict(token.split("=") for token in board[0] if "=" in token)
    written = config_path.read_text(encoding="utf-8")
    original = [line for line in CONFIG.splitlines() if line]
    kept = [line for line in written.splitlines() if line in original]
    assert kept == original, "comments, order and other tables are kept as they were"
    assert f"[strategies.ease]\ndropout = {best['dropout']}\nl2 = {best['l2']}\n" in written
    config = TrainConfig.from_file(config_path)
    assert config.params["ease"] == {"dropout": float(best["dropout"]), "l2": float(best["l2"])}
    assert config.params["als"] == {"factors": 16}
    assert config.strategies == ["als", "ease"] and config.holdout.seed == 5


def test_cli_updates_a_json_config(demo_paths, tmp_path):
    config_path = tmp_path / "recsvc.json"
    config_path.write_text(json.dumps({"strategies": {"enabled": ["ease"], "ease": {"max_items": 5000}},
                                       "evaluation": {"k": 10}}))
    result = CliRunner().invoke(main, ["tune", "--interactions", str(demo_paths["interactions"]), "--strategy", "ease",
                                       "--trials", "2", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    raw = json.loads(config_path.read_text())
    assert raw["evaluation"]["k"] == 10 and raw["strategies"]["enabled"] == ["ease"]
    assert raw["strategies"]["ease"]["max_items"] == 5000 and raw["strategies"]["ease"]["l2"] > 0


def test_cli_without_config_only_prints(demo_paths, tmp_path):
    result = CliRunner().invoke(main, ["tune", "--interactions", str(demo_paths["interactions"]), "--strategy", "ease",
                                       "--trials", "1"])
    assert result.exit_code == 0, result.output
    assert "not saved: pass --config FILE" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--strategy", "ease", "--metric", "ndcg"], "metric 'ndcg' is not one of"),
    (["--strategy", "ease", "--metric", "coverage@10"], "is not one of"),
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["--strategy", "popular"], "popular has no parameters to tune"),
])
def test_cli_refuses_bad_input_with_exit_2_and_a_message(demo_paths, args, message):
    result = CliRunner().invoke(main, ["tune", "--interactions", str(demo_paths["interactions"]), *args])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_cli_refuses_a_missing_interactions_file(tmp_path):
    result = CliRunner().invoke(main, ["tune", "--interactions", str(tmp_path / "none.csv"), "--strategy", "ease"])
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_cli_refuses_a_broken_config(demo_paths, tmp_path):
    config_path = tmp_path / "broken.toml"
    config_path.write_text("[strategies\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["tune", "--interactions", str(demo_paths["interactions"]), "--strategy", "ease",
                                       "--trials", "1", "--config", str(config_path)])
    assert result.exit_code == 2 and "cannot parse configuration" in result.stderr


def test_parse_metric():
    assert parse_metric("map@20") == ("map", 20)
    assert np.all([parse_metric(f"{m}@10")[1] == 10 for m in ("precision", "recall", "ndcg", "hit_rate")])


RECSVC_TRAIN = str(Path(sys.executable).parent / "recsvc-train")


def limit_file_size(size: int):
    """preexec_fn: files of the child cannot grow past `size` bytes (EFBIG), as on a disk that fills up."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_write_that_fails_leaves_the_config_whole(demo_paths, tmp_path):
    config_path = tmp_path / "recsvc.toml"
    config_path.write_text(CONFIG, encoding="utf-8")
    config_path.chmod(0o640)
    done = subprocess.run([RECSVC_TRAIN, "tune", "--interactions", str(demo_paths["interactions"]), "--strategy",
                           "ease", "--trials", "1", "--config", str(config_path)], capture_output=True, text=True,
                          timeout=240, preexec_fn=limit_file_size(len(CONFIG) + 8))
    assert done.returncode == 1, done.stderr  # the machine's trouble, not the user's input
    assert f"error: File too large: {config_path}" in done.stderr
    assert config_path.read_text(encoding="utf-8") == CONFIG
    assert [p.name for p in tmp_path.iterdir()] == ["recsvc.toml"]  # no temporary file left
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o640


def test_a_config_that_cannot_be_written_is_refused_before_the_trials(demo_paths, tmp_path):
    result = CliRunner().invoke(main, ["tune", "--interactions", str(demo_paths["interactions"]), "--strategy",
                                       "ease", "--trials", "1", "--config", str(tmp_path / "no-such-dir" / "x.toml")])
    assert result.exit_code == 2, result.output
    assert f"No such file or directory: {tmp_path / 'no-such-dir'}" in result.stderr
    assert "trial 1/" not in result.stderr


def tagged_catalog(demo_paths, tmp_path) -> Path:
    """The demo catalog with each item's category as its one tag."""
    with open(demo_paths["catalog"], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    path = tmp_path / "tagged.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, [*rows[0], "tags"])
        writer.writeheader()
        writer.writerows({**row, "tags": row["category"]} for row in rows)
    return path


def test_tune_and_fit_give_the_catalogs_tags_to_ease(demo_paths, tmp_path):
    config_path = tmp_path / "recsvc.toml"
    catalog = tagged_catalog(demo_paths, tmp_path)
    runs = {}
    for name, extra in (("tagged", ["--catalog", str(catalog)]), ("untagged", [])):
        config_path.write_text('[strategies]\nenabled = ["ease"]\n[strategies.ease]\nl2 = 50.0\n'
                               "[tuning.space.ease]\ntag_weight = [0.0, 2.0]\n", encoding="utf-8")
        result = CliRunner().invoke(main, ["tune", "--interactions", str(demo_paths["interactions"]), *extra,
                                           "--strategy", "ease", "--search", "grid", "--trials", "2", "--folds", "1",
                                           "--config", str(config_path)])
        assert result.exit_code == 0, result.output
        runs[name] = {re.search(r"tag_weight=([\d.]+)", row)[1]: float(row.split()[1])
                      for row in result.stdout.splitlines() if "tag_weight=" in row}
    assert runs["untagged"]["0.0"] == runs["untagged"]["2.0"], "without a catalog tag_weight changes nothing"
    assert runs["tagged"]["0.0"] == runs["untagged"]["0.0"]
    assert runs["tagged"]["2.0"] != runs["tagged"]["0.0"], "the catalog's tags reached ease"

    config_path.write_text('[strategies]\nenabled = ["ease"]\n[strategies.ease]\nl2 = 50.0\ntag_weight = 2.0\n',
                           encoding="utf-8")
    for name, extra, applied in (("tagged", ["--catalog", str(catalog)], 2.0), ("untagged", [], 0.0)):
        registry = tmp_path / f"registry-{name}"
        result = CliRunner().invoke(main, ["fit", "--interactions", str(demo_paths["interactions"]), *extra,
                                           "--registry", str(registry), "--config", str(config_path), "--quiet"])
        assert result.exit_code == 0, result.output
        (version,) = (registry / "versions").iterdir()
        manifest = json.loads((version / "manifest.json").read_text())
        assert manifest["strategies"]["ease"]["params"]["tag_weight"] == applied
