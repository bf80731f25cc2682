"""Offline evaluation: a per-customer holdout and ranking metrics at k."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from recsvc.scoring import Scorer, top_k_batch

METRICS = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")


@dataclass(frozen=True)
class Holdout:
    """Per-customer random holdout: each sampled customer with at least `min_items` items
    gives `fraction` of their distinct items (rounded, at least one) to the test split."""

    fraction: float = 0.2
    seed: int = 42
    min_items: int = 2
    max_customers: int | None = 10_000  # evaluation is sampled: training twice would double the cost

    def as_dict(self) -> dict:
        return {"kind": "random", **asdict(self)}


def split(matrix: sp.csr_matrix, holdout: Holdout) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(train, test) with the same shape; every nonzero of `matrix` lands in exactly one."""
    matrix = matrix.tocsr()
    rng = np.random.default_rng(holdout.seed)
    row_length = np.diff(matrix.indptr)
    eligible = np.flatnonzero(row_length >= holdout.min_items)
    if holdout.max_customers is not None and len(eligible) > holdout.max_customers:
        eligible = np.sort(rng.choice(eligible, holdout.max_customers, replace=False))
    n_test = np.zeros(matrix.shape[0], dtype=np.int64)
    lengths = row_length[eligible]
    # Same rounding as a ratio split that keeps round((1 - fraction) * n) items for training.
    n_test[eligible] = np.maximum(1, lengths - np.round((1 - holdout.fraction) * lengths).astype(np.int64))
    rows = np.repeat(np.arange(matrix.shape[0]), row_length)
    keys = rng.random(matrix.nnz)
    order = np.lexsort((keys, rows))  # shuffle within each row
    position = np.empty(matrix.nnz, dtype=np.int64)
    position[order] = np.arange(matrix.nnz) - matrix.indptr[rows[order]]
    is_test = position < n_test[rows]
    return _subset(matrix, ~is_test), _subset(matrix, is_test)


def _subset(matrix: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    coo = matrix.tocoo()
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=matrix.shape, dtype=matrix.dtype)


def evaluate(scorer: Scorer, train: sp.csr_matrix, test: sp.csr_matrix, k: int = 10,
             exclude_items: np.ndarray | None = None, batch_size: int = 512) -> dict[str, float]:
    """Mean metrics@k over customers with test items; training items are never recommended.

    MAP follows Microsoft Recommenders (sum of precisions at hits / number of test items),
    nDCG uses binary relevance; coverage is the share of items recommended to anyone.
    """
    customers = np.flatnonzero(np.diff(test.indptr) > 0)
    totals = dict.fromkeys(METRICS[:-1], 0.0)
    recommended = np.zeros(train.shape[1], dtype=bool)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    for start in range(0, len(customers), batch_size):
        batch = customers[start : start + batch_size]
        history = train[batch]
        scores = np.asarray(scorer.scores_batch(batch, history), dtype=np.float32)
        scores[history.nonzero()] = -np.inf
        if exclude_items is not None and len(exclude_items):
            scores[:, exclude_items] = -np.inf
        top = top_k_batch(scores, k)
        recommended[top.ravel()] = True
        relevant = test[batch]
        hits = np.asarray(relevant[np.arange(len(batch))[:, None], top].todense()) > 0
        n_relevant = np.diff(relevant.indptr)
        n_hits = hits.sum(axis=1)
        ideal = np.cumsum(discount)[np.minimum(n_relevant, k) - 1]
        precision_at_hit = np.cumsum(hits, axis=1) / np.arange(1, k + 1) * hits
        totals["precision"] += (n_hits / k).sum()
        totals["recall"] += (n_hits / n_relevant).sum()
        totals["ndcg"] += ((hits * discount).sum(axis=1) / ideal).sum()
        totals["map"] += (precision_at_hit.sum(axis=1) / n_relevant).sum()
        totals["hit_rate"] += (n_hits > 0).sum()
    count = max(len(customers), 1)
    result = {f"{name}@{k}": float(total / count) for name, total in totals.items()}
    result[f"coverage@{k}"] = float(recommended.mean()) if train.shape[1] else 0.0
    result["customers"] = int(len(customers))
    return result
