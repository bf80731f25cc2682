"""Data preparation between ingest and fit: time decay and minimum-interaction filters."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from recsvc.errors import InvalidInput
from training.ingest import IngestOptions, Interactions

SECONDS_PER_DAY = 86_400.0


@dataclass
class PrepareReport:
    """What preparation changed, for the log and the manifest."""

    half_life_days: float | None = None
    reference_time: float | None = None  # Unix seconds the decay counts back from (the newest event)
    rounds: int = 0  # filter passes that removed something
    customers_removed: int = 0
    items_removed: int = 0
    rows_removed: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        decay = (f"time decay with a half-life of {self.half_life_days:g} days" if self.half_life_days
                 else "no time decay")
        return (f"{decay}; minimum filters removed {self.customers_removed} customers, {self.items_removed} items "
                f"and {self.rows_removed} rows in {self.rounds} round(s)")


def decay_factors(timestamps: np.ndarray, half_life_days: float, reference_time: float) -> np.ndarray:
    """0.5 ** (age / half-life) per event, age in days before reference_time (events at it weigh 1)."""
    age_days = (reference_time - timestamps) / SECONDS_PER_DAY
    return np.exp2(-np.maximum(age_days, 0.0) / half_life_days)


def core_filter(customer: np.ndarray, item: np.ndarray, shape: tuple[int, int], min_items_per_customer: int,
                min_customers_per_item: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(kept customers mask, kept items mask, rounds that removed something).

    Repeatedly drops customers with fewer distinct items and items with fewer distinct customers
    than asked, until both hold for everything left (a k-core).
    """
    pairs = sp.csr_matrix((np.ones(len(customer), dtype=np.int32), (customer, item)), shape=shape)
    pairs.sum_duplicates()
    pairs.data[:] = 1
    keep_customers, keep_items = np.ones(shape[0], dtype=bool), np.ones(shape[1], dtype=bool)
    rounds = 0
    while True:
        kept = pairs[keep_customers][:, keep_items]
        customer_ok = np.asarray(kept.sum(axis=1)).ravel() >= min_items_per_customer
        item_ok = np.asarray(kept.sum(axis=0)).ravel() >= min_customers_per_item
        if customer_ok.all() and item_ok.all():
            return keep_customers, keep_items, rounds
        rounds += 1
        keep_customers[np.flatnonzero(keep_customers)[~customer_ok]] = False
        keep_items[np.flatnonzero(keep_items)[~item_ok]] = False


def prepare(interactions: Interactions, options: IngestOptions) -> tuple[Interactions, PrepareReport]:
    """Interactions with time decay applied to strengths and the minimum filters applied (ids re-indexed).

    Raises InvalidInput when decay is asked for without timestamps, or when the filters leave nothing.
    """
    report = PrepareReport(half_life_days=options.half_life_days)
    strength = interactions.strength
    if options.half_life_days:
        if interactions.timestamp is None:
            raise InvalidInput("time decay (half_life_days) needs a timestamp column in the interactions file")
        report.reference_time = float(interactions.timestamp.max())
        strength = (strength * decay_factors(interactions.timestamp, options.half_life_days,
                                             report.reference_time)).astype(np.float32)
    interactions = replace(interactions, strength=strength)
    if options.min_items_per_customer <= 1 and options.min_customers_per_item <= 1:
        return interactions, report
    return _apply_filter(interactions, options, report), report


def _apply_filter(interactions: Interactions, options: IngestOptions, report: PrepareReport) -> Interactions:
    shape = (len(interactions.customers), len(interactions.items))
    keep_customers, keep_items, report.rounds = core_filter(
        interactions.customer, interactions.item, shape, options.min_items_per_customer, options.min_customers_per_item)
    rows = keep_customers[interactions.customer] & keep_items[interactions.item]
    if not rows.any():
        raise InvalidInput("no interactions left after the minimum filters (min_items_per_customer="
                           f"{options.min_items_per_customer}, "
                           f"min_customers_per_item={options.min_customers_per_item})")
    report.customers_removed = int((~keep_customers).sum())
    report.items_removed = int((~keep_items).sum())
    report.rows_removed = int((~rows).sum())
    new_customer = np.cumsum(keep_customers, dtype=np.int32) - 1  # old position -> new position
    new_item = np.cumsum(keep_items, dtype=np.int32) - 1
    return replace(
        interactions, customers=interactions.customers[keep_customers], items=interactions.items[keep_items],
        customer=new_customer[interactions.customer[rows]], item=new_item[interactions.item[rows]],
        strength=interactions.strength[rows],
        timestamp=None if interactions.timestamp is None else interactions.timestamp[rows])
