"""Suggestion quality on seeded synthetic data: ALS must clearly beat the popularity baseline."""

from __future__ import annotations

from training.config import TrainConfig
from training.demo_data import DemoSizes, write
from training.pipeline import fit_and_publish

# Measured when written: ALS ~0.32 vs popular ~0.14 nDCG@10 on this data. The stated margin
# leaves room for seeds and library versions while failing any model that learns no taste.
MIN_RATIO = 1.5
MIN_GAIN = 0.08


def test_als_beats_popular_on_held_out_demo_data(tmp_path):
    paths = write(tmp_path / "demo", DemoSizes(customers=2000, items=400, interactions=50_000), seed=11)
    result = fit_and_publish(paths["interactions"], tmp_path / "registry", TrainConfig(strategies=["als"]),
                             catalog_path=paths["catalog"], log=lambda _line: None)
    als, popular = result.metrics["als"]["ndcg@10"], result.metrics["popular"]["ndcg@10"]
    assert result.metrics["als"]["customers"] >= 1500  # the holdout covers most customers
    assert als >= MIN_RATIO * popular and als - popular >= MIN_GAIN, f"als {als:.4f} vs popular {popular:.4f}"
    assert result.default_strategy == "als"
