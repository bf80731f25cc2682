"""Scorers: the trained arrays of a strategy and the arithmetic that turns them into item scores.

The trainer produces a scorer (training/strategies), the registry stores it
(recsvc/artifacts.py) and the server asks it for scores; nothing here trains.
These kinds cover every strategy:

- factors:          customer and item latent factors (ALS, BPR); score = U[c] . V[i]
- item_similarity:  an item x item matrix S (item-KNN sparse, EASE dense); score = history . S
- popularity:       one score per item, the same for every customer
- blend:            a weighted sum of other scorers (EASE with ALS), each part's arrays prefixed by its name
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from recsvc.checks import MAX_WEIGHT, check_csr, check_floats, check_vector, require
from recsvc.errors import ArtifactError
from recsvc.files import naming, save_array

SCORER_FILE = "scorer.json"
# Up to this many items, approximate cosines for reasons come from one cached item x item matrix (64 MB).
GRAM_ITEMS = 4096


# top_k (and recsvc.ranking for one customer) looks for its answer among the items scoring at least a threshold
# estimated from a strided sample of SAMPLE_SIZE scores, instead of ordering all of them: it aims at
# 4 k + MIN_CANDIDATES candidates (see sample_thresholds).
SAMPLE_SIZE = 2048
MIN_CANDIDATES = 128


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None, *, blocked: np.ndarray | None = None,
          among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best item positions by score and their scores, best first; equal scores: lower position first.

    Never an `exclude`d position, one `blocked` is True for (a bool per item), or one with a non-finite
    score; only positions in `among` (sorted) when given. `scores` is modified in place when `exclude` is
    given. May return fewer than k items when fewer are left. Exact: the same answer as sorting every
    eligible item, from a few hundred candidates in the usual case.
    """
    if exclude is not None and len(exclude):
        scores[exclude] = -np.inf
    values = scores if among is None else scores[among]
    if among is not None and blocked is not None:
        blocked = blocked[among]
    chosen = _best(values, k, blocked)
    return (chosen if among is None else among[chosen]), values[chosen]


def _best(values: np.ndarray, k: int, blocked: np.ndarray | None) -> np.ndarray:
    """Indexes into `values` of its k best finite, unblocked entries, best first (ties: lower index first)."""
    k = min(k, len(values))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    for threshold in sample_thresholds(values, k):
        candidates = np.flatnonzero(values >= threshold)  # every entry this good: ties with the k-th are in
        if blocked is not None:
            candidates = candidates[~blocked[candidates]]
        candidates = candidates[np.isfinite(values[candidates])]
        if len(candidates) >= k:
            break
    picked = values[candidates]
    if len(candidates) > 8 * k:  # many (a wide threshold): keep the k-th best value and better, ties included
        kth = np.partition(picked, len(picked) - k)[len(picked) - k]
        candidates, picked = candidates[picked >= kth], picked[picked >= kth]
    # candidates ascend, so a stable sort orders equal scores by position
    return candidates[np.argsort(-picked, kind="stable")[:k]]


def sample_thresholds(values: np.ndarray, k: int):
    """Decreasing score thresholds to try when looking for the k best: the first is expected to let about
    4 k + MIN_CANDIDATES entries through (the matching quantile of a strided sample), the next 32 times as
    many; the last, -inf, lets everything through. A threshold only decides how many candidates are looked
    at, never which of them win, so a poor sample (scores that follow the item order) costs time, not
    exactness."""
    want = 4 * k + MIN_CANDIDATES
    n = len(values)
    stride = n // SAMPLE_SIZE
    if stride >= 4 and want * 8 < n:
        sample = values[::stride]
        for aim in (want, 32 * want):
            above = -(-aim * len(sample) // n)  # sample entries expected at or above the threshold (ceiling)
            if above >= len(sample):
                break
            yield np.partition(sample, len(sample) - above)[len(sample) - above]
    yield -np.inf


def top_k_batch(scores: np.ndarray, k: int) -> np.ndarray:
    """Row-wise top-k positions (best first) of a dense (customers x items) score matrix."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def fixed_sum(terms: np.ndarray, axis: int) -> np.ndarray:
    """Float64 sums of `terms` along `axis` in a fixed order: padded with zeros to a power of two, then
    neighbours added pairwise, level by level (log2 steps, not one per term). A sum's operations depend
    on its own terms only: neither on the sums computed alongside nor on zeros padding it further (they
    only add exact zeros at the top), so a batch and one customer alone give the same bits, unlike sum
    or a matrix product, whose order varies with shapes. The final + 0.0 turns a -0.0 into 0.0."""
    terms = np.asarray(terms, dtype=np.float64)
    if axis != 0:
        terms = np.moveaxis(terms, axis, 0)
    if len(terms) == 0:
        return np.zeros(terms.shape[1:], dtype=np.float64)
    size = 1 << (len(terms) - 1).bit_length()
    if size > len(terms):
        terms = np.concatenate([terms, np.zeros((size - len(terms), *terms.shape[1:]))])
    while len(terms) > 1:
        terms = terms[0::2] + terms[1::2]
    return terms[0] + 0.0


def index_of(positions: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct positions, sorted; each position's index among them): np.unique with return_inverse,
    without its sort (positions are below `size`)."""
    present = np.zeros(size, dtype=bool)
    present[positions] = True
    distinct = np.flatnonzero(present)
    index = np.cumsum(present) - 1
    return distinct, index[positions]


def rounding_bound(terms: int) -> float:
    """Relative error bound of a float32 sum or dot product of `terms` terms, in any order of operations
    (BLAS kernels, FMA): twice the classic gamma_n = n u / (1 - n u), u = 2**-24, with room for the
    float64 arithmetic of the exact side."""
    return 2.0 * (terms + 2) * 2.0**-24


class Scorer(ABC):
    """Scores items for a customer (known by position, or described by a list of items)."""

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type["Scorer"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:  # a subclass keeping its parent's kind (a test's variant) must not replace it
            Scorer.registry[cls.kind] = cls

    @abstractmethod
    def scores(self, customer: int | None, history: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Float32 scores for every item. `customer` is the customer's row in the model, or None
        for a customer the model does not know; `history` holds item positions that describe them
        (their items, or the items in the current conversation). Written into `out` (float32, one
        per item) and returned when given, so a server thread can reuse one buffer (a model whose arrays
        are not float32 returns a new array of its own dtype instead)."""

    @abstractmethod
    def scores_batch(self, customers: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        """Dense (len(customers) x items) scores; row j of `history` belongs to customers[j]."""

    @abstractmethod
    def similar(self, item: int) -> np.ndarray:
        """Similarity of every item to `item`."""

    def contributions(self, item: int, history: np.ndarray) -> np.ndarray:
        """How much each history item speaks for recommending `item` (same order as history), float64:
        contributions_batch for one item, so the server and the cache warm-up weigh reasons alike."""
        history = np.asarray(history)
        if not len(history):
            return np.empty(0, dtype=np.float64)
        return self.contributions_batch(np.array([item]), history[None, :])[0]

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        ...

    # --- exact arithmetic for the final ranking (recsvc/ranking.py) ---
    # `histories` are item positions, one row per customer, padded with -1 at the end.

    @abstractmethod
    def exact_scores(self, customers: np.ndarray, histories: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Float64 (customers x candidates) scores of items[j] for customers[j] (all known to the model).
        Each is one fixed sequence of float64 operations on the stored arrays, so it has the same bits
        whatever else is computed in the same call, on any machine."""

    @abstractmethod
    def score_bounds(self, customers: np.ndarray, histories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(magnitude, error) per customer: every exact score is at most `magnitude` in absolute value,
        and scores() and scores_batch() differ from it by at most `error`."""

    @abstractmethod
    def contributions_batch(self, items: np.ndarray, histories: np.ndarray) -> np.ndarray:
        """Float64 (pairs x history) contributions of histories[p] to items[p], exact like exact_scores;
        the padding's columns hold anything."""

    def contributions_to(self, items: np.ndarray, history: np.ndarray) -> np.ndarray:
        """contributions_batch of each of `items` against one history (items x history), the same bits: the
        server's reasons for one customer."""
        return self.contributions_batch(items, np.broadcast_to(history, (len(items), len(history))))

    def approx_contributions_batch(self, items: np.ndarray, histories: np.ndarray) -> tuple[np.ndarray, float]:
        """(contributions, error bound): cheaper ones where they can be, within `error` of the exact ones;
        -inf in the padding's columns. For the cache warm-up, which decides with the exact ones where the
        error could matter."""
        return np.where(histories >= 0, self.contributions_batch(items, histories), -np.inf), 0.0

    @property
    def personal(self) -> bool:
        """False for scorers that rank every customer alike (popularity)."""
        return True

    def params(self) -> dict:
        return {}

    def check(self, n_customers: int, n_items: int, name: str) -> None:
        """Raise ArtifactError when the arrays do not fit the bundle's id maps or hold what no trained model
        does (another dtype, values that are not finite): see recsvc.checks."""

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, array in self.arrays().items():
            save_array(directory / f"{name}.npy", array)
        with naming(directory / SCORER_FILE):
            (directory / SCORER_FILE).write_text(json.dumps({"kind": self.kind, "params": self.params()}),
                                                 encoding="utf-8")

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict) -> "Scorer":
        return cls(**arrays, **params)


def load_scorer(directory: Path, *, mmap: bool = True) -> Scorer:
    try:
        spec = json.loads((directory / SCORER_FILE).read_text(encoding="utf-8"))
        cls = Scorer.registry[spec["kind"]]
        arrays = {
            # np.asarray: a plain view of the memmap (same shared pages, no per-index memmap overhead)
            p.stem: np.asarray(np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False))
            for p in sorted(directory.glob("*.npy"))
        }
        return cls.from_arrays(arrays, spec.get("params", {}))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"cannot load strategy arrays in {directory.name}: {exc}") from exc


class FactorScorer(Scorer):
    """Latent factors. Unknown customers are folded in from their history by one ALS least-squares step.

    The item factors are kept (and saved) transposed, factors x items, one row per factor: a customer's
    scores are then one pass of axpy-like updates over contiguous rows, which OpenBLAS runs about 40%
    faster than one dot product per item row (measured: 0.46 against 0.76 ms for 100k items x 64 factors).
    Versions saved before this layout hold `item_factors` (items x factors) and are transposed once at load.
    """

    kind = "factors"

    def __init__(self, user_factors: np.ndarray, item_factors: np.ndarray | None = None,
                 item_norms: np.ndarray | None = None, regularization: float = 0.01, *,
                 item_factors_t: np.ndarray | None = None):
        self.user_factors = user_factors
        # A copy only when given items x factors (a fitted model, an old version); a loaded one stays mapped.
        self.item_factors_t = np.ascontiguousarray(item_factors.T if item_factors_t is None else item_factors_t)
        self.item_norms = item_norms if item_norms is not None else _row_norms(self.item_factors)
        self.regularization = float(regularization)
        # Small (factors x factors), cheap to compute per process. Damaged factors can overflow here; the
        # version's check (finite values) refuses them, with a message instead of numpy's warning in the log.
        with np.errstate(over="ignore", invalid="ignore"):
            self._gram = (self.item_factors_t @ self.item_factors_t.T).astype(np.float64)

    @property
    def item_factors(self) -> np.ndarray:
        """Items x factors (a view of the stored transposed array)."""
        return self.item_factors_t.T

    def params(self) -> dict:
        return {"regularization": self.regularization}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"user_factors": self.user_factors, "item_factors_t": self.item_factors_t, "item_norms": self.item_norms}

    def check(self, n_customers: int, n_items: int, name: str) -> None:
        require(self.user_factors.ndim == 2, f"{name}: user_factors has shape {self.user_factors.shape}")
        if self.user_factors.shape[0] != n_customers or self.item_factors.shape[0] != n_items:
            raise ArtifactError(f"{name}: factor shapes {self.user_factors.shape}/{self.item_factors.shape} "
                                f"do not match {n_customers} customers x {n_items} items")
        if self.user_factors.shape[1] != self.item_factors.shape[1]:
            raise ArtifactError(f"{name}: customer and item factors differ in width")
        check_floats(self.user_factors, f"{name}.user_factors", MAX_WEIGHT)
        check_floats(self.item_factors_t, f"{name}.item_factors_t", MAX_WEIGHT)
        check_vector(self.item_norms, f"{name}.item_norms", n_items, "f")
        check_floats(self.item_norms, f"{name}.item_norms")

    def fold_in(self, history: np.ndarray) -> np.ndarray:
        """A customer vector for a history of items (implicit-feedback ALS step, confidence 1 + 1)."""
        factors = self.item_factors.shape[1]
        if len(history) == 0:
            return np.zeros(factors, dtype=np.float32)
        y = np.asarray(self.item_factors[history], dtype=np.float64)
        a = self._gram + y.T @ y + self.regularization * np.eye(factors)
        b = 2.0 * y.sum(axis=0)
        return np.linalg.solve(a, b).astype(np.float32)

    def scores(self, customer: int | None, history: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        vector = self.user_factors[customer] if customer is not None else self.fold_in(history)
        if out is None or np.result_type(self.item_factors_t, vector) != out.dtype:
            return _into(vector @ self.item_factors_t, out)
        return np.matmul(vector, self.item_factors_t, out=out)  # the same product, without a fresh array

    def scores_batch(self, customers: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray(self.user_factors[customers] @ self.item_factors_t)

    def similar(self, item: int) -> np.ndarray:
        norms = np.where(self.item_norms > 0, self.item_norms, 1.0)
        return (self.item_factors[item] @ self.item_factors_t) / (norms * norms[item])

    def exact_scores(self, customers: np.ndarray, histories: np.ndarray, items: np.ndarray) -> np.ndarray:
        vectors = np.asarray(self.user_factors[customers], dtype=np.float64).T
        # float32 x float32 products are exact in float64; only the sum rounds, always in the same order.
        # Factor first: each step of the sum adds one contiguous slice.
        terms = np.asarray(self.item_factors.T[:, items], dtype=np.float64) * vectors[:, :, None]
        return fixed_sum(terms, axis=0)

    def score_bounds(self, customers: np.ndarray, histories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # |u . v| <= |u| |v| (Cauchy-Schwarz) bounds the score and the sum of absolute products alike.
        vectors = np.asarray(self.user_factors[customers], dtype=np.float64)
        magnitude = np.sqrt(np.square(vectors).sum(axis=1)) * self._max_item_norm * (1 + 1e-9)
        return magnitude, rounding_bound(self.item_factors.shape[1]) * magnitude

    def contributions_batch(self, items: np.ndarray, histories: np.ndarray) -> np.ndarray:
        rows = np.where(histories >= 0, histories, 0)
        factors = self.item_factors.T  # factor first, as in exact_scores
        terms = (np.asarray(factors[:, rows], dtype=np.float64)
                 * np.asarray(factors[:, items], dtype=np.float64)[:, :, None])
        return fixed_sum(terms, axis=0) / (self._reason_norms[rows] * self._reason_norms[items][:, None])

    def contributions_to(self, items: np.ndarray, history: np.ndarray) -> np.ndarray:
        """contributions_batch's arithmetic on each history item's factors read once, not once per item: the
        same products and sums, a tenth of the scattered reads of the item factors (10 items, 20 owned)."""
        factors = self.item_factors.T
        terms = (np.asarray(factors[:, history], dtype=np.float64)[:, None, :]
                 * np.asarray(factors[:, items], dtype=np.float64)[:, :, None])
        return fixed_sum(terms, axis=0) / (self._reason_norms[history] * self._reason_norms[items][:, None])

    def approx_contributions_batch(self, items: np.ndarray, histories: np.ndarray) -> tuple[np.ndarray, float]:
        """Cosines of float32 unit vectors, from one matrix product (exact sums cost ten times more)."""
        n_items = len(self.item_factors)
        if n_items <= GRAM_ITEMS:
            # Row by row of the cached matrix (one row per pair stays in cache). Padding's -1 reads the -inf
            # that ends the row before (the last row's, for item 0).
            flat = items[:, None] * (n_items + 1) + histories
            return np.take(self._cosine_rows(items), flat), self._reason_error
        rows = np.where(histories >= 0, histories, 0)
        row_items, row_index = index_of(rows, n_items)
        col_items, col_index = index_of(items, n_items)
        cosines = self._unit_factors[row_items] @ self._unit_factors[col_items].T
        return np.where(histories >= 0, cosines[row_index, col_index[:, None]], -np.inf), self._reason_error

    @cached_property
    def _unit_factors(self) -> np.ndarray:
        return (np.asarray(self.item_factors, dtype=np.float64) / self._reason_norms[:, None]).astype(np.float32)

    @cached_property
    def _cosines(self) -> np.ndarray:
        """Item x item float32 cosines, each row ended by one -inf (what a padding position -1 reads); rows
        are filled on first use (_cosine_rows), so only items that are suggested cost anything."""
        cosines = np.empty((len(self.item_factors), len(self.item_factors) + 1), dtype=np.float32)
        cosines[:, -1] = -np.inf  # every row's, filled or not: a padding position reads the one before its row
        return cosines

    @cached_property
    def _cosines_filled(self) -> np.ndarray:
        return np.zeros(len(self.item_factors), dtype=bool)

    def _cosine_rows(self, items: np.ndarray) -> np.ndarray:
        """The flat cosine matrix, with the rows of these items filled."""
        missing = np.flatnonzero((np.bincount(items, minlength=len(self.item_factors)) > 0) & ~self._cosines_filled)
        if len(missing):
            self._cosines[missing, :-1] = self._unit_factors[missing] @ self._unit_factors.T
            self._cosines_filled[missing] = True
        return self._cosines.ravel()

    @cached_property
    def _max_item_norm(self) -> float:
        return float(np.sqrt(np.square(np.asarray(self.item_factors, dtype=np.float64)).sum(axis=1)).max(initial=0.0))

    @cached_property
    def _reason_norms(self) -> np.ndarray:
        """Each item's stored norm, 1 for a zero vector (its cosines are 0 anyway)."""
        norms = np.asarray(self.item_norms, dtype=np.float64)
        return np.where(norms > 0, norms, 1.0)

    @cached_property
    def _reason_error(self) -> float:
        """Bound of |approximate cosine - exact cosine|: the rounding of the unit vectors (one per factor each)
        and of their float32 dot, scaled by how far true norms exceed the stored ones they are divided by."""
        true = np.sqrt(np.square(np.asarray(self.item_factors, dtype=np.float64)).sum(axis=1))
        ratio = float((true / self._reason_norms).max(initial=0.0))
        return rounding_bound(self.item_factors.shape[1] + 2) * ratio * ratio + 1e-12


def _into(scores: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """`scores`, copied into `out` when one is given (see Scorer.scores); scores of another dtype are
    returned as they are, so a float64 model ranks by its own arithmetic."""
    if out is None or scores.dtype != out.dtype:
        return scores
    np.copyto(out, scores)
    return out


def _row_norms(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.norm(matrix, axis=1).astype(np.float32)


class ItemSimilarityScorer(Scorer):
    """An item x item weight matrix, dense (EASE) or sparse (item-KNN): score = history . S."""

    kind = "item_similarity"

    def __init__(self, matrix: np.ndarray | sp.csr_matrix):
        self.matrix = matrix

    @property
    def dense(self) -> bool:
        return isinstance(self.matrix, np.ndarray)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict) -> "Scorer":
        if "dense" in arrays:
            return cls(arrays["dense"])
        shape = tuple(int(n) for n in arrays["shape"])
        return cls(sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape, copy=False))

    def arrays(self) -> dict[str, np.ndarray]:
        if self.dense:
            return {"dense": self.matrix.astype(np.float32, copy=False)}
        m = self.matrix.tocsr()
        index_dtype = np.int32 if max(m.nnz, *m.shape) < 2**31 else np.int64  # equal dtypes: scipy keeps the mmap
        return {"data": m.data.astype(np.float32), "indices": m.indices.astype(index_dtype),
                "indptr": m.indptr.astype(index_dtype), "shape": np.asarray(m.shape, dtype=np.int64)}

    def check(self, n_customers: int, n_items: int, name: str) -> None:
        if self.matrix.shape != (n_items, n_items):
            raise ArtifactError(f"{name}: similarity shape {self.matrix.shape} does not match {n_items} items")
        if self.dense:
            check_floats(self.matrix, f"{name}.dense", MAX_WEIGHT)
        else:
            check_csr(self.matrix, name, MAX_WEIGHT)

    def scores(self, customer: int | None, history: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if len(history) == 0:
            return _into(np.zeros(self.matrix.shape[1], dtype=np.float32), out)
        rows = self.matrix[history]
        return _into(np.asarray(rows.sum(axis=0), dtype=np.float32).ravel(), out)

    def scores_batch(self, customers: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        indicator = history.copy()
        indicator.data = np.ones_like(indicator.data, dtype=np.float32)
        product = indicator @ self.matrix
        return product.toarray() if sp.issparse(product) else np.asarray(product)

    def similar(self, item: int) -> np.ndarray:
        row = self.matrix[item]
        return row.toarray().ravel() if sp.issparse(row) else np.array(row, dtype=np.float32)

    def exact_scores(self, customers: np.ndarray, histories: np.ndarray, items: np.ndarray) -> np.ndarray:
        return fixed_sum(self._entries(histories, items), axis=1)

    def score_bounds(self, customers: np.ndarray, histories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # A score sums one entry per history item, each at most its row's largest in absolute value.
        peaks = np.where(histories >= 0, self._row_peaks[np.where(histories >= 0, histories, 0)], 0.0)
        magnitude = peaks.sum(axis=1) * (1 + 1e-9)
        return magnitude, rounding_bound(histories.shape[1]) * magnitude

    def contributions_batch(self, items: np.ndarray, histories: np.ndarray) -> np.ndarray:
        return self._entries(histories, items[:, None])[:, :, 0]

    def _entries(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Float64 (n x rows x columns) matrix entries S[rows[j, a], columns[j, b]]; 0 where rows[j, a] is -1."""
        valid = rows >= 0
        row_items, row_index = index_of(np.where(valid, rows, 0), self.matrix.shape[0])
        col_items, col_index = index_of(columns, self.matrix.shape[1])
        if self.dense:
            block = np.asarray(self.matrix[np.ix_(row_items, col_items)], dtype=np.float64)
        else:
            block = self.matrix[row_items][:, col_items].toarray().astype(np.float64)
        values = block[row_index[:, :, None], col_index[:, None, :]]
        values[~valid] = 0.0
        return values

    @cached_property
    def _row_peaks(self) -> np.ndarray:
        """Largest absolute entry of each row, float64."""
        if self.dense:
            return np.abs(np.asarray(self.matrix, dtype=np.float64)).max(axis=1, initial=0.0)
        m = self.matrix
        peaks = np.zeros(m.shape[0], dtype=np.float64)
        filled = np.diff(m.indptr) > 0
        peaks[filled] = np.maximum.reduceat(np.abs(np.asarray(m.data, dtype=np.float64)), m.indptr[:-1][filled])
        return peaks


class PopularityScorer(Scorer):
    """The same ranking for everyone: weighted interaction counts (or recent ones, for trending)."""

    kind = "popularity"

    def __init__(self, popularity: np.ndarray, window_days: float | None = None):
        self.popularity = popularity
        self.window_days = window_days

    @property
    def personal(self) -> bool:
        return False

    def in_window(self, item: int) -> bool:
        """Whether a customer took the item within window_days (always, without a window). Trending scores
        customers in the window plus all-time popularity scaled below one (training/strategies/popular.py),
        so an item below one was ranked by its all-time popularity alone."""
        return self.window_days is None or bool(self.popularity[item] >= 1)

    def params(self) -> dict:
        return {"window_days": self.window_days}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"popularity": self.popularity.astype(np.float32, copy=False)}

    def check(self, n_customers: int, n_items: int, name: str) -> None:
        check_vector(self.popularity, f"{name}.popularity", n_items, "f")
        check_floats(self.popularity, f"{name}.popularity")  # counts: no bound

    def scores(self, customer: int | None, history: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return np.array(self.popularity, dtype=np.float32)
        np.copyto(out, self.popularity)
        return out

    def scores_batch(self, customers: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        popularity = np.asarray(self.popularity, dtype=np.float32)
        return np.broadcast_to(popularity, (len(customers), len(popularity))).copy()

    def similar(self, item: int) -> np.ndarray:
        return np.array(self.popularity, dtype=np.float32)

    def exact_scores(self, customers: np.ndarray, histories: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.asarray(self.popularity, dtype=np.float64)[items] + 0.0

    def score_bounds(self, customers: np.ndarray, histories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        peak = float(np.abs(np.asarray(self.popularity, dtype=np.float64)).max(initial=0.0))
        return np.full(len(customers), peak), np.zeros(len(customers))

    def contributions_batch(self, items: np.ndarray, histories: np.ndarray) -> np.ndarray:
        return np.zeros(histories.shape, dtype=np.float64)


class BlendScorer(Scorer):
    """A weighted sum of other scorers (e.g. EASE and ALS). Each part's scores are divided by its
    typical magnitude (`scales`, measured when fitted), so a weight is the part's share of the score."""

    kind = "blend"

    def __init__(self, parts: dict[str, Scorer], weights: dict[str, float], scales: dict[str, float]):
        if set(parts) != set(weights) or set(parts) != set(scales) or any("." in name for name in parts):
            raise ArtifactError("blend parts, weights and scales must name the same parts (names without dots)")
        self.parts = parts
        self.factors = {name: float(weights[name]) / (float(scales[name]) or 1.0) for name in parts}
        self.weights = {name: float(weights[name]) for name in parts}
        self.scales = {name: float(scales[name]) for name in parts}

    @property
    def personal(self) -> bool:
        return any(part.personal for part in self.parts.values())

    def params(self) -> dict:
        return {"parts": {name: {"kind": part.kind, "weight": self.weights[name], "scale": self.scales[name],
                                 "params": part.params()} for name, part in self.parts.items()}}

    def arrays(self) -> dict[str, np.ndarray]:
        # Prefixed names keep every part's arrays in the one flat directory load_scorer reads.
        return {f"{name}.{key}": array for name, part in self.parts.items() for key, array in part.arrays().items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict) -> "Scorer":
        parts, weights, scales = {}, {}, {}
        for name, spec in params["parts"].items():
            own = {key[len(name) + 1 :]: array for key, array in arrays.items() if key.startswith(name + ".")}
            parts[name] = Scorer.registry[spec["kind"]].from_arrays(own, spec.get("params", {}))
            weights[name], scales[name] = spec["weight"], spec["scale"]
        return cls(parts, weights, scales)

    def check(self, n_customers: int, n_items: int, name: str) -> None:
        require(np.isfinite([*self.weights.values(), *self.factors.values()]).all(),
                f"{name}: blend weights or scales are not finite")
        for part_name, part in self.parts.items():
            part.check(n_customers, n_items, f"{name}.{part_name}")

    def scores(self, customer: int | None, history: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        total = sum(f * self.parts[n].scores(customer, history) for n, f in self.factors.items())
        return _into(total.astype(np.float32), out)

    def scores_batch(self, customers: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        total = sum(f * np.asarray(self.parts[n].scores_batch(customers, history)) for n, f in self.factors.items())
        return total.astype(np.float32)

    def similar(self, item: int) -> np.ndarray:
        return self._weighted({name: part.similar(item) for name, part in self.parts.items()})

    def exact_scores(self, customers: np.ndarray, histories: np.ndarray, items: np.ndarray) -> np.ndarray:
        total = 0.0
        for name, part in self.parts.items():
            total = total + self.factors[name] * part.exact_scores(customers, histories, items)
        return total + 0.0

    def score_bounds(self, customers: np.ndarray, histories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        magnitude = error = 0.0
        for name, part in self.parts.items():
            part_magnitude, part_error = part.score_bounds(customers, histories)
            magnitude = magnitude + abs(self.factors[name]) * (part_magnitude + part_error)
            error = error + abs(self.factors[name]) * part_error
        # float32 products and sums of the parts' scores (scores()) add their own rounding.
        return magnitude, 2 * error + rounding_bound(2 * len(self.parts)) * magnitude

    def contributions_batch(self, items: np.ndarray, histories: np.ndarray) -> np.ndarray:
        """_weighted for many pairs: each part's contributions scaled by their largest magnitude in the history."""
        valid = histories >= 0
        total = np.zeros(histories.shape, dtype=np.float64)
        for name, part in self.parts.items():
            values = part.contributions_batch(items, histories)
            peak = np.where(valid, np.abs(values), 0.0).max(axis=1, initial=0.0)
            total = total + self.weights[name] * values / np.where(peak > 0, peak, 1.0)[:, None]
        return total

    def _weighted(self, measured: dict[str, np.ndarray]) -> np.ndarray:
        """Weighted sum of per-part values, each scaled to a largest magnitude of 1 (the parts'
        similarities are on unrelated scales: cosines, regression weights)."""
        total = 0.0
        for name, values in measured.items():
            values = np.asarray(values, dtype=np.float64)
            peak = np.abs(values).max() if values.size else 0.0
            total = total + self.weights[name] * values / (peak or 1.0)
        return np.asarray(total, dtype=np.float32)
