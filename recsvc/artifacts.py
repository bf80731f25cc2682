"""The model artifact format shared by the trainer and the server: registry, versions, manifests, arrays.

A registry is a directory:

    REGISTRY/
      CURRENT                      the current version id (one line), replaced atomically
      HISTORY                      the trainer's: versions that were current (training/registry.py); servers ignore it
      versions/<version_id>/       one immutable directory per training run
        manifest.json
        customers.npy items.npy    ids as sorted UTF-8 byte strings: index = position
        owned.{indptr,indices,data}.npy   the customers' items (CSR, customers x items)
        catalog.{title,category}.npy catalog.active.npy
        strategies/<name>/*.npy    each strategy's arrays (see recsvc.scoring)

Every array is a plain .npy file loaded with allow_pickle=False and memory-mapped,
so gunicorn workers share one copy through the page cache.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recsvc.checks import check_csr, check_ids, check_vector
from recsvc.errors import ArtifactError
from recsvc.files import naming, save_array, shared_directory_mode, shared_file_mode, write_atomically
from recsvc.scoring import Scorer, load_scorer

FORMAT_VERSION = 1
CURRENT_POINTER = "CURRENT"
VERSIONS_DIR = "versions"
MANIFEST = "manifest.json"
# A version id as new_version_id makes them: a name inside versions/, never a path.
VERSION_ID = re.compile(r"v[A-Za-z0-9._-]+")
BAD_POINTER = ("the registry's current pointer (CURRENT) does not hold a version id; "
               "`recsvc-train registry rollback VERSION` rewrites it")


# --- arrays -----------------------------------------------------------------


def load_array(path: Path, *, mmap: bool = True) -> np.ndarray:
    try:
        # A plain ndarray view of the memmap: same shared pages, without np.memmap's per-index Python overhead.
        return np.asarray(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read array {path.name}: {exc}") from exc


def save_csr(directory: Path, prefix: str, matrix: sp.csr_matrix) -> None:
    matrix = matrix.tocsr()
    # One index dtype for both arrays: scipy would otherwise copy them on load, losing the memory map.
    index_dtype = np.int32 if max(matrix.nnz, *matrix.shape) < 2**31 else np.int64
    save_array(directory / f"{prefix}.indptr.npy", matrix.indptr.astype(index_dtype))
    save_array(directory / f"{prefix}.indices.npy", matrix.indices.astype(index_dtype))
    save_array(directory / f"{prefix}.data.npy", matrix.data.astype(np.float32))
    save_array(directory / f"{prefix}.shape.npy", np.asarray(matrix.shape, dtype=np.int64))


def load_csr(directory: Path, prefix: str, *, mmap: bool = True) -> sp.csr_matrix:
    shape = tuple(int(n) for n in load_array(directory / f"{prefix}.shape.npy", mmap=False))
    parts = [load_array(directory / f"{prefix}.{name}.npy", mmap=mmap) for name in ("data", "indices", "indptr")]
    # scipy keeps the memory-mapped buffers as they are when dtypes already match.
    return sp.csr_matrix(tuple(parts), shape=shape, copy=False)


def encode_ids(ids) -> np.ndarray:
    """Sorted, unique ids as a fixed-width UTF-8 byte array (the on-disk id map)."""
    encoded = np.array([str(i).encode("utf-8") for i in ids], dtype=np.bytes_)
    return np.unique(encoded)


class IdIndex:
    """Maps external ids to row positions by binary search in a sorted byte array (no per-process dict)."""

    def __init__(self, sorted_ids: np.ndarray):
        self.ids = sorted_ids

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, external_id: str) -> int | None:
        key = external_id.encode("utf-8")
        if not key or len(key) > self.ids.dtype.itemsize:
            return None
        pos = int(np.searchsorted(self.ids, key))
        return pos if pos < len(self.ids) and self.ids[pos] == key else None

    def positions(self, external_ids) -> list[int]:
        """Positions of the ids that are known; unknown ids are dropped."""
        found = (self.position(i) for i in external_ids)
        return [p for p in found if p is not None]

    def external(self, position: int) -> str:
        return self.ids[position].decode("utf-8")


# --- registry ---------------------------------------------------------------


def versions_root(registry: Path) -> Path:
    return Path(registry) / VERSIONS_DIR


def new_version_id(fingerprint: str, now: dt.datetime | None = None) -> str:
    """Sortable, unique-enough id: UTC time to the microsecond plus the data fingerprint."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"v{now:%Y%m%dT%H%M%S%f}Z-{fingerprint[:8]}"


def current_version(registry: Path) -> str | None:
    """The version id the CURRENT pointer names, or None when there is no pointer (an empty registry).

    ArtifactError when it cannot be read or holds anything but a version id (bytes that are not UTF-8, a
    path, nothing). The message never repeats what it holds: that may be a path, and /readyz shows it."""
    try:
        text = (Path(registry) / CURRENT_POINTER).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArtifactError(f"cannot read the registry's current pointer: {exc}") from exc
    except UnicodeDecodeError:
        raise ArtifactError(BAD_POINTER) from None
    if not VERSION_ID.fullmatch(text):
        raise ArtifactError(BAD_POINTER)
    return text


def set_current(registry: Path, version_id: str) -> None:
    """Point CURRENT at version_id atomically: write a temporary file, fsync, rename over (the trainer's
    training.registry.make_current also keeps the history rollbacks use)."""
    registry = Path(registry)
    if not (versions_root(registry) / version_id / MANIFEST).is_file():
        raise ArtifactError(f"version {version_id} does not exist in {registry}")
    # The umask's mode, not the existing file's: servers under another user must read it.
    write_atomically(registry / CURRENT_POINTER, version_id + "\n", mode=shared_file_mode())


def list_versions(registry: Path) -> list[str]:
    """Complete version ids, oldest first (ids sort by creation time)."""
    root = versions_root(registry)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())


def read_manifest(version_dir: Path) -> dict:
    try:
        manifest = json.loads((Path(version_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the manifest of {Path(version_dir).name}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"the manifest of {Path(version_dir).name} is not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{Path(version_dir).name} has artifact format {manifest.get('format')!r}, "
                            f"expected {FORMAT_VERSION}")
    return manifest


# --- the bundle: everything one version holds -------------------------------


@dataclass
class Catalog:
    """Item attributes aligned with the item index; items without catalog rows are active and untitled."""

    title: np.ndarray
    category: np.ndarray
    active: np.ndarray
    # items x tags (1.0 where an item carries a tag) from the catalog's tags column, for training only: not saved
    # with a version; None when the catalog has no such column.
    tags: sp.csr_matrix | None = None

    @classmethod
    def empty(cls, n_items: int) -> "Catalog":
        return cls(np.full(n_items, "", dtype="U1"), np.full(n_items, "", dtype="U1"), np.ones(n_items, dtype=bool))

    # The server's filters, derived once per version (load_version builds them before gunicorn forks, so the
    # workers share them) instead of comparing every item's category on each request.

    @cached_property
    def inactive(self) -> np.ndarray:
        """True for each item that is never suggested."""
        return ~np.asarray(self.active, dtype=bool)

    @cached_property
    def inactive_positions(self) -> np.ndarray:
        """Sorted positions of the inactive items: a request sets their few scores instead of reading a mask of
        every item."""
        return np.flatnonzero(self.inactive)

    def active_in(self, category: str) -> np.ndarray:
        """Sorted positions of the active items of `category`; empty for a category no item has."""
        # np.str_ compares as numpy does: trailing NUL characters do not count.
        return self._active_by_category.get(str(np.str_(category)), np.empty(0, dtype=np.int64))

    @cached_property
    def _active_by_category(self) -> dict[str, np.ndarray]:
        names, codes = np.unique(np.asarray(self.category), return_inverse=True)
        active = np.flatnonzero(~self.inactive)
        order = np.argsort(codes[active], kind="stable")  # grouped by category, positions ascending within
        grouped, group_codes = active[order], codes[active][order]
        bounds = np.searchsorted(group_codes, np.arange(len(names) + 1))
        return {str(name): grouped[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}

    def has_category(self, category: str) -> bool:
        """Whether any item (active or not) is in `category`; "" (no category) is not one."""
        name = str(np.str_(category))
        return bool(name) and name in self._active_by_category

    @cached_property
    def categories(self) -> list[str]:
        """The catalog's category names, sorted."""
        return [name for name in self._active_by_category if name]

    def check(self, n_items: int) -> None:
        """One title, category and flag per item: requests read them by item position."""
        check_vector(self.title, "catalog.title", n_items, "U")
        check_vector(self.category, "catalog.category", n_items, "U")
        check_vector(self.active, "catalog.active", n_items, "b")

    def prepare_filters(self) -> None:
        """Build the derived filter arrays now rather than on the first request."""
        self._active_by_category  # noqa: B018 (computed and kept by cached_property)
        self.inactive_positions  # noqa: B018
        self.categories  # noqa: B018


@dataclass
class ModelBundle:
    """One model version: id maps, owned items, catalog and one scorer per strategy."""

    manifest: dict
    customers: IdIndex
    items: IdIndex
    owned: sp.csr_matrix
    catalog: Catalog
    scorers: dict[str, Scorer] = field(default_factory=dict)
    path: Path | None = None

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def default_strategy(self) -> str:
        return self.manifest["default_strategy"]

    def owned_items(self, customer: int | None) -> np.ndarray:
        if customer is None:
            return np.empty(0, dtype=np.int32)
        return self.owned.indices[self.owned.indptr[customer] : self.owned.indptr[customer + 1]]

    def validate(self) -> None:
        """Check every array a request reads (dtypes, lengths, index ranges, finite values; recsvc.checks),
        so a damaged version is refused before it serves anyone, by the server and by a rollback alike."""
        check_ids(self.customers.ids, "customers")
        check_ids(self.items.ids, "items")
        n_customers, n_items = len(self.customers), len(self.items)
        if self.owned.shape != (n_customers, n_items):
            raise ArtifactError(f"owned matrix shape {self.owned.shape} != ({n_customers}, {n_items})")
        check_csr(self.owned, "owned")
        self.catalog.check(n_items)
        if self.default_strategy not in self.scorers:
            raise ArtifactError(f"default strategy {self.default_strategy!r} has no arrays")
        for name, scorer in self.scorers.items():
            scorer.check(n_customers, n_items, name)


def write_version(registry: Path, bundle: ModelBundle) -> Path:
    """Write bundle as a new immutable version directory; returns its path. Does not touch CURRENT.

    Files go to a hidden temporary directory first, which is renamed into place only
    when complete, so nobody ever reads a half-written version. A run killed outright leaves the hidden
    directory; training.registry.sweep_leftovers removes it later.
    """
    root = versions_root(registry)
    root.mkdir(parents=True, exist_ok=True)
    final = root / bundle.version
    if final.exists():
        raise ArtifactError(f"version {bundle.version} already exists")
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle.version}.", dir=root))
    try:
        save_array(staging / "customers.npy", bundle.customers.ids)
        save_array(staging / "items.npy", bundle.items.ids)
        save_csr(staging, "owned", bundle.owned)
        for attr in ("title", "category", "active"):
            save_array(staging / f"catalog.{attr}.npy", getattr(bundle.catalog, attr))
        for name, scorer in bundle.scorers.items():
            scorer.save(staging / "strategies" / name)
        manifest = dict(bundle.manifest, format=FORMAT_VERSION)
        with naming(staging / MANIFEST):
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        os.chmod(staging, shared_directory_mode())  # mkdtemp's 0700 would hide the version from other users
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_version(registry: Path, version_id: str, *, mmap: bool = True) -> ModelBundle:
    """Load, validate and prepare one version. Raises ArtifactError, and nothing else, when anything is missing,
    inconsistent or damaged: damage can surface as any error of numpy or scipy, and every caller (the server's
    watcher, a rollback) must be able to refuse the version without a traceback."""
    if not VERSION_ID.fullmatch(version_id):
        raise ArtifactError(f"{version_id!r} is not a version id")
    path = versions_root(registry) / version_id
    manifest = read_manifest(path)
    if manifest.get("version") != version_id:
        raise ArtifactError(f"manifest of {version_id} names version {manifest.get('version')!r}")
    try:
        bundle = ModelBundle(
            manifest=manifest,
            customers=IdIndex(load_array(path / "customers.npy", mmap=mmap)),
            items=IdIndex(load_array(path / "items.npy", mmap=mmap)),
            owned=load_csr(path, "owned", mmap=mmap),
            catalog=Catalog(*(load_array(path / f"catalog.{a}.npy", mmap=mmap)
                              for a in ("title", "category", "active"))),
            scorers={name: load_scorer(path / "strategies" / name, mmap=mmap) for name in manifest["strategies"]},
            path=path,
        )
        bundle.validate()
        bundle.catalog.prepare_filters()
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 (see the docstring)
        raise ArtifactError(f"version {version_id} is inconsistent: {type(exc).__name__}: {exc}") from exc
    return bundle


def load_current(registry: Path, *, mmap: bool = True) -> ModelBundle | None:
    version_id = current_version(registry)
    return None if version_id is None else load_version(registry, version_id, mmap=mmap)
