"""A synthetic customer-service data set with planted taste structure, deterministic by seed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

# Each category is a segment's favourite item group; names give agents readable titles.
CATEGORIES = {
    "Mobile plans": ["Unlimited 5G plan", "Family share plan", "Prepaid top-up", "Roaming pass", "Data booster"],
    "Broadband": ["Fibre 500", "Fibre 1000", "Wi-Fi mesh kit", "Static IP add-on", "Router upgrade"],
    "TV & streaming": ["Sports pack", "Movies pack", "Kids pack", "4K box", "Streaming bundle"],
    "Devices": ["Smartphone", "Tablet", "Smartwatch", "Laptop", "Earbuds"],
    "Accessories": ["Phone case", "Fast charger", "Screen protector", "Power bank", "Car mount"],
    "Insurance": ["Device cover", "Screen cover", "Travel cover", "Theft cover", "Extended warranty"],
    "Help articles": ["Set up voicemail", "Reset your router", "Read your bill", "Port your number", "Pair a watch"],
    "Offers": ["Loyalty discount", "Upgrade offer", "Bundle saver", "Refer a friend", "Student deal"],
}
EVENT_TYPES = np.array(["view", "click", "add_to_cart", "purchase", "support_ticket"])
EVENT_SHARES = np.array([0.55, 0.22, 0.1, 0.08, 0.05])
END = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
DAYS = 90


@dataclass
class DemoSizes:
    customers: int = 2000
    items: int = 400
    interactions: int = 50_000


def _item_table(rng: np.random.Generator, n_items: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Catalog, the category of each item, and a long-tailed within-category popularity."""
    names = list(CATEGORIES)
    category = rng.permutation(np.arange(n_items) % len(names))
    popularity = np.empty(n_items)
    for c in range(len(names)):
        members = np.flatnonzero(category == c)
        ranks = rng.permutation(len(members))
        popularity[members] = 1.0 / (ranks + 1.0) ** 1.1  # Zipf-like: a few hits, a long tail
    titles = [f"{CATEGORIES[names[c]][i % 5]} {i // 5 % 50 + 1}" for i, c in enumerate(category)]
    active = rng.random(n_items) >= 0.02
    table = pa.table({
        "item_id": [f"SKU-{i:05d}" for i in range(n_items)],
        "title": titles,
        "category": [names[c] for c in category],
        "active": pa.array(np.where(active, "true", "false")),
    })
    return table, category, popularity


def _sample_within(rng: np.random.Generator, groups: np.ndarray, members_by_group: list[np.ndarray],
                   weights_by_group: list[np.ndarray]) -> np.ndarray:
    """One item per entry of `groups`, drawn from that group with the group's popularity weights."""
    chosen = np.empty(len(groups), dtype=np.int64)
    for g, (members, weights) in enumerate(zip(members_by_group, weights_by_group)):
        rows = np.flatnonzero(groups == g)
        cdf = np.cumsum(weights) / weights.sum()
        chosen[rows] = members[np.minimum(np.searchsorted(cdf, rng.random(len(rows))), len(members) - 1)]
    return chosen


def generate(sizes: DemoSizes, seed: int = 7) -> dict[str, pa.Table]:
    """Tables `interactions`, `catalog` and `customers`.

    Every customer belongs to a segment with a favourite and a second category;
    70% of their interactions fall in the favourite, 15% in the second, 15% follow
    overall popularity. A model that learns the segments beats popularity.
    """
    rng = np.random.default_rng(seed)
    n_categories = len(CATEGORIES)
    catalog, category, popularity = _item_table(rng, sizes.items)
    members = [np.flatnonzero(category == c) for c in range(n_categories)]
    weights = [popularity[m] for m in members]

    favourite = rng.integers(0, n_categories, sizes.customers)
    second = (favourite + rng.integers(1, n_categories, sizes.customers)) % n_categories
    activity = rng.lognormal(0.0, 0.8, sizes.customers)
    customer = rng.choice(sizes.customers, size=sizes.interactions, p=activity / activity.sum())

    draw = rng.random(sizes.interactions)
    group = np.where(draw < 0.7, favourite[customer], second[customer])
    item = _sample_within(rng, group, members, weights)
    overall = draw >= 0.85
    item[overall] = rng.choice(sizes.items, size=int(overall.sum()), p=popularity / popularity.sum())

    seconds = END.timestamp() - rng.random(sizes.interactions) * DAYS * 86400
    interactions = pa.table({
        "customer_id": pa.array([f"C{c:06d}" for c in customer]),
        "item_id": catalog.column("item_id").take(pa.array(item)),
        "event_type": pa.array(EVENT_TYPES[rng.choice(len(EVENT_TYPES), size=sizes.interactions, p=EVENT_SHARES)]),
        "timestamp": pa.array(seconds.astype("datetime64[s]")).cast(pa.timestamp("s", tz="UTC")),
    })
    customers = pa.table({
        "customer_id": [f"C{c:06d}" for c in range(sizes.customers)],
        "segment": [list(CATEGORIES)[f] for f in favourite],
    })
    return {"interactions": interactions, "catalog": catalog, "customers": customers}


def write(out: Path, sizes: DemoSizes, seed: int = 7) -> dict[str, Path]:
    """Write the tables as CSV files into `out`; returns their paths by table name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, table in generate(sizes, seed).items():
        paths[name] = out / f"{name}.csv"
        pacsv.write_csv(table, paths[name])
    return paths
