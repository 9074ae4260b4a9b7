"""Distillation targets: online / cache / hybrid in both teacher views, against hand computations and
against each other with a teacher whose tokens depend on their context (``random:ctx-tiny``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.teacher.model import TeacherSettings, load_teacher
from stage1_extract.runner import run_extraction
from stage2_train.sampling.crops import Crop, random_crop
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.targets.fidelity import cosine_fidelity
from stage2_train.targets.geometry import cache_window
from stage2_train.targets.policies import CacheTargets, HybridTargets, MixedCrop, OnlineTargets, make_policy
from tests.tiny import tiny_settings

SHAPE = (32, 64, 64)  # (D, H, W): 4 x 4 token grid, 128 channels with the tiny teachers
C = 128
WINDOW = (48, 48)  # crop windows of the crop view: 2 x 2 positions of 3 x 3 tokens
TEACHER = "random:ctx-tiny"


@pytest.fixture(scope="module")
def env(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("targets") / "s.zarr"
    settings = tiny_settings(phantom_dir, out, cases=("0001", "0002", "0003"),
                             preprocess=PreprocessSettings(target_shape=SHAPE),
                             teacher=TeacherSettings(source=TEACHER), crop_windows=WINDOW)
    run_extraction(settings)
    store = FeatureStore.open(out)
    cases = store.complete_cases()
    volumes = VolumeCache(store, cases, with_labels=False)
    teacher = load_teacher(TeacherSettings(source=TEACHER, device="cpu"))
    return store, volumes, teacher, cases


def z_pool(cells: torch.Tensor) -> torch.Tensor:
    """(Z, y, x, C) per-slice cell maps → (C, Z/16, y, x)."""
    return cells.reshape(cells.shape[0] // 16, 16, *cells.shape[1:]).mean(1).permute(3, 0, 1, 2)


def mixed_image(volumes, item):
    image = volumes.crop_image(item.unlabeled)[0]
    if item.labeled is not None:
        image[item.box] = volumes.crop_image(item.labeled)[0][item.box]
    return image


def assert_teachers_targets(got: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to the store's float16 rounding: every cell's cosine ≥ 0.9999, and no value off by more
    than two float16 steps of the largest token value (a cell is an average of tokens)."""
    cells = F.cosine_similarity(got.double(), reference.double(), dim=1)
    assert float(cells.min()) >= 0.9999, f"worst cell cosine {float(cells.min()):.5f}"
    step = 2.0 ** -10 * float(reference.abs().max())
    assert float((got - reference).abs().max()) <= 2 * step


def random_items(volumes, cases, size, rng, grid=(1, 1, 1), flip=False, mixed=False):
    items = []
    for k in range(4):
        unl = random_crop(cases[k % 3], volumes.shape(cases[k % 3]), size, rng, flip=flip, grid=grid)
        if not mixed:
            items.append(MixedCrop(unl))
            continue
        lab = random_crop(cases[(k + 1) % 3], volumes.shape(cases[(k + 1) % 3]), size, rng, grid=grid)
        box = []
        for n in size:
            side = int(rng.integers(n // 4, 3 * n // 4 + 1))
            start = int(rng.integers(0, n - side + 1))
            box.append(slice(start, start + side))
        items.append(MixedCrop(unl, lab, tuple(box)))
    return items


# ------------------------------------------------------------------------- the promise: cache = teacher


def test_slice_view_cache_and_hybrid_equal_online_for_a_context_sensitive_teacher(env):
    store, volumes, teacher, cases = env
    rng = np.random.default_rng(0)
    size = (32, 48, 32)
    online = OnlineTargets(store, volumes, teacher)
    plain = random_items(volumes, cases, size, rng)  # any in-plane offset, not only the token grid
    assert any(o % 16 for item in plain for o in item.unlabeled.offset[1:])
    assert_teachers_targets(CacheTargets(store).targets(plain)[0], online.targets(plain)[0])
    hybrid = HybridTargets(store, volumes, teacher)
    for items in (random_items(volumes, cases, size, rng, mixed=True),
                  random_items(volumes, cases, size, rng, flip=True, mixed=True)):
        out, frac = hybrid.targets(items)
        assert 0.0 < frac < 1.0 or any(i.unlabeled.flips[1] or i.unlabeled.flips[2] for i in items)
        assert_teachers_targets(out, online.targets(items)[0])
    flipped = [MixedCrop(replace(item.unlabeled, flips=(False, True, True))) for item in plain]
    out, frac = hybrid.targets(flipped)
    assert frac == 1.0
    assert_teachers_targets(out, online.targets(flipped)[0])


def test_crop_view_cache_and_hybrid_equal_online_with_a_windows_store(env):
    store, volumes, teacher, cases = env
    rng = np.random.default_rng(1)
    size = (32, *WINDOW)
    grid = (1, 16, 16)  # crop windows lie on the token grid
    online = OnlineTargets(store, volumes, teacher, view="crop")
    plain = random_items(volumes, cases, size, rng, grid=grid)
    assert_teachers_targets(CacheTargets(store, view="crop").targets(plain)[0], online.targets(plain)[0])
    hybrid = HybridTargets(store, volumes, teacher, view="crop")
    for items in (random_items(volumes, cases, size, rng, grid=grid, mixed=True),
                  random_items(volumes, cases, size, rng, grid=grid, flip=True, mixed=True)):
        assert_teachers_targets(hybrid.targets(items)[0], online.targets(items)[0])


def test_the_two_views_differ_for_this_teacher(env):
    # What the old cache got wrong: whole-slice tokens are not the crop's tokens for a teacher that
    # sees context, so a test with this teacher fails if a view takes the other's targets.
    store, volumes, teacher, cases = env
    items = random_items(volumes, cases, (32, *WINDOW), np.random.default_rng(2), grid=(1, 16, 16))
    slice_cache = CacheTargets(store).targets(items)[0]
    crop_online = OnlineTargets(store, volumes, teacher, view="crop").targets(items)[0]
    assert cosine_fidelity(slice_cache, crop_online) < 0.99


# ------------------------------------------------------------------------- hand computations


def test_online_slice_view_equals_hand_computation(env):
    store, volumes, teacher, cases = env
    unl = Crop(cases[0], (0, 5, 11), (32, 32, 48), (False, True, False))
    lab = Crop(cases[1], (0, 20, 3), (32, 32, 48), (False, True, False))
    item = MixedCrop(unl, lab, (slice(3, 21), slice(7, 30), slice(10, 41)))
    out, frac = OnlineTargets(store, volumes, teacher).targets([item])
    assert out.shape == (1, C, 2, 2, 3) and out.dtype == torch.float32 and frac == 1.0
    # the whole slice, flipped as the crop is (rows), with x_mix pasted at the crop's flipped place
    full = torch.flip(torch.from_numpy(volumes.image(cases[0])[0:32].astype(np.float32)), [1])
    y0 = SHAPE[1] - 5 - 32
    full[:, y0:y0 + 32, 11:11 + 48] = mixed_image(volumes, item)
    tokens = teacher.forward_slices(full)
    expected = z_pool(cache_window(tokens, (y0, 11), (32, 48), (16.0, 16.0), "area"))
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_online_crop_view_equals_hand_computation(env):
    store, volumes, teacher, cases = env
    unl = Crop(cases[0], (0, 5, 11), (32, 32, 48))
    lab = Crop(cases[1], (0, 20, 3), (32, 32, 48), (False, True, False))
    item = MixedCrop(unl, lab, (slice(3, 21), slice(7, 30), slice(10, 41)))
    out, _ = OnlineTargets(store, volumes, teacher, view="crop").targets([item])
    tokens = teacher.forward_slices(mixed_image(volumes, item))  # 2 x 3 tokens of 16 px: one per cell
    torch.testing.assert_close(out[0], z_pool(tokens), rtol=1e-5, atol=1e-5)


def test_cache_unmixed_is_the_stored_tokens_under_the_cells(env):
    store, _, _, cases = env
    crop = Crop(cases[2], (0, 16, 0), (32, 32, 48))
    feats = torch.from_numpy(store.read_features(cases[2], 0, 32).astype(np.float32))
    for mapping in ("area", "bilinear"):
        out, frac = CacheTargets(store, mapping=mapping).targets([MixedCrop(crop)])
        assert out.shape == (1, C, 2, 2, 3) and out.dtype == torch.float32 and frac == 0.0
        torch.testing.assert_close(out[0], z_pool(feats[:, 1:3, 0:3]), rtol=0, atol=1e-6)
    window = Crop(cases[2], (0, 16, 0), (32, *WINDOW))
    out, _ = CacheTargets(store, view="crop").targets([MixedCrop(window)])
    stored = torch.from_numpy(store.read_windows(cases[2], 0, 32)[:, 1, 0].astype(np.float32))
    torch.testing.assert_close(out[0], z_pool(stored), rtol=0, atol=1e-6)


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


@pytest.mark.parametrize("view", ["slice", "crop"])
def test_hybrid_recomputes_box_slices_and_flips(env, view):
    store, volumes, teacher, cases = env
    online = OnlineTargets(store, volumes, teacher, view=view)
    cache = CacheTargets(store, view=view)
    hybrid = HybridTargets(store, volumes, teacher, view=view)
    unl = Crop(cases[0], (0, 16, 0), (32, 48, 48))
    lab = Crop(cases[1], (0, 0, 16), (32, 48, 48))

    # the box fills z-cell 0 exactly: cell 0 is online's, cell 1 cache's
    whole = MixedCrop(unl, lab, (slice(0, 16), slice(4, 30), slice(20, 44)))
    out, frac = hybrid.targets([whole])
    assert frac == 0.5 and out.shape == (1, C, 2, 3, 3)
    torch.testing.assert_close(out[:, :, 0], online.targets([whole])[0][:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :, 1], cache.targets([whole])[0][:, :, 1], rtol=0, atol=1e-6)

    # a box over 8 of the 32 slices, batched with an unmixed crop: 8 of 64 slices recomputed
    part = MixedCrop(unl, lab, (slice(5, 13), slice(0, 48), slice(0, 10)))
    assert hybrid.targets([part])[1] == 8 / 32
    assert hybrid.targets([part, MixedCrop(lab)])[1] == 8 / 64

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


def test_teacher_batches_at_most_64(env, monkeypatch):
    store, volumes, teacher, cases = env
    sizes = []
    forward = teacher.forward_slices

    def spy(slices, **kwargs):
        sizes.append(slices.shape[0])
        return forward(slices, **kwargs)

    monkeypatch.setattr(teacher, "forward_slices", spy)
    items = [MixedCrop(Crop(c, (0, 0, 0), (32, 32, 32))) for c in cases]
    out, frac = OnlineTargets(store, volumes, teacher).targets(items)
    assert sizes == [64, 32] and frac == 1.0 and out.shape == (3, C, 2, 2, 2)


# ------------------------------------------------------------------------- refusals and other geometries


def test_bad_crop_sizes(env):
    store, _, _, cases = env
    with pytest.raises(ValueError, match="multiples of 16"):
        CacheTargets(store).targets([MixedCrop(Crop(cases[0], (0, 0, 0), (24, 32, 32)))])
    with pytest.raises(ValueError, match="differ"):
        CacheTargets(store).targets([MixedCrop(Crop(cases[0], (0, 0, 0), (16, 32, 32))),
                                     MixedCrop(Crop(cases[0], (0, 0, 0), (32, 32, 32)))])
    with pytest.raises(ValueError, match="crop_windows.size"):
        CacheTargets(store, view="crop").targets([MixedCrop(Crop(cases[0], (0, 0, 0), (16, 32, 32)))])


def test_make_policy(env):
    store, volumes, teacher, _ = env
    for name in ("online", "hybrid"):
        with pytest.raises(ValueError, match="needs the teacher.*--targets cache"):
            make_policy(name, store, volumes, None)
    policy = make_policy("cache", store, None, None)
    assert isinstance(policy, CacheTargets) and policy.teacher is None and policy.mapping == "area"
    assert policy.view.name == "slice"
    assert isinstance(make_policy("hybrid", store, volumes, teacher), HybridTargets)
    assert make_policy("online", store, volumes, teacher, mapping="bilinear").mapping == "bilinear"
    assert make_policy("hybrid", store, volumes, teacher, view="crop").view.name == "crop"
    with pytest.raises(ValueError, match="unknown target policy"):
        make_policy("teacher", store, volumes, teacher)
    with pytest.raises(ValueError, match="mapping"):
        make_policy("cache", store, volumes, None, mapping="nearest")
    with pytest.raises(ValueError, match="teacher view"):
        make_policy("cache", store, volumes, None, view="patch")


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


def test_crop_view_cache_needs_crop_windows(phantom_dir, tmp_path):
    settings = tiny_settings(phantom_dir, tmp_path / "s.zarr", cases=("0001",))
    run_extraction(settings)
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.crop_windows is None
    volumes = VolumeCache(store, ["0001"], with_labels=False)
    teacher = load_teacher(TeacherSettings(source="random:tiny", device="cpu"))
    for name in ("cache", "hybrid"):
        with pytest.raises(ValueError, match="--crop-windows"):
            make_policy(name, store, volumes, teacher if name == "hybrid" else None, view="crop")
    online = make_policy("online", store, volumes, teacher, view="crop")  # the teacher alone needs no windows
    out, _ = online.targets([MixedCrop(Crop("0001", (0, 0, 0), (16, 32, 32)))])
    assert out.shape == (1, C, 1, 2, 2)


def test_teacher_input_size_differs_from_slices(phantom_dir, tmp_path):
    # 64 x 64 slices through a 32 x 32 teacher input: 2 x 2 tokens of 32 slice pixels each
    teacher_settings = TeacherSettings(source=TEACHER, input_size=(32, 32))
    settings = tiny_settings(phantom_dir, tmp_path / "s.zarr", cases=("0001",),
                             preprocess=PreprocessSettings(target_shape=(16, 64, 64)), teacher=teacher_settings)
    run_extraction(settings)
    store = FeatureStore.open(tmp_path / "s.zarr")
    volumes = VolumeCache(store, ["0001"], with_labels=False)
    teacher = load_teacher(replace(teacher_settings, device="cpu"))
    crop = Crop("0001", (0, 16, 0), (16, 48, 32))
    # slice view: the whole slice at the store's input size, as stage one; exact at any offset
    online = make_policy("online", store, volumes, teacher)
    assert online.view.geometry.token_px == (32.0, 32.0)
    out, _ = online.targets([MixedCrop(crop)])
    assert out.shape == (1, C, 1, 3, 2)
    assert_teachers_targets(make_policy("cache", store, None, None).targets([MixedCrop(crop)])[0], out)
    # crop view: the crop at input / slice scale, 48 x 32 px -> 24 x 16 -> rounded to 32 x 16 (2 x 1 tokens)
    crop_online = make_policy("online", store, volumes, teacher, view="crop")
    assert crop_online.view.input_size((48, 32)) == (32, 16)
    got, _ = crop_online.targets([MixedCrop(crop)])
    image = volumes.crop_image(crop)[0]
    tokens = teacher.forward_slices(image, input_size=(32, 16))
    expected = z_pool(cache_window(tokens, (0, 0), (48, 32), (24.0, 32.0), "area"))
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)


def test_crop_outside_the_volume_is_refused(env):
    store, _, _, cases = env
    with pytest.raises(ValueError, match="outside"):
        CacheTargets(store).targets([MixedCrop(Crop(cases[0], (0, 40, 0), (32, 32, 32)))])
    with pytest.raises(ValueError, match="outside"):
        CacheTargets(store).targets([MixedCrop(Crop(cases[0], (16, 0, 0), (32, 32, 32)))])
