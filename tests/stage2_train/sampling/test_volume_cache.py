"""Stage two sampling: the in-memory volume cache and the crops it cuts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore, StoreSettings
from stage2_train.sampling.crops import Crop, random_crop
from stage2_train.sampling.volume_cache import VolumeCache
from tests.toy_meta import toy_meta


def make_meta(storage: StoreSettings) -> dict:
    """Store attributes of a toy dataset: case 0001 labeled, 0002 unlabeled, volumes 12x32x32."""
    return toy_meta(storage)


def case_arrays(seed: int):
    """(features (12, 2, 2, 8), image (12, 32, 32) float32 in [0, 1), label (12, 32, 32) uint8)."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((12, 2, 2, 8)).astype(np.float32)
    image = rng.random((12, 32, 32), dtype=np.float32)
    label = rng.integers(0, 3, (12, 32, 32), dtype=np.uint8)
    return feats, image, label


# ----------------------------------------------------------------------------- volume cache


@pytest.fixture(scope="module")
def store_and_arrays(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampling") / "s.zarr"
    store = FeatureStore.create(path, make_meta(StoreSettings(chunk_slices=4)))
    feats, image, label = case_arrays(0)
    image16 = image.astype(np.float16)
    store.write_case("0001", feats, image16, label, {})
    feats2, image2, _ = case_arrays(1)
    store.write_case("0002", feats2, image2.astype(np.float16), None, {})
    return FeatureStore.open(path), {"0001": (image16, label), "0002": (image2.astype(np.float16), None)}


def test_cache_crops_equal_slices_of_stored_arrays(store_and_arrays):
    store, arrays = store_and_arrays
    cache = VolumeCache(store, store.complete_cases(), with_labels=True)
    assert cache.case_ids == ["0001", "0002"] and len(cache) == 2 and "0001" in cache
    assert cache.shape("0001") == (12, 32, 32)
    assert cache.has_label("0001") and not cache.has_label("0002")
    assert cache.nbytes == 2 * 12 * 32 * 32 * 2 + 12 * 32 * 32
    image, label = arrays["0001"]
    crop = Crop("0001", (3, 5, 7), (8, 16, 17))
    img = cache.crop_image(crop)
    lab = cache.crop_label(crop)
    assert img.shape == (1, 8, 16, 17) and img.dtype == torch.float32
    assert lab.shape == (8, 16, 17) and lab.dtype == torch.int64
    np.testing.assert_array_equal(img[0].numpy(), image[3:11, 5:21, 7:24].astype(np.float32))
    np.testing.assert_array_equal(lab.numpy(), label[3:11, 5:21, 7:24].astype(np.int64))


def test_cache_flipped_crops_equal_np_flip(store_and_arrays):
    store, arrays = store_and_arrays
    cache = VolumeCache(store, ["0001"], with_labels=True)
    image, label = arrays["0001"]
    for flips in [(True, False, False), (False, True, True), (True, True, True)]:
        crop = Crop("0001", (2, 4, 6), (8, 16, 16), flips)
        axes = tuple(i for i, f in enumerate(flips) if f)
        np.testing.assert_array_equal(
            cache.crop_image(crop)[0].numpy(), np.flip(image[2:10, 4:20, 6:22], axis=axes).astype(np.float32)
        )
        np.testing.assert_array_equal(cache.crop_label(crop).numpy(), np.flip(label[2:10, 4:20, 6:22], axis=axes))


def test_cache_crops_are_copies(store_and_arrays):
    store, arrays = store_and_arrays
    cache = VolumeCache(store, ["0001"], with_labels=True)
    crop = Crop("0001", (0, 0, 0), (12, 32, 32))
    cache.crop_image(crop).fill_(7.0)
    cache.crop_label(crop).fill_(9)
    np.testing.assert_array_equal(cache.crop_image(crop)[0].numpy(), arrays["0001"][0].astype(np.float32))
    np.testing.assert_array_equal(cache.crop_label(crop).numpy(), arrays["0001"][1])


def test_cache_random_crop_round_trip(store_and_arrays):
    store, arrays = store_and_arrays
    cache = VolumeCache(store, ["0002"], with_labels=False)
    crop = random_crop("0002", cache.shape("0002"), (8, 16, 16), np.random.default_rng(0), flip=True)
    expected = np.flip(arrays["0002"][0][crop.slices], axis=crop.flipped_axes) if crop.flipped_axes else \
        arrays["0002"][0][crop.slices]
    np.testing.assert_array_equal(cache.crop_image(crop)[0].numpy(), expected.astype(np.float32))


def test_cache_errors_are_clear(store_and_arrays):
    store, _ = store_and_arrays
    cache = VolumeCache(store, ["0001", "0002"], with_labels=False)
    with pytest.raises(ValueError, match="has no label"):
        cache.crop_label(Crop("0001", (0, 0, 0), (4, 4, 4)))
    with pytest.raises(ValueError, match="has no label"):
        VolumeCache(store, ["0002"], with_labels=True).crop_label(Crop("0002", (0, 0, 0), (4, 4, 4)))
    with pytest.raises(ValueError, match="not in this volume cache"):
        cache.crop_image(Crop("0003", (0, 0, 0), (4, 4, 4)))
    with pytest.raises(ValueError, match="outside"):
        cache.crop_image(Crop("0001", (5, 0, 0), (8, 4, 4)))


def test_cache_of_a_store_without_volumes_or_incomplete_case(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta(StoreSettings(chunk_slices=4, volumes=False)))
    store.write_case("0001", *case_arrays(0), {})
    with pytest.raises(UserError, match="holds no volumes.*pass --data"):
        VolumeCache(store, ["0001"], with_labels=True)
    with pytest.raises(UserError, match="not complete"):
        VolumeCache(store, ["0002"], with_labels=False, data=tmp_path)
