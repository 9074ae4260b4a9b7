"""Stage two sampling: crops, the in-memory volume cache, the cases of each iteration, random gamma."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore, StoreSettings
from stage2_train.sampling.crops import (
    Crop,
    IterationSampler,
    VolumeCache,
    center_crop,
    random_crop,
    random_gamma,
)
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


# ----------------------------------------------------------------------------- crops


def test_random_crop_offsets_cover_the_valid_range_and_stay_inside():
    rng = np.random.default_rng(0)
    volume, size = (80, 160, 160), (64, 128, 128)
    seen = [set(), set(), set()]
    for _ in range(3000):
        crop = random_crop("c", volume, size, rng)
        assert crop.case_id == "c" and crop.size == size and crop.flips == (False, False, False)
        for axis, (o, s, v) in enumerate(zip(crop.offset, size, volume, strict=True)):
            assert o >= 0 and o + s <= v
            seen[axis].add(o)
    # Every valid start 0..V-S occurs (17 on z, 33 in-plane), not only multiples of 16.
    assert seen[0] == set(range(17))
    assert seen[1] == set(range(33)) and seen[2] == set(range(33))


def test_random_crop_on_a_token_grid():
    rng = np.random.default_rng(0)
    crops = [random_crop("c", (80, 160, 160), (64, 128, 128), rng, grid=(1, 16, 16)) for _ in range(300)]
    assert {c.offset[1] for c in crops} == {0, 16, 32} == {c.offset[2] for c in crops}
    assert {c.offset[0] for c in crops} == set(range(17))  # z stays free
    # 224-pixel teacher input on 160-pixel slices: tokens of 160/14 px, offsets rounded to voxels
    frac = {random_crop("c", (80, 160, 160), (64, 128, 128), rng, grid=(1, 160 / 14, 160 / 14)).offset[2]
            for _ in range(300)}
    assert frac == {0, 11, 23}
    with pytest.raises(ValueError, match="grid"):
        random_crop("c", (80, 160, 160), (64, 128, 128), rng, grid=(1, 0.5, 16))


def test_random_crop_of_the_whole_volume_and_types():
    crop = random_crop("c", (12, 32, 32), (12, 32, 32), np.random.default_rng(1))
    assert crop.offset == (0, 0, 0)
    assert all(type(v) is int for v in crop.offset + crop.size)
    assert hash(crop) == hash(Crop("c", (0, 0, 0), (12, 32, 32), (False, False, False)))


def test_crop_larger_than_volume_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(64, 128, 128\).*\(48, 160, 160\)"):
        random_crop("c", (48, 160, 160), (64, 128, 128), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(64, 200, 128\).*\(80, 160, 160\)"):
        center_crop("c", (80, 160, 160), (64, 200, 128))
    with pytest.raises(ValueError, match="three integers"):
        random_crop("c", (80, 160), (64, 128, 128), np.random.default_rng(0))


def test_random_crop_flips_only_when_asked_and_deterministic():
    rng = np.random.default_rng(3)
    flips = [random_crop("c", (16, 32, 32), (8, 16, 16), rng, flip=True).flips for _ in range(400)]
    counts = np.array(flips).sum(axis=0)
    assert counts[0] == 0  # DHC flips in-plane axes only by default
    assert 140 < counts[1] < 260 and 140 < counts[2] < 260
    every = [random_crop("c", (16, 32, 32), (8, 16, 16), rng, flip=True, flip_axes=(0, 1, 2)).flips
             for _ in range(400)]
    assert 140 < np.array(every).sum(axis=0)[0] < 260
    a = [random_crop("c", (16, 32, 32), (8, 16, 16), np.random.default_rng(9), flip=True) for _ in range(3)]
    b = [random_crop("c", (16, 32, 32), (8, 16, 16), np.random.default_rng(9), flip=True) for _ in range(3)]
    assert a == b
    with pytest.raises(ValueError, match="flip_axes"):
        random_crop("c", (16, 32, 32), (8, 16, 16), rng, flip=True, flip_axes=(3,))


def test_random_crop_resumes_from_a_saved_generator_state():
    rng = np.random.default_rng(5)
    random_crop("c", (80, 160, 160), (64, 128, 128), rng, flip=True)
    state = rng.bit_generator.state
    expected = [random_crop("c", (80, 160, 160), (64, 128, 128), rng, flip=True) for _ in range(5)]
    resumed = np.random.default_rng()
    resumed.bit_generator.state = state
    assert [random_crop("c", (80, 160, 160), (64, 128, 128), resumed, flip=True) for _ in range(5)] == expected


def test_center_crop_position():
    crop = center_crop("c", (80, 160, 160), (64, 128, 128))
    assert crop.offset == (8, 16, 16) and crop.size == (64, 128, 128) and crop.flips == (False,) * 3
    assert center_crop("c", (65, 129, 128), (64, 128, 128)).offset == (0, 0, 0)
    assert center_crop("c", (67, 160, 128), (64, 128, 128)).offset == (1, 16, 0)


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


# ----------------------------------------------------------------------------- iteration sampler

LAB = [f"L{i}" for i in range(4)]
UNL = [f"U{i:02d}" for i in range(16)]


def test_sampler_epoch_structure():
    sampler = IterationSampler(LAB, UNL, 2, 2)
    assert sampler.iterations_per_epoch() == 8 and not sampler.labeled_only
    epoch = sampler.epoch(np.random.default_rng(0))
    assert len(epoch) == 8
    assert all(len(lab) == 2 and len(unl) == 2 for lab, unl in epoch)
    unl_seen = [c for _, unl in epoch for c in unl]
    assert sorted(unl_seen) == UNL  # every unlabeled case exactly once
    lab_counts = Counter(c for lab, _ in epoch for c in lab)
    assert set(lab_counts) <= set(LAB) and all(lab_counts[c] == 4 for c in LAB)


def test_sampler_shuffles_and_drops_incomplete_group():
    sampler = IterationSampler(LAB, UNL[:7], 2, 2)
    assert sampler.iterations_per_epoch() == 3
    seen = Counter()
    for seed in range(50):
        epoch = sampler.epoch(np.random.default_rng(seed))
        unl = [c for _, u in epoch for c in u]
        assert len(unl) == 6 == len(set(unl))
        seen.update(unl)
        lab_counts = Counter(c for lab, _ in epoch for c in lab)
        assert sum(lab_counts.values()) == 6 and max(lab_counts.values()) - min(lab_counts[c] for c in LAB) <= 1
    assert set(seen) == set(UNL[:7])  # the dropped case changes from epoch to epoch
    orders = {tuple(c for _, u in IterationSampler(LAB, UNL).epoch(np.random.default_rng(s)) for c in u)
              for s in range(5)}
    assert len(orders) == 5


def test_sampler_labeled_repetition_more_than_labeled_set():
    # 1 labeled case, 2 per iteration: the case fills both places (DHC's repetition does the same).
    epoch = IterationSampler(["L"], UNL[:4]).epoch(np.random.default_rng(0))
    assert epoch == [(["L", "L"], epoch[0][1]), (["L", "L"], epoch[1][1])]


def test_sampler_labeled_only():
    sampler = IterationSampler(LAB + ["L4"], [], n_labeled=2)
    assert sampler.labeled_only and sampler.iterations_per_epoch() == 2
    epoch = sampler.epoch(np.random.default_rng(1))
    assert len(epoch) == 2 and all(unl == [] and len(lab) == 2 for lab, unl in epoch)
    lab = [c for lab, _ in epoch for c in lab]
    assert len(set(lab)) == 4 and set(lab) <= set(LAB + ["L4"])


def test_sampler_determinism():
    sampler = IterationSampler(LAB, UNL)
    rng = np.random.default_rng(42)
    sampler.epoch(rng)
    state = rng.bit_generator.state
    expected = [sampler.epoch(rng) for _ in range(3)]
    resumed = np.random.default_rng(0)
    resumed.bit_generator.state = state
    assert [sampler.epoch(resumed) for _ in range(3)] == expected
    assert sampler.epoch(np.random.default_rng(1)) == sampler.epoch(np.random.default_rng(1))
    assert sampler.epoch(np.random.default_rng(1)) != sampler.epoch(np.random.default_rng(2))


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="no labeled"):
        IterationSampler([], UNL)
    with pytest.raises(ValueError, match="duplicate"):
        IterationSampler(["a", "a"], UNL)
    with pytest.raises(ValueError, match="n_labeled"):
        IterationSampler(LAB, UNL, 0, 2)
    with pytest.raises(ValueError, match="fewer than n_unlabeled"):
        IterationSampler(LAB, ["U"], 2, 2)
    with pytest.raises(ValueError, match="fewer than n_labeled"):
        IterationSampler(["L"], [], 2, 2)


# ----------------------------------------------------------------------------- random gamma


def test_random_gamma_range_and_no_nan_at_zero():
    images = torch.linspace(0, 1, 11).reshape(1, 1, 1, 1, 11).repeat(64, 1, 1, 1, 1)
    images[:, 0, 0, 0, 0] = -1e-4  # interpolation undershoot
    out = random_gamma(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.all(out[:, 0, 0, 0, 0] == 0) and torch.all(out[:, 0, 0, 0, -1] == 1)
    # Recover each sample's exponent from x = 0.5: g = log(y) / log(0.5).
    g = torch.log(out[:, 0, 0, 0, 5].double()) / np.log(0.5)
    assert g.min() >= 0.7 - 1e-5 and g.max() <= 1.5 + 1e-5
    assert g.max() - g.min() > 0.4  # per sample, not one exponent for the batch
    assert torch.all(images[:, 0, 0, 0, 0] == -1e-4)  # input untouched


def test_random_gamma_determinism_and_range_argument():
    images = torch.rand(4, 1, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    a = random_gamma(images, generator=torch.Generator().manual_seed(7))
    b = random_gamma(images, generator=torch.Generator().manual_seed(7))
    c = random_gamma(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(3)
    random_gamma(images, generator=gen)
    state = gen.get_state()
    expected = random_gamma(images, generator=gen)
    gen2 = torch.Generator()
    gen2.set_state(state)
    assert torch.equal(random_gamma(images, generator=gen2), expected)
    assert torch.allclose(random_gamma(images, (2.0, 2.0)), images.clamp(0, 1) ** 2)
    for bad in [(0.0, 1.0), (1.5, 0.7), (-1.0, 2.0)]:
        with pytest.raises(ValueError, match="gamma_range"):
            random_gamma(images, bad)


def test_random_gamma_keeps_low_precision_dtype():
    images = torch.rand(2, 1, 2, 2, 2).to(torch.bfloat16)
    out = random_gamma(images, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
