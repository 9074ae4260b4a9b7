"""FeatureStore: format v1 round trips, completeness, validation, compression, failure modes."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest
import zarr

from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import (
    ATTRS_KEY,
    FeatureStore,
    StoreSettings,
    is_store,
    remove_store,
    validate_attrs,
)
from dinomix_cache.store.inspection import _check_array
from tests.corpus import copy_store
from tests.toy_meta import toy_meta


def make_meta(storage: StoreSettings | None = None, cases=(("0001", "labeled"), ("0002", "unlabeled"))) -> dict:
    return toy_meta(storage, cases)


def case_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((12, 2, 2, 8)).astype(np.float32) * 3
    image = rng.random((12, 32, 32), dtype=np.float32)
    label = rng.integers(0, 3, (12, 32, 32), dtype=np.uint8)
    return feats, image, label


def test_round_trip_and_completeness(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    assert is_store(tmp_path / "s.zarr")
    feats, image, label = case_arrays()
    store.write_case("0001", feats, image, label, {"role": "labeled", "class_voxels": [1, 2, 3]})
    reopened = FeatureStore.open(tmp_path / "s.zarr")
    assert reopened.complete_cases() == ["0001"]
    assert reopened.incomplete_cases() == ["0002"]
    np.testing.assert_array_equal(reopened.read_features("0001"), feats.astype(np.float16))
    np.testing.assert_array_equal(reopened.read_features("0001", 3, 9), feats[3:9].astype(np.float16))
    np.testing.assert_array_equal(reopened.read_volume("0001", "image"), image)
    np.testing.assert_array_equal(reopened.read_volume("0001", "label", 2, 4), label[2:4])
    assert reopened.case_attrs("0001")["shape"] == [12, 2, 2, 8]
    with pytest.raises(UserError, match="not complete"):
        reopened.read_features("0002")


def test_dimension_names_for_xarray_users_and_chunking(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    store.write_case("0001", *case_arrays(), {})
    arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["features"]["0001"]
    assert arr.metadata.dimension_names == ("slice", "token_row", "token_col", "channel")
    assert arr.chunks == (4, 2, 2, 8)
    assert arr.dtype == np.float16


def test_case_is_invisible_until_its_complete_attribute(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    # A writer killed after the arrays but before the attribute leaves exactly this.
    arr = store.group["features"].create_array("0001", shape=(12, 2, 2, 8), dtype="float16")
    arr[...] = 1
    assert not FeatureStore.open(tmp_path / "s.zarr").is_complete("0001")
    # Rewriting the case (resume) replaces the partial array.
    store.write_case("0001", *case_arrays(), {})
    assert FeatureStore.open(tmp_path / "s.zarr").is_complete("0001")


def test_lossy_mode_error_bound_and_size(tmp_path):
    feats, image, label = case_arrays()
    feats = np.random.default_rng(1).standard_normal((64, 10, 10, 64)).astype(np.float32)
    big = {"cases": (("0001", "labeled"),), "hidden": 64, "shape": (64, 160, 160)}
    exact = FeatureStore.create(tmp_path / "a.zarr", toy_meta(StoreSettings(), **big))
    lossy = FeatureStore.create(tmp_path / "b.zarr", toy_meta(StoreSettings(compression="lossy", keepbits=7), **big))
    for s in (exact, lossy):
        s.write_case("0001", feats, None, None, {})
    ref = feats.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(exact.read_features("0001").astype(np.float32), ref)
    got = lossy.read_features("0001").astype(np.float32)
    rel = np.abs(got - ref) / np.abs(ref).clip(min=1e-3)
    assert 0 < rel.max() <= 2.0**-8 + 1e-6
    assert lossy.bytes_on_disk("features") < 0.85 * exact.bytes_on_disk("features")


def test_disk_full_leaves_case_incomplete_with_clear_error(tmp_path, monkeypatch):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    feats, image, label = case_arrays()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    with pytest.raises(UserError, match=r"case 0001 .*no space left.*incomplete.*rerun"):
        store.write_case("0001", feats, image, label, {})
    monkeypatch.undo()
    assert FeatureStore.open(tmp_path / "s.zarr").incomplete_cases() == ["0001", "0002"]


def test_checksums_catch_a_flipped_byte(tmp_path):

    store = FeatureStore.create(tmp_path / "s.zarr", make_meta(StoreSettings(compression="none", chunk_slices=4)))
    store.write_case("0001", *case_arrays(), {})
    chunk = tmp_path / "s.zarr" / "features" / "0001" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems: list[str] = []
    _check_array(FeatureStore.open(tmp_path / "s.zarr").group["features"]["0001"], "f", problems)
    assert problems and "unreadable" in problems[0]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(format="something-else"), "not a dinomix feature store"),
        (lambda m: m.update(version=2), "newer than this dinomix-cache reads"),
        (lambda m: m.pop("teacher"), r"dinomix\.teacher \(missing\)"),
        (lambda m: m["dataset"]["cases"].append({"id": "../x", "role": "test"}), r"dinomix\.dataset\.cases\[2\]\.id"),
    ],
)
def test_attributes_validated_before_use(tmp_path, mutate, message):
    path = tmp_path / "s.zarr"
    FeatureStore.create(path, make_meta())
    meta_file = path / "zarr.json"
    doc = json.loads(meta_file.read_text())
    mutate(doc["attributes"][ATTRS_KEY])
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=message):
        FeatureStore.open(path)


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        FeatureStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a feature store"):
        FeatureStore.open(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    with pytest.raises(UserError, match="not a dinomix feature store"):
        FeatureStore.open(tmp_path / "other.zarr")
    with pytest.raises(UserError, match="refusing to delete"):
        remove_store(tmp_path / "plain")
    assert (tmp_path / "plain" / "notes.txt").exists()


def test_class_voxels_round_trip(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    assert store.class_voxels() is None
    store.write_class_voxels(np.array([100, 5, 1]))
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "s.zarr").class_voxels(), [100, 5, 1])


def test_validate_attrs_accepts_a_created_store(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    assert validate_attrs({ATTRS_KEY: store.meta}, "x")["version"] == 1


def test_typed_attributes_and_the_optional_crop_windows_section(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    assert store.attrs.teacher.hidden_size == 8 and store.attrs.teacher.token_grid == (2, 2)
    assert store.attrs.roles() == {"0001": "labeled", "0002": "unlabeled"} and store.attrs.crop_windows is None
    windows = {"size": [32, 32], "positions": [3, 3], "token_grid": [2, 2]}
    store.update_meta(crop_windows=windows)
    reopened = FeatureStore.open(tmp_path / "s.zarr")
    assert reopened.attrs.array_spec("windows").shape == (12, 3, 3, 2, 2, 8)
    with pytest.raises(UserError, match=r"dinomix\.crop_windows\.positions\[0\]"):
        store.update_meta(crop_windows={**windows, "positions": [0, 3]})
    store.update_meta(crop_windows=None)
    assert FeatureStore.open(tmp_path / "s.zarr").attrs.crop_windows is None


def test_finalize_records_hashes_and_statistics_once_every_case_is_complete(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    source = {"image": "img.nii.gz", "image_sha256": "2" * 64}
    store.write_case("0001", *case_arrays(), {"role": "labeled", "source": source, "class_voxels": [7, 2, 1]})
    assert store.case_source("0001") == source and store.case_source("0002") == {}
    assert not store.finalize() and store.class_voxels() is None
    assert store.meta["dataset"]["cases"][0] == {"id": "0001", "role": "labeled", "image_sha256": "2" * 64,
                                                 "label_sha256": None}
    store.write_case("0002", *case_arrays(1), {"role": "unlabeled", "class_voxels": [1, 1, 1]})
    assert store.finalize() and store.attrs.extraction.complete and store.attrs.extraction.finished
    np.testing.assert_array_equal(store.class_voxels(), [7, 2, 1])  # labeled cases only


def test_a_missing_chunk_reads_as_nan_and_is_refused_naming_the_case(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    store.write_case("0001", *case_arrays(), {"role": "labeled"})
    (tmp_path / "s.zarr" / "features" / "0001" / "c" / "1" / "0" / "0" / "0").unlink()
    reopened = FeatureStore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(reopened.read_features("0001", 0, 4), case_arrays()[0][:4].astype(np.float16))
    with pytest.raises(UserError, match=r"case 0001 features holds the fill value.*dinomix-cache verify"):
        reopened.read_features("0001", 2, 6)
    (tmp_path / "s.zarr" / "volumes" / "0001" / "label" / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(UserError, match="case 0001 label holds the fill value"):
        reopened.read_volume("0001", "label")


def test_a_zero_fill_store_with_deleted_chunks_is_refused_on_read(good_store, tmp_path):
    # Stores written before NaN fill values read a deleted chunk as zeros: their chunks are counted.
    out = copy_store(good_store, tmp_path / "s.zarr")
    meta_file = out / "features" / "0001" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["fill_value"] = 0.0
    meta_file.write_text(json.dumps(meta))
    root = json.loads((out / "zarr.json").read_text())
    root.pop("consolidated_metadata", None)
    (out / "zarr.json").write_text(json.dumps(root))
    assert FeatureStore.open(out).read_features("0001").shape[0] == 16  # intact: read as before
    shutil.rmtree(out / "features" / "0001" / "c" / "1")
    with pytest.raises(UserError, match="case 0001 features lacks .* verify"):
        FeatureStore.open(out).read_features("0001")
