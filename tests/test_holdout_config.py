"""The trainer config's [evaluation.holdout] table: 0 means every customer, since TOML has no null."""

from __future__ import annotations

import pytest

from recsvc.errors import InvalidInput
from training.config import TrainConfig


@pytest.mark.parametrize("value, expected", [(0, None), (500, 500)])
def test_max_customers_zero_means_every_customer(tmp_path, value, expected):
    path = tmp_path / "train.toml"
    path.write_text(f"[evaluation.holdout]\nfraction = 0.25\nmax_customers = {value}\n", encoding="utf-8")
    holdout = TrainConfig.from_file(path).holdout
    assert holdout.max_customers == expected and holdout.fraction == 0.25


def test_max_customers_left_out_keeps_the_sampled_default():
    assert TrainConfig.from_dict({"evaluation": {"holdout": {"seed": 1}}}).holdout.max_customers == 10_000


def test_negative_max_customers_is_refused_with_a_message():
    with pytest.raises(InvalidInput, match="max_customers must be 0 .every customer. or more, not -1"):
        TrainConfig.from_dict({"evaluation": {"holdout": {"max_customers": -1}}})


def test_tuning_section_sets_folds_and_validation_fraction():
    tuning = TrainConfig.from_dict({"tuning": {"folds": 5, "validation_fraction": 0.1}}).tuning
    assert (tuning.folds, tuning.validation_fraction) == (5, 0.1)
    assert (TrainConfig().tuning.folds, TrainConfig().tuning.validation_fraction) == (1, None)


@pytest.mark.parametrize("tuning, message", [({"folds": 0}, "tuning.folds must be at least 1"),
                                             ({"validation_fraction": 1.5}, "between 0 and 1"),
                                             ({"fold": 2}, r"unknown key fold in \[tuning\]")])
def test_bad_tuning_section_is_refused_with_a_message(tuning, message):
    with pytest.raises(InvalidInput, match=message):
        TrainConfig.from_dict({"tuning": tuning})
