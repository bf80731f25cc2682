"""Checks of a version's arrays when it loads: dtypes, lengths, CSR structure and values.

A version's arrays are memory-mapped and read as they are, so an array damaged on disk (cut short, rewritten
by hand, saved with another dtype) would otherwise be found out by requests: an IndexError on the items it
reaches, a wrong id from a binary search over unsorted ids, absurd scores. Everything a request trusts is
checked here once, at load, so the version is refused and the old one keeps serving. Value checks are one
or two passes over the (page-cached) array without a temporary of its size: min and max, not isfinite.
"""

from __future__ import annotations

import numpy as np

from recsvc.errors import ArtifactError

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# No trained factor or similarity comes near this; a value beyond it is damage (e.g. random bytes read as
# float32 give values up to 3e38), and would be served as an absurd score.
MAX_WEIGHT = 1e6


def require(condition, message: str) -> None:
    if not condition:
        raise ArtifactError(message)


def check_vector(array: np.ndarray, name: str, length: int, kinds: str) -> None:
    """1-D, `length` entries, of a dtype kind in `kinds` (numpy's letters: 'b' bool, 'U' text, 'S' bytes)."""
    require(array.ndim == 1, f"{name} has shape {array.shape}, expected one entry per row")
    require(len(array) == length, f"{name} has {len(array)} entries, expected {length}")
    require(array.dtype.kind in kinds, f"{name} has dtype {array.dtype}, expected kind {kinds!r}")


def check_ids(ids: np.ndarray, name: str) -> None:
    """UTF-8 byte strings in strictly increasing order: IdIndex finds ids by binary search, which answers
    wrongly (another item, or none) in unsorted or repeated ids."""
    check_vector(ids, name, len(ids), "S")
    require(ids.dtype.itemsize > 0, f"{name} holds only empty ids")
    require(len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])), f"{name} is not sorted and unique")


def check_floats(array: np.ndarray, name: str, limit: float | None = None) -> None:
    """float32 or float64, every value finite (and at most `limit` in absolute value when given)."""
    require(array.dtype in FLOATS, f"{name} has dtype {array.dtype}, expected float32 or float64")
    if not array.size:
        return
    low, high = float(np.min(array)), float(np.max(array))  # a NaN anywhere makes both NaN
    require(np.isfinite(low) and np.isfinite(high), f"{name} holds values that are not finite")
    if limit is not None:
        require(max(-low, high) <= limit, f"{name} holds values beyond {limit:g} in magnitude")


def check_csr(matrix, name: str, limit: float | None = None) -> None:
    """A CSR matrix whose index arrays are what its rows are read through: indptr of rows + 1 entries, from 0
    to the number of entries and never decreasing; column indices within the columns; finite data."""
    rows, columns = matrix.shape
    indptr, indices = matrix.indptr, matrix.indices
    for part, array in (("indptr", indptr), ("indices", indices)):
        require(array.ndim == 1 and array.dtype.kind in "iu", f"{name}.{part} is not a vector of integers")
    require(len(indptr) == rows + 1, f"{name}.indptr has {len(indptr)} entries for {rows} rows")
    require(indptr[0] == 0 and indptr[-1] == len(indices) == len(matrix.data),
            f"{name}.indptr does not span its {len(indices)} indices and {len(matrix.data)} values")
    require(rows == 0 or bool(np.all(indptr[1:] >= indptr[:-1])), f"{name}.indptr decreases")
    require(not len(indices) or (indices.min() >= 0 and indices.max() < columns),
            f"{name}.indices fall outside its {columns} columns")
    check_floats(matrix.data, f"{name}.data", limit)
