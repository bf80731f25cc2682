"""The final ranking of personal suggestions, bit for bit the same in the server and in the cache warm-up.

The server scores one customer with a matrix-vector product; the cache warm-up
(training/warm.py) scores a thousand at once with a matrix product. The two
round float32 differently in the last bits, which would change the reported
scores (6 decimals) and the order of near-ties, so neither ranks by them. They
only pick candidates: every item whose float32 score is within twice the
scorer's error bound of the k-th best, a set that surely holds the true top k.
The order and the reported scores then come from Scorer.exact_scores (float64
sums in a fixed order) of the candidates alone; ties go to the lower item
position. Both paths call personal_top below.
"""

from __future__ import annotations

import numpy as np

from recsvc.scoring import Scorer, sample_thresholds

DECIMALS = 6  # of a reported score
# Below this magnitude a double's ulp is under 1e-6, so round(score, 6), applied again when the response is
# built (Recommender.item_fields), gives back a score numpy rounded to 6 decimals unchanged.
EXACT_ROUNDING_LIMIT = 2.0**32



def personal_top(scorer: Scorer, customers: np.ndarray, histories: np.ndarray, scores: np.ndarray,
                 limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(item positions, reported scores), each (customers x at most `limit`), best first, -1 and 0.0 where a
    customer has fewer items with a positive score (zero or less: their items say nothing for it).

    `scores` are float32 scores (customers x items) from scores() or scores_batch(), with -inf for excluded
    items; `histories` hold each customer's items, padded with -1.
    """
    _magnitude, error = scorer.score_bounds(customers, histories)
    candidates = _candidates(scores, limit, 2 * error)
    exact = scorer.exact_scores(customers, histories, np.maximum(candidates, 0))
    exact = np.where(candidates >= 0, exact, -np.inf)
    order = np.lexsort((candidates, -exact), axis=-1)[:, :limit]
    rows = np.arange(len(order))[:, None]
    positions, best = candidates[rows, order], exact[rows, order]
    keep = best > 0
    return np.where(keep, positions, -1), reported(np.where(keep, best, 0.0))


def reported(scores: np.ndarray) -> np.ndarray:
    """Scores as a response shows them: rounded to 6 decimals, so that round(score, 6) changes them no more."""
    rounded = np.round(scores, DECIMALS)
    large = np.abs(rounded) >= EXACT_ROUNDING_LIMIT
    if large.any():
        rounded[large] = [round(float(s), DECIMALS) for s in scores[large]]
    return rounded


def _candidates(scores: np.ndarray, limit: int, margin: np.ndarray) -> np.ndarray:
    """Per row, the positions of the finite scores at least the k-th best minus `margin`, padded with -1.

    Every item whose exact score can be in the top k is among them: the k-th best exact score is at least
    the k-th best float32 one less one error, so a top item's float32 score is at least that less two.
    Found through groups of `_block(items)` items (item g, g + G, g + 2G, ... for G groups, and the remainder as one
    more): the k-th best group maximum is a lower bound of the k-th best score, so only groups whose
    maximum reaches it less the margin are searched (a full partition of every row and a scan of the whole
    matrix cost several times more).
    """
    n, items = scores.shape
    if n == 1:  # the server's one customer: a sampled threshold is cheaper than the groups' dozen steps
        return _row_candidates(scores[0], limit, float(margin[0]))[None, :]
    block = _block(items)
    groups = items // block
    if groups < 2 * limit:
        return _chosen(scores, np.arange(items), limit, margin)
    maxima = np.full((n, groups + 1), -np.inf, dtype=scores.dtype)
    maxima[:, :groups] = scores[:, :block * groups].reshape(n, block, groups).max(axis=1)
    if block * groups < items:
        maxima[:, groups] = scores[:, block * groups:].max(axis=1)
    lower = np.partition(maxima, groups + 1 - limit, axis=1)[:, groups + 1 - limit]
    searched = _padded(maxima >= (lower - margin)[:, None])
    members = np.arange(block) * groups  # of group g: g + members; of the remainder: block * groups + arange
    columns = np.where(searched[:, :, None] < groups, searched[:, :, None] + members,
                       block * groups + np.arange(block)).reshape(n, -1)
    columns[(np.repeat(searched, block, axis=1) < 0) | (columns >= items)] = -1
    flat = np.arange(n)[:, None] * items + np.maximum(columns, 0)
    return _chosen(np.where(columns >= 0, scores.ravel()[flat], -np.inf), columns, limit, margin)


def _block(items: int) -> int:
    """Items per group in _candidates: more groups cost more to rank, larger ones more to search. Measured on
    1,000 customers (CPU, make bench-cache's model and random factors): 8 was fastest with 2,000 items (20%
    faster than 16), 16 with 20,000, 24 to 64 alike with 100,000 (32: 13% faster than 16)."""
    return 8 if items <= 4096 else 16 if items <= 32768 else 32


def _row_candidates(scores: np.ndarray, limit: int, margin: float) -> np.ndarray:
    """_candidates of one row."""
    if len(scores) > limit:
        kth, threshold, upper = _kth_best(scores, limit)
        if np.isfinite(kth):
            bound = kth - margin
            # Every score at least `bound` is then in `upper`, and a second pass over all scores is not needed.
            found = upper[scores[upper] >= bound] if bound >= threshold else np.flatnonzero(scores >= bound)
            return found if len(found) else np.full(1, -1)
    found = np.flatnonzero(np.isfinite(scores))
    return found if len(found) else np.full(1, -1)


def _kth_best(scores: np.ndarray, limit: int) -> tuple[np.floating, float, np.ndarray]:
    """(the limit-th best score, a threshold, the positions of the scores not below it): the k-th best as a
    partition of every score would find it (NaN above any number), from the few hundred scores that a
    threshold sampled by recsvc.scoring.sample_thresholds lets through. They hold the `limit` best whenever
    they are at least `limit` (the last threshold, -inf, lets all through), so the answer is the same; the
    partition of all 100,000 scores and its 400 KB copy cost the server's request more than a sample does.
    """
    for threshold in sample_thresholds(scores, limit):
        below = scores < threshold
        upper = np.flatnonzero(np.logical_not(below, out=below))  # NaN too: the partition ranks it above all
        if len(upper) >= limit:
            break
    values = scores[upper]
    return np.partition(values, len(values) - limit)[len(values) - limit], threshold, upper


def _chosen(scores: np.ndarray, columns: np.ndarray, limit: int, margin: np.ndarray) -> np.ndarray:
    """columns (per row, or shared) of the finite scores at least the k-th best less margin, padded with -1."""
    n, width = scores.shape
    if width > limit:
        kth = np.partition(scores, width - limit, axis=1)[:, width - limit]
        # Fewer than `limit` finite scores: the k-th is -inf and every finite one is a candidate.
        threshold = np.where(np.isfinite(kth), kth - margin, -np.inf)
        chosen = scores >= threshold[:, None]
        if not np.isfinite(threshold).all():
            chosen &= np.isfinite(scores)
    else:
        chosen = np.isfinite(scores)
    return _padded(chosen, columns)


def _padded(chosen: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """Per row, the indices of the True entries (or the `columns` there: per row, or one row for all),
    padded with -1 to the longest row. From the flat positions (a 2-d nonzero costs three times as much);
    rows that all hold as many need no padding."""
    n, width = chosen.shape
    flat = np.flatnonzero(chosen)
    rows = flat // width
    indices = flat - rows * width
    if columns is not None:
        indices = columns[indices] if columns.ndim == 1 else columns.reshape(-1)[flat]
    counts = np.bincount(rows, minlength=n)
    longest = max(int(counts.max(initial=0)), 1)
    if (counts == longest).all():
        return indices.reshape(n, longest)
    slots = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
    padded = np.full((n, longest), -1, dtype=np.int64)
    padded.reshape(-1)[rows * longest + slots] = indices
    return padded
