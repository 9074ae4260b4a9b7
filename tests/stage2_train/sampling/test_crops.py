"""Stage two sampling: where crops lie, and random gamma."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage2_train.sampling.crops import Crop, center_crop, random_crop, random_gamma

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
