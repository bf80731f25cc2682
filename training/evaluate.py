"""Offline evaluation: a per-customer holdout and ranking metrics at k."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from recsvc.errors import InvalidInput
from recsvc.scoring import Scorer, top_k_batch

METRICS = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")
EVALUATION_THREADS = min(4, os.cpu_count() or 1)


HOLDOUT_KINDS = ("random", "time")


@dataclass(frozen=True)
class Holdout:
    """Which interactions are held out to test on.

    random: each sampled customer with at least `min_items` items gives `fraction` of their
            distinct items (rounded, at least one) to the test split.
    time:   each sampled customer with at least `min_items` items before the cutoff (the newest
            event minus `days`) gives the items they first touched after it to the test split;
            their events after the cutoff are removed from training. With max_customers=None
            every customer is sampled: a strict train-before, test-after split.
    """

    kind: str = "random"
    fraction: float = 0.2
    days: float = 7.0
    seed: int = 42
    min_items: int = 2
    max_customers: int | None = 10_000  # evaluation is sampled: training twice would double the cost

    def __post_init__(self):
        if self.kind not in HOLDOUT_KINDS:
            raise ValueError(f"holdout kind must be one of {', '.join(HOLDOUT_KINDS)}, not {self.kind!r}")
        if not 0 < self.fraction < 1 or self.days <= 0 or self.min_items < 1 or self.seed < 0:
            raise ValueError("holdout needs 0 < fraction < 1, days > 0, min_items >= 1 and seed >= 0")

    def as_dict(self) -> dict:
        """The definition recorded in the manifest; only the fields that matter for its kind."""
        shared = {"kind": self.kind, "seed": self.seed, "min_items": self.min_items,
                  "max_customers": self.max_customers}
        return {**shared, "fraction": self.fraction} if self.kind == "random" else {**shared, "days": self.days}


def _sample(rng: np.random.Generator, eligible: np.ndarray, max_customers: int | None) -> np.ndarray:
    if max_customers is not None and len(eligible) > max_customers:
        return np.sort(rng.choice(eligible, max_customers, replace=False))
    return eligible


def split(matrix: sp.csr_matrix, holdout: Holdout) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Random holdout: (train, test) with the same shape; every nonzero of `matrix` lands in exactly one."""
    matrix = matrix.tocsr()
    rng = np.random.default_rng(holdout.seed)
    row_length = np.diff(matrix.indptr)
    eligible = _sample(rng, np.flatnonzero(row_length >= holdout.min_items), holdout.max_customers)
    n_test = np.zeros(matrix.shape[0], dtype=np.int64)
    lengths = row_length[eligible]
    # Same rounding as a ratio split that keeps round((1 - fraction) * n) items for training.
    n_test[eligible] = np.maximum(1, lengths - np.round((1 - holdout.fraction) * lengths).astype(np.int64))
    rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int32), row_length)
    keys = rng.random(matrix.nnz)
    # Shuffle within each sampled row only: the same order a full sort would give those rows, at a
    # fraction of the cost when max_customers samples a few thousand of millions.
    sampled = np.flatnonzero(n_test[rows] > 0)
    order = sampled[np.lexsort((keys[sampled], rows[sampled]))]
    is_test = np.zeros(matrix.nnz, dtype=bool)
    is_test[order] = np.arange(len(order)) - np.searchsorted(rows[order], rows[order]) < n_test[rows[order]]
    return _subset(matrix, ~is_test, rows), _subset(matrix, is_test, rows)


def split_by_time(matrix: sp.csr_matrix, customer: np.ndarray, item: np.ndarray, strength: np.ndarray,
                  timestamp: np.ndarray, holdout: Holdout) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Time holdout (see Holdout) from per-event rows; `matrix` is the aggregate of those rows."""
    cutoff = float(timestamp.max()) - holdout.days * 86_400
    late = timestamp >= cutoff
    early_pairs = _pairs(customer[~late], item[~late], matrix.shape)
    rng = np.random.default_rng(holdout.seed)
    has_late = np.bincount(customer[late], minlength=matrix.shape[0]) > 0
    eligible = np.flatnonzero(has_late & (np.diff(early_pairs.indptr) >= holdout.min_items))
    sampled = np.zeros(matrix.shape[0], dtype=bool)
    sampled[_sample(rng, eligible, holdout.max_customers)] = True
    held = late & sampled[customer]
    train = sp.csr_matrix((strength[~held], (customer[~held], item[~held])), shape=matrix.shape, dtype=np.float32)
    test = _pairs(customer[held], item[held], matrix.shape)
    test = test - test.multiply(early_pairs)  # items known before the cutoff are not new: not tested
    test.eliminate_zeros()
    return train, test.astype(np.float32)


def _pairs(customer: np.ndarray, item: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A 0/1 customers x items matrix of the distinct pairs."""
    pairs = sp.csr_matrix((np.ones(len(customer), dtype=np.float32), (customer, item)), shape=shape)
    pairs.sum_duplicates()
    pairs.data[:] = 1.0
    return pairs


def _subset(matrix: sp.csr_matrix, keep: np.ndarray, rows: np.ndarray) -> sp.csr_matrix:
    """The nonzeros where `keep` holds (`rows`: the row of each nonzero), built straight from the CSR arrays."""
    indptr = np.zeros(matrix.shape[0] + 1, dtype=matrix.indptr.dtype)
    np.cumsum(np.bincount(rows[keep], minlength=matrix.shape[0]), out=indptr[1:])
    return sp.csr_matrix((matrix.data[keep], matrix.indices[keep], indptr), shape=matrix.shape)


def evaluate(scorer: Scorer, train: sp.csr_matrix, test: sp.csr_matrix, k: int = 10,
             exclude_items: np.ndarray | None = None, batch_size: int = 64) -> dict[str, float]:
    """Mean metrics@k over customers with test items; training items are never recommended.

    MAP follows Microsoft Recommenders (sum of precisions at hits / number of test items),
    nDCG uses binary relevance; coverage is the share of items recommended to anyone. A customer with
    fewer than k recommendable items (unowned, active, scored) gets a shorter list, as the API would give:
    the missing places are misses, never an owned or inactive item.
    Batches run on a few threads: numpy's matrix products and partitions release the GIL. They are
    small (64 customers x every item stays in the tens of megabytes), because big fresh arrays cost
    more in page faults than the products themselves.
    """
    check_k(k, train.shape[1])
    customers = np.flatnonzero(np.diff(test.indptr) > 0)
    ranking = None if scorer.personal else _global_ranking(scorer, exclude_items)

    def batch_totals(start: int) -> tuple[np.ndarray, np.ndarray]:
        batch = customers[start : start + batch_size]
        history = train[batch]
        top = _top_batch(scorer, batch, history, k, exclude_items) if ranking is None \
            else _top_from_ranking(ranking, history, k)
        return _metric_sums(top, test[batch], k), top

    totals = np.zeros(len(METRICS) - 1)
    recommended = np.zeros(train.shape[1], dtype=bool)
    with ThreadPoolExecutor(max_workers=EVALUATION_THREADS) as pool:
        for sums, top in pool.map(batch_totals, range(0, len(customers), batch_size)):
            totals += sums
            recommended[top[top >= 0]] = True
    count = max(len(customers), 1)
    result = {f"{name}@{k}": float(total / count) for name, total in zip(METRICS[:-1], totals)}
    result[f"coverage@{k}"] = float(recommended.mean()) if train.shape[1] else 0.0
    result["customers"] = int(len(customers))
    return result


def check_k(k: int, items: int, setting: str = "[evaluation] k in the config") -> None:
    """InvalidInput when a list of k cannot be filled from the catalogue at all; callers check before fitting.
    `setting` names what sets k for the command that runs (fit and nightly have no --k)."""
    if k > items:
        raise InvalidInput(f"k = {k} is more than the {items:,} items there are to recommend; set {setting} to at "
                           "most that")


def _metric_sums(top: np.ndarray, relevant: sp.csr_matrix, k: int) -> np.ndarray:
    """Sums over a batch of precision, recall, nDCG, MAP and hit rate (the order of METRICS); `top` holds k
    item positions per customer, -1 for a place left empty."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    hits = (np.asarray(relevant[np.arange(top.shape[0])[:, None], np.maximum(top, 0)].todense()) > 0) & (top >= 0)
    n_relevant = np.diff(relevant.indptr)
    n_hits = hits.sum(axis=1)
    ideal = np.cumsum(discount)[np.minimum(n_relevant, k) - 1]
    precision_at_hit = np.cumsum(hits, axis=1) / np.arange(1, k + 1) * hits
    return np.array([(n_hits / k).sum(), (n_hits / n_relevant).sum(), ((hits * discount).sum(axis=1) / ideal).sum(),
                     (precision_at_hit.sum(axis=1) / n_relevant).sum(), (n_hits > 0).sum()])


def _top_batch(scorer: Scorer, batch: np.ndarray, history: sp.csr_matrix, k: int,
               exclude_items: np.ndarray | None) -> np.ndarray:
    scores = np.asarray(scorer.scores_batch(batch, history), dtype=np.float32)
    scores[history.nonzero()] = -np.inf
    if exclude_items is not None and len(exclude_items):
        scores[:, exclude_items] = -np.inf
    top = top_k_batch(scores, k)
    # With fewer than k items left to recommend, top-k picks excluded ones (-inf): the API would not list them.
    return np.where(np.isfinite(np.take_along_axis(scores, top, axis=1)), top, -1)


def _global_ranking(scorer: Scorer, exclude_items: np.ndarray | None) -> np.ndarray:
    """Every recommendable item, best first, for a scorer that ranks all customers alike."""
    scores = np.array(scorer.scores(None, np.empty(0, dtype=np.int64)), dtype=np.float32)
    if exclude_items is not None and len(exclude_items):
        scores[exclude_items] = -np.inf
    order = np.argsort(-scores, kind="stable")
    return order[np.isfinite(scores[order])]


def _top_from_ranking(ranking: np.ndarray, history: sp.csr_matrix, k: int) -> np.ndarray:
    """Each customer's k best unowned items from one global ranking: only the first k + (longest history)
    ranked items can be needed, so no customers x items score matrix is built."""
    candidates = ranking[: k + int(np.diff(history.indptr).max(initial=0))]
    # k places of no item (-1, counted as owned) after the ranking: a short ranking leaves places empty.
    owned = np.hstack([history[:, candidates].toarray() != 0, np.ones((history.shape[0], k), dtype=bool)])
    pick = np.argsort(owned, axis=1, kind="stable")[:, :k]  # unowned first, in rank order
    top = np.append(candidates, np.full(k, -1))[pick]
    top[np.take_along_axis(owned, pick, axis=1)] = -1
    return top
