"""The artifact format: round trip without pickle, memory mapping, and the atomic CURRENT pointer."""

from __future__ import annotations

import json
import mmap

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc import artifacts
from recsvc.artifacts import Catalog, IdIndex, ModelBundle
from recsvc.errors import ArtifactError
from recsvc.scoring import FactorScorer, ItemSimilarityScorer, PopularityScorer


def memory_mapped(array) -> bool:
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


def make_bundle(version: str = "v1") -> ModelBundle:
    rng = np.random.default_rng(0)
    owned = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 1, 0, 0], [0, 0, 0, 3]], dtype=np.float32))
    return ModelBundle(
        manifest={"version": version, "default_strategy": "als", "strategies": {"als": {}, "knn": {}, "popular": {}}},
        customers=IdIndex(artifacts.encode_ids(["c2", "c1", "ç3"])),
        items=IdIndex(artifacts.encode_ids(["i1", "i2", "i3", "i4"])),
        owned=owned,
        catalog=Catalog(np.array(["A", "B", "", "D"]), np.array(["x", "y", "x", ""]),
                        np.array([True, True, False, True])),
        scorers={
            "als": FactorScorer(rng.random((3, 5), dtype=np.float32), rng.random((4, 5), dtype=np.float32),
                                regularization=0.1),
            "knn": ItemSimilarityScorer(sp.csr_matrix(rng.random((4, 4), dtype=np.float32))),
            "popular": PopularityScorer(np.array([3, 1, 2, 0], dtype=np.float32)),
        },
    )


def test_round_trip_preserves_every_array_and_maps_memory(tmp_path):
    original = make_bundle()
    artifacts.write_version(tmp_path, original)
    loaded = artifacts.load_version(tmp_path, "v1")
    assert loaded.manifest["format"] == artifacts.FORMAT_VERSION
    assert [loaded.customers.external(i) for i in range(3)] == ["c1", "c2", "ç3"]
    assert loaded.customers.position("ç3") == 2 and loaded.customers.position("nobody") is None
    assert (loaded.owned != original.owned).nnz == 0
    for array in (loaded.owned.data, loaded.owned.indices, loaded.owned.indptr,
                  loaded.scorers["als"].item_factors, loaded.scorers["knn"].matrix.data):
        assert memory_mapped(array)
    for name in ("title", "category", "active"):
        np.testing.assert_array_equal(getattr(loaded.catalog, name), getattr(original.catalog, name))
    for name, scorer in original.scorers.items():
        for array_name, array in scorer.arrays().items():
            np.testing.assert_array_equal(loaded.scorers[name].arrays()[array_name], array)
        history = np.array([0, 2])
        np.testing.assert_allclose(loaded.scorers[name].scores(1, history), scorer.scores(1, history), rtol=1e-6)


def test_arrays_load_without_pickle(tmp_path):
    path = artifacts.write_version(tmp_path, make_bundle())
    for npy in path.rglob("*.npy"):
        np.load(npy, allow_pickle=False)  # raises for object arrays


def test_versions_are_immutable(tmp_path):
    artifacts.write_version(tmp_path, make_bundle())
    with pytest.raises(ArtifactError, match="already exists"):
        artifacts.write_version(tmp_path, make_bundle())


def test_current_pointer_switches_atomically(tmp_path):
    assert artifacts.current_version(tmp_path) is None
    for version in ("v1", "v2"):
        artifacts.write_version(tmp_path, make_bundle(version))
    artifacts.set_current(tmp_path, "v1")
    assert artifacts.load_current(tmp_path).version == "v1"
    artifacts.set_current(tmp_path, "v2")
    assert artifacts.current_version(tmp_path) == "v2"
    assert artifacts.list_versions(tmp_path) == ["v1", "v2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "versions"]  # no temporary files left


def test_pointer_to_a_missing_version_is_refused(tmp_path):
    artifacts.write_version(tmp_path, make_bundle("v1"))
    artifacts.set_current(tmp_path, "v1")
    with pytest.raises(ArtifactError, match="does not exist"):
        artifacts.set_current(tmp_path, "v9")
    assert artifacts.current_version(tmp_path) == "v1"


def test_a_damaged_version_is_refused(tmp_path):
    path = artifacts.write_version(tmp_path, make_bundle())
    (path / "strategies" / "als" / "item_factors_t.npy").write_bytes(b"not an array")
    with pytest.raises(ArtifactError, match="cannot load strategy arrays"):
        artifacts.load_version(tmp_path, "v1")


def test_a_version_whose_shapes_disagree_is_refused(tmp_path):
    path = artifacts.write_version(tmp_path, make_bundle())
    np.save(path / "items.npy", artifacts.encode_ids(["i1", "i2"]), allow_pickle=False)
    with pytest.raises(ArtifactError, match="owned matrix shape"):
        artifacts.load_version(tmp_path, "v1")


def test_manifest_of_another_format_is_refused(tmp_path):
    path = artifacts.write_version(tmp_path, make_bundle())
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ArtifactError, match="artifact format 99"):
        artifacts.load_version(tmp_path, "v1")


def test_a_version_with_item_factors_saved_items_first_still_loads_and_scores_the_same(tmp_path):
    """Versions written before the transposed layout hold item_factors.npy (items x factors)."""
    path = artifacts.write_version(tmp_path, make_bundle())
    new = artifacts.load_version(tmp_path, "v1").scorers["als"]
    als = path / "strategies" / "als"
    np.save(als / "item_factors.npy", np.load(als / "item_factors_t.npy").T.copy(), allow_pickle=False)
    (als / "item_factors_t.npy").unlink()
    old = artifacts.load_version(tmp_path, "v1").scorers["als"]
    np.testing.assert_array_equal(old.item_factors, new.item_factors)
    for customer, history in ((0, np.array([1])), (None, np.array([0, 2]))):
        np.testing.assert_array_equal(old.scores(customer, history), new.scores(customer, history))
