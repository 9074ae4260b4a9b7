"""Distillation targets: cache windows, online / cache / hybrid policies against hand computations."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_settings

from dinomix_cache.preprocess import PreprocessSettings
from dinomix_cache.store import FeatureStore
from dinomix_cache.teacher import TeacherSettings, load_teacher
from stage1_extract.runner import run_extraction
from stage2_train.sampling import Crop, VolumeCache
from stage2_train.targets import (
    CacheTargets,
    HybridTargets,
    MixedCrop,
    OnlineTargets,
    cache_window,
    cosine_fidelity,
    make_policy,
    measure_fidelity,
)

SHAPE = (32, 64, 64)  # (D, H, W): 4 x 4 token grid, 128 channels with random:tiny
C = 128


@pytest.fixture(scope="module")
def env(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("targets") / "s.zarr"
    settings = tiny_settings(phantom_dir, out, cases=("0001", "0002", "0003"),
                             preprocess=PreprocessSettings(target_shape=SHAPE))
    run_extraction(settings)
    store = FeatureStore.open(out)
    cases = store.complete_cases()
    volumes = VolumeCache(store, cases, with_labels=False)
    teacher = load_teacher(TeacherSettings(source="random:tiny", device="cpu"))
    return store, volumes, teacher, cases


def pool_slices(per_slice: torch.Tensor, cells: tuple[int, int]) -> torch.Tensor:
    """(Z, gh, gw, C) per-slice grids → (C, Z/16, Y/16, X/16), by hand."""
    grid = F.adaptive_avg_pool2d(per_slice.permute(0, 3, 1, 2), cells)  # (Z, C, y, x)
    z = per_slice.shape[0] // 16
    return grid.reshape(z, 16, *grid.shape[1:]).mean(1).permute(1, 0, 2, 3)


def mixed_image(volumes, item):
    image = volumes.crop_image(item.unlabeled)[0]
    if item.labeled is not None:
        image[item.box] = volumes.crop_image(item.labeled)[0][item.box]
    return image


# ------------------------------------------------------------------------------------------ cache_window


@pytest.mark.parametrize("mapping", ["area", "bilinear"])
def test_cache_window_token_aligned_is_the_stored_tokens(mapping):
    feats = torch.randn(3, 5, 6, 7)
    out = cache_window(feats, (16, 32), (48, 32), (16.0, 16.0), mapping)
    assert out.shape == (3, 3, 2, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out, feats[:, 1:4, 2:4], rtol=0, atol=0)


@pytest.mark.parametrize("mapping", ["area", "bilinear"])
def test_cache_window_whole_slice_is_the_grid(mapping):
    feats = np.random.default_rng(0).normal(size=(2, 4, 4, 5)).astype(np.float16)
    out = cache_window(feats, (0, 0), (64, 64), (16.0, 16.0), mapping)
    torch.testing.assert_close(out, torch.from_numpy(feats.astype(np.float32)), rtol=0, atol=0)


def test_cache_window_half_token_area_is_the_neighbour_mean():
    feats = torch.randn(1, 4, 4, 3)
    out = cache_window(feats, (8, 0), (16, 16), (16.0, 16.0), "area")
    torch.testing.assert_close(out[0, 0, 0], (feats[0, 0, 0] + feats[0, 1, 0]) / 2)
    out = cache_window(feats, (8, 24), (16, 16), (16.0, 16.0), "area")  # half a token on both axes
    torch.testing.assert_close(out[0, 0, 0], feats[0, 0:2, 1:3].mean((0, 1)))
    # bilinear samples the cell centre (pixel 16 = the border between tokens 0 and 1): the same mean
    out = cache_window(feats, (8, 0), (16, 16), (16.0, 16.0), "bilinear")
    torch.testing.assert_close(out[0, 0, 0], (feats[0, 0, 0] + feats[0, 1, 0]) / 2)


def test_cache_window_area_equals_bilinear_for_16px_tokens():
    # a 16 px cell over 16 px tokens overlaps two tokens exactly by the bilinear weights of its centre
    feats = torch.randn(2, 6, 5, 4)
    for offset in ((0, 0), (5, 11), (13, 3), (32, 16)):
        area = cache_window(feats, offset, (48, 64), (16.0, 16.0), "area")
        torch.testing.assert_close(area, cache_window(feats, offset, (48, 64), (16.0, 16.0), "bilinear"))


def test_cache_window_fractional_tokens_and_errors():
    feats = torch.randn(1, 2, 2, 3)  # 2 x 2 tokens over a 48 x 48 slice: 24 px per token
    out = cache_window(feats, (0, 0), (48, 48), (24.0, 24.0), "area")
    f = feats[0]
    torch.testing.assert_close(out[0, 0, 0], f[0, 0])  # pixels [0, 16) lie in token 0
    torch.testing.assert_close(out[0, 2, 2], f[1, 1])  # pixels [32, 48) lie in token 1
    torch.testing.assert_close(out[0, 1, 1], f.mean((0, 1)))  # [16, 32): 8 px of each token
    torch.testing.assert_close(out[0, 0, 1], (f[0, 0] + f[0, 1]) / 2)
    with pytest.raises(ValueError, match="multiples of 16"):
        cache_window(feats, (0, 0), (40, 48), (24.0, 24.0), "area")
    with pytest.raises(ValueError, match="outside"):
        cache_window(feats, (16, 0), (48, 48), (24.0, 24.0), "area")
    with pytest.raises(ValueError, match="mapping"):
        cache_window(feats, (0, 0), (48, 48), (24.0, 24.0), "nearest")


def test_cosine_fidelity():
    a = torch.randn(2, 8, 1, 2, 2)
    assert cosine_fidelity(a, a) == pytest.approx(1.0)
    assert cosine_fidelity(a, -a) == pytest.approx(-1.0)
    assert cosine_fidelity(a, 3 * a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_fidelity(a, a[:1])


def test_mixed_crop_validation():
    unl = Crop("0001", (0, 0, 0), (32, 48, 48))
    item = MixedCrop(unl, replace(unl, case_id="0002"), (slice(None), slice(8, None), slice(0, 0)))
    assert item.box == (slice(0, 32), slice(8, 48), slice(0, 0)) and not item.mixed
    assert not MixedCrop(unl).mixed
    with pytest.raises(ValueError, match="both"):
        MixedCrop(unl, unl)
    with pytest.raises(ValueError, match="size"):
        MixedCrop(unl, replace(unl, size=(16, 48, 48)), (slice(0, 1),) * 3)


# ------------------------------------------------------------------------------------------ policies


def test_online_equals_hand_computation(env):
    store, volumes, teacher, cases = env
    unl = Crop(cases[0], (0, 5, 11), (32, 32, 48))
    lab = Crop(cases[1], (0, 20, 3), (32, 32, 48), (False, True, False))
    item = MixedCrop(unl, lab, (slice(3, 21), slice(7, 30), slice(10, 41)))
    policy = OnlineTargets(store, volumes, teacher)
    out, frac = policy.targets([item])
    assert out.shape == (1, C, 2, 2, 3) and out.dtype == torch.float32 and frac == 1.0
    expected = pool_slices(teacher.forward_slices(mixed_image(volumes, item)), (2, 3))
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_cache_unmixed_aligned_is_pooled_stored_features(env):
    store, volumes, _, cases = env
    crop = Crop(cases[2], (0, 16, 0), (32, 32, 48))
    for mapping in ("area", "bilinear"):
        out, frac = CacheTargets(store, mapping=mapping).targets([MixedCrop(crop)])
        assert out.shape == (1, C, 2, 2, 3) and out.dtype == torch.float32 and frac == 0.0
        feats = torch.from_numpy(store.read_features(cases[2], 0, 32).astype(np.float32))[:, 1:3, 0:3]
        torch.testing.assert_close(out[0], pool_slices(feats, (2, 3)), rtol=0, atol=1e-6)


def _pixel_features(store, crop: Crop) -> torch.Tensor:
    """The crop's (Z, Y, X, C) pixel-level features: every pixel carries its token (16 px per token), flipped."""
    z, y, x = crop.offset
    feats = torch.from_numpy(store.read_features(crop.case_id, z, z + crop.size[0]).astype(np.float32))
    pixels = feats.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, y:y + crop.size[1], x:x + crop.size[2]]
    return torch.flip(pixels, [a for a in crop.flipped_axes]) if crop.flipped_axes else pixels


def test_cache_with_box_equals_pixel_composite(env):
    store, _, _, cases = env
    unl = Crop(cases[0], (0, 7, 13), (32, 48, 32), (True, False, True))
    lab = Crop(cases[1], (0, 3, 29), (32, 48, 32), (False, True, False))
    box = (slice(9, 27), slice(5, 38), slice(12, 31))
    out, frac = CacheTargets(store, mapping="area").targets([MixedCrop(unl, lab, box)])
    assert frac == 0.0
    composite = _pixel_features(store, unl)
    composite[box] = _pixel_features(store, lab)[box]
    pooled = F.avg_pool3d(composite.permute(3, 0, 1, 2)[None], 16)[0]
    torch.testing.assert_close(out[0], pooled, rtol=1e-5, atol=1e-5)
    bilinear, _ = CacheTargets(store, mapping="bilinear").targets([MixedCrop(unl, lab, box)])
    assert bilinear.shape == out.shape and cosine_fidelity(bilinear, out) > 0.8


def test_hybrid_recomputes_box_slices_and_flips(env):
    store, volumes, teacher, cases = env
    online = OnlineTargets(store, volumes, teacher)
    cache = CacheTargets(store)
    hybrid = HybridTargets(store, volumes, teacher)
    unl = Crop(cases[0], (0, 9, 2), (32, 48, 48))
    lab = Crop(cases[1], (0, 1, 14), (32, 48, 48))

    # the box fills z-cell 0 exactly: cell 0 is online's, cell 1 cache's
    whole = MixedCrop(unl, lab, (slice(0, 16), slice(4, 30), slice(20, 44)))
    out, frac = hybrid.targets([whole])
    assert frac == 0.5 and out.shape == (1, C, 2, 3, 3)
    torch.testing.assert_close(out[:, :, 0], online.targets([whole])[0][:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :, 1], cache.targets([whole])[0][:, :, 1], rtol=0, atol=1e-6)

    # a box over 8 of the 32 slices, batched with an unmixed crop: 8 of 64 slices recomputed
    part = MixedCrop(unl, lab, (slice(5, 13), slice(0, 48), slice(0, 10)))
    _, frac = hybrid.targets([part])
    assert frac == 8 / 32
    _, frac = hybrid.targets([part, MixedCrop(lab)])
    assert frac == 8 / 64

    # unmixed: all from the store; an in-plane flip: all recomputed; a z flip only reorders slices
    plain = MixedCrop(unl)
    out, frac = hybrid.targets([plain])
    assert frac == 0.0
    torch.testing.assert_close(out, cache.targets([plain])[0], rtol=0, atol=0)
    flipped = MixedCrop(replace(unl, flips=(False, False, True)))
    out, frac = hybrid.targets([flipped])
    assert frac == 1.0
    torch.testing.assert_close(out, online.targets([flipped])[0], rtol=1e-5, atol=1e-5)
    zflip = MixedCrop(replace(unl, flips=(True, False, False)))
    out, frac = hybrid.targets([zflip])
    assert frac == 0.0
    torch.testing.assert_close(out, torch.flip(cache.targets([plain])[0], [2]), rtol=0, atol=1e-6)
    # the labeled crop's flips do not matter: its box slices are recomputed anyway
    lab_flipped = MixedCrop(unl, replace(lab, flips=(True, True, True)), part.box)
    out, frac = hybrid.targets([lab_flipped])
    assert frac == 8 / 32
    torch.testing.assert_close(out[:, :, 1], cache.targets([lab_flipped])[0][:, :, 1], rtol=0, atol=1e-6)


def test_teacher_batches_at_most_64(env, monkeypatch):
    store, volumes, teacher, cases = env
    sizes = []
    forward = teacher.forward_slices

    def spy(slices):
        sizes.append(slices.shape[0])
        return forward(slices)

    monkeypatch.setattr(teacher, "forward_slices", spy)
    items = [MixedCrop(Crop(c, (0, 0, 0), (32, 32, 32))) for c in cases]
    out, frac = OnlineTargets(store, volumes, teacher).targets(items)
    assert sizes == [64, 32] and frac == 1.0 and out.shape == (3, C, 2, 2, 2)


def test_bad_crop_sizes(env):
    store, _, _, cases = env
    with pytest.raises(ValueError, match="multiples of 16"):
        CacheTargets(store).targets([MixedCrop(Crop(cases[0], (0, 0, 0), (24, 32, 32)))])
    with pytest.raises(ValueError, match="differ"):
        CacheTargets(store).targets([MixedCrop(Crop(cases[0], (0, 0, 0), (16, 32, 32))),
                                     MixedCrop(Crop(cases[0], (0, 0, 0), (32, 32, 32)))])


def test_make_policy(env):
    store, volumes, teacher, _ = env
    for name in ("online", "hybrid"):
        with pytest.raises(ValueError, match="needs the teacher.*--targets cache"):
            make_policy(name, store, volumes, None)
    policy = make_policy("cache", store, None, None)
    assert isinstance(policy, CacheTargets) and policy.teacher is None and policy.mapping == "area"
    assert isinstance(make_policy("hybrid", store, volumes, teacher), HybridTargets)
    assert make_policy("online", store, volumes, teacher, mapping="bilinear").mapping == "bilinear"
    with pytest.raises(ValueError, match="unknown target policy"):
        make_policy("teacher", store, volumes, teacher)
    with pytest.raises(ValueError, match="mapping"):
        make_policy("cache", store, volumes, None, mapping="nearest")


def test_make_policy_refuses_another_teacher(env):
    import copy

    store, volumes, teacher, _ = env
    other = copy.copy(teacher)
    other.hidden_size = 64
    with pytest.raises(ValueError, match="hidden_size"):
        make_policy("online", store, volumes, other)
    other = copy.copy(teacher)
    other._weights_sha256 = "0" * 64
    with pytest.raises(ValueError, match="weights differ"):
        make_policy("hybrid", store, volumes, other)


def test_teacher_input_size_differs_from_slices(phantom_dir, tmp_path):
    # 64 x 64 slices through a 32 x 32 teacher input: 2 x 2 tokens of 32 slice pixels each
    settings = tiny_settings(phantom_dir, tmp_path / "s.zarr", cases=("0001",),
                             preprocess=PreprocessSettings(target_shape=(16, 64, 64)),
                             teacher=TeacherSettings(source="random:tiny", input_size=(32, 32)))
    run_extraction(settings)
    store = FeatureStore.open(tmp_path / "s.zarr")
    volumes = VolumeCache(store, ["0001"], with_labels=False)
    teacher = load_teacher(TeacherSettings(source="random:tiny", input_size=(32, 32), device="cpu"))
    policy = make_policy("online", store, volumes, teacher)
    assert policy.token_px == (32.0, 32.0) and policy.teacher.settings.input_size is None
    assert teacher.settings.input_size == (32, 32)  # the caller's teacher is untouched
    assert policy.teacher_crop_size((64, 32)) == (32, 16) and policy.teacher_crop_size((48, 48)) == (32, 32)
    crop = Crop("0001", (0, 16, 0), (16, 48, 32))
    out, _ = policy.targets([MixedCrop(crop)])
    image = F.interpolate(volumes.crop_image(crop), size=(32, 16), mode="bilinear", align_corners=False)[0]
    grid = policy.teacher.forward_slices(image)
    assert grid.shape == (16, 2, 1, C)
    torch.testing.assert_close(out[0], pool_slices(grid, (3, 2)), rtol=1e-5, atol=1e-5)
    cached, _ = make_policy("cache", store, None, None).targets([MixedCrop(crop)])
    assert cached.shape == out.shape == (1, C, 1, 3, 2)
    assert cosine_fidelity(cached, out) > 0


def test_measure_fidelity_smoke(env):
    store, volumes, teacher, _ = env
    result = measure_fidelity(store, volumes, teacher, (32, 32, 32), 2, np.random.default_rng(0))
    for row in result.values():
        for key in ("cache-area", "cache-bilinear", "hybrid-area", "hybrid-bilinear"):
            assert -1.0 <= row[key] <= 1.0 + 1e-9
    assert result["unmixed"]["hybrid-recomputed"] == 0.0 < result["mixed"]["hybrid-recomputed"]
    assert result["unmixed"]["hybrid-area"] == pytest.approx(result["unmixed"]["cache-area"])


def test_crop_outside_the_volume_is_refused(env):
    store, _, _, cases = env
    with pytest.raises(ValueError, match="outside"):
        CacheTargets(store).targets([MixedCrop(Crop(cases[0], (0, 40, 0), (32, 32, 32)))])
    with pytest.raises(ValueError, match="outside"):
        CacheTargets(store).targets([MixedCrop(Crop(cases[0], (16, 0, 0), (32, 32, 32)))])
