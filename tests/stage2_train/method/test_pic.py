"""Progressive Imbalance-aware CutMix: Eq. 2-4 against hand arithmetic, boxes, mixing, batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stage2_train.method.pic import (
    PicSettings,
    box_size_for,
    pic_batch,
    pic_box,
    pic_distribution,
    pic_mix,
    sample_class,
)

COUNTS = [1000, 100, 10, 1]
E_MAX = 300.0

# Eq. 2 by hand: min_j N_j = 1, so I = [1/1000, 1/100, 1/10, 1/1] = [0.001, 0.01, 0.1, 1].
# Eq. 3, γ = 1: Σ I = 0.001 + 0.01 + 0.1 + 1 = 1.111 → P_bal = [0.001, 0.01, 0.1, 1] / 1.111.
P_BAL_G1 = np.array([0.001, 0.01, 0.1, 1.0]) / 1.111
# Eq. 3, γ = 2: I² = [0.000001, 0.0001, 0.01, 1], Σ = 1.010101 → P_bal = I² / 1.010101.
P_BAL_G2 = np.array([0.000001, 0.0001, 0.01, 1.0]) / 1.010101
P_UNI = np.array([0.25, 0.25, 0.25, 0.25])


def _expected(p_bal: np.ndarray, alpha: float) -> np.ndarray:
    return (1 - alpha) * p_bal + alpha * P_UNI


# Eq. 4: α = min(1, E / (η E_max)). With η = 2/3 and E_max = 300: η E_max = 200, so
# E = 0 → α = 0; E = 100 → 100/200 = 0.5; E = 200 → 1; E = 300 → min(1, 1.5) = 1.
# η = 0 → α = 1 at every epoch (0/0 at E = 0 defined as 1); η = ∞ → α = 0 at every epoch.
ALPHAS = {
    2 / 3: {0.0: 0.0, 100.0: 0.5, 200.0: 1.0, 300.0: 1.0},
    0.0: {0.0: 1.0, 100.0: 1.0, 200.0: 1.0, 300.0: 1.0},
    math.inf: {0.0: 0.0, 100.0: 0.0, 200.0: 0.0, 300.0: 0.0},
}


@pytest.mark.parametrize("gamma, p_bal", [(1.0, P_BAL_G1), (2.0, P_BAL_G2)])
@pytest.mark.parametrize("eta", [2 / 3, 0.0, math.inf])
@pytest.mark.parametrize("epoch", [0.0, E_MAX / 3, 2 * E_MAX / 3, E_MAX])
def test_distribution_matches_hand_computation(gamma, p_bal, eta, epoch):
    probs = pic_distribution(COUNTS, epoch, E_MAX, gamma=gamma, eta=eta)
    alpha = ALPHAS[eta][epoch]
    np.testing.assert_allclose(probs, _expected(p_bal, alpha), rtol=1e-12, atol=1e-15)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_distribution_spot_values():
    # γ = 1, η = 2/3, E = E_max/3 → α = 0.5: P(3) = 0.5 · 1/1.111 + 0.5 · 0.25 = 0.450045 + 0.125.
    probs = pic_distribution(COUNTS, 100.0, 300.0)
    assert probs[3] == pytest.approx(0.5 / 1.111 + 0.125, rel=1e-12)
    # P(0) = 0.5 · 0.001/1.111 + 0.125
    assert probs[0] == pytest.approx(0.0005 / 1.111 + 0.125, rel=1e-12)
    # Balanced mode favours the rarest class, uniform mode does not.
    assert np.argmax(pic_distribution(COUNTS, 0, 300)) == 3
    np.testing.assert_allclose(pic_distribution(COUNTS, 0, 300, eta=0), P_UNI)


def test_zero_count_class_gets_zero_probability():
    counts = [1000, 0, 10, 1]
    # Present classes 0, 2, 3: min over present = 1 → I = [0.001, -, 0.1, 1], Σ = 1.101.
    p_bal = np.array([0.001, 0.0, 0.1, 1.0]) / 1.101
    p_uni = np.array([1 / 3, 0.0, 1 / 3, 1 / 3])
    np.testing.assert_allclose(pic_distribution(counts, 0, 10), p_bal, rtol=1e-12)
    np.testing.assert_allclose(pic_distribution(counts, 10, 10), p_uni, rtol=1e-12)
    mid = pic_distribution(counts, 10 / 3, 10)  # α = (10/3) / (2/3 · 10) = 0.5
    np.testing.assert_allclose(mid, 0.5 * p_bal + 0.5 * p_uni, rtol=1e-12)
    assert mid[1] == 0.0
    assert mid.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [[0, 0, 0], [10, -1, 3], [], [[1, 2]]])
def test_distribution_rejects_bad_counts(bad):
    with pytest.raises(ValueError):
        pic_distribution(bad, 0, 10)


def test_distribution_rejects_bad_schedule():
    with pytest.raises(ValueError):
        pic_distribution(COUNTS, 0, 0)
    with pytest.raises(ValueError):
        pic_distribution(COUNTS, -1, 10)
    with pytest.raises(ValueError):
        pic_distribution(COUNTS, 0, 10, eta=-0.5)


def test_sample_class_redraws_from_present():
    probs = np.array([0.0, 0.0, 0.0, 1.0])  # always draws 3 first
    rng = np.random.default_rng(0)
    # 3 absent: probs renormalised over {0, 2} sum to 0 → uniform over present.
    drawn = [sample_class(probs, [0, 2], rng) for _ in range(400)]
    assert set(drawn) == {0, 2}
    assert 150 < drawn.count(0) < 250
    # Renormalised over the present classes: P(1 | {0, 1}) = 0.3 / (0.1 + 0.3) = 0.75.
    probs = np.array([0.1, 0.3, 0.0, 0.6])
    rng = np.random.default_rng(1)
    drawn = [sample_class(probs, [0, 1], rng) for _ in range(4000)]
    assert set(drawn) <= {0, 1}
    assert drawn.count(1) / 4000 == pytest.approx(0.75, abs=0.03)
    # A present class is accepted as drawn.
    assert sample_class(np.array([0, 1.0, 0, 0]), [1, 2], np.random.default_rng(5)) == 1
    with pytest.raises(ValueError):
        sample_class(probs, [], rng)
    with pytest.raises(ValueError):
        sample_class(probs, [7], rng)


def _label_crop(shape=(12, 16, 20), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, dtype=np.int64)
    lab[2:6, 3:9, 4:12] = 1
    lab[8:10, 10:14, 15:19] = 2
    lab[rng.random(shape) < 0.01] = 1
    lab[0, 0, 0] = 3  # a single voxel in a corner
    return lab


@pytest.mark.parametrize("cls", [0, 1, 2, 3])
def test_box_contains_drawn_class_and_stays_in_crop(cls):
    lab = _label_crop()
    size = (6, 8, 10)
    for seed in range(60):
        box = pic_box(lab, cls, size, np.random.default_rng(seed))
        assert len(box) == 3
        for sl, extent, s in zip(box, lab.shape, size, strict=True):
            assert 0 <= sl.start < sl.stop <= extent
            assert sl.step is None
            assert sl.stop - sl.start <= s
        assert (lab[box] == cls).any()
    # The single corner voxel: the box is clipped at the border, shrinking to [0, ceil(s/2)).
    box = pic_box(lab, 3, size, np.random.default_rng(0))
    assert box == (slice(0, 3), slice(0, 4), slice(0, 5))


def test_box_centres_on_a_voxel_of_the_class_uniformly():
    lab = np.zeros((5, 5, 5), dtype=np.int64)
    lab[1, 1, 1] = 1
    lab[3, 3, 3] = 1
    centres = []
    for seed in range(200):
        box = pic_box(lab, 1, (1, 1, 1), np.random.default_rng(seed))
        centres.append(tuple(s.start for s in box))
    assert set(centres) == {(1, 1, 1), (3, 3, 3)}
    assert 70 < centres.count((1, 1, 1)) < 130


def test_box_interior_has_full_size_and_whole_crop_when_too_big():
    lab = np.zeros((20, 20, 20), dtype=np.int64)
    lab[10, 10, 10] = 1
    assert pic_box(lab, 1, (4, 5, 6), np.random.default_rng(0)) == (slice(8, 12), slice(8, 13), slice(7, 13))
    assert pic_box(lab, 1, (100, 100, 100), np.random.default_rng(0)) == (slice(0, 20),) * 3


def test_box_absent_class_raises():
    with pytest.raises(ValueError):
        pic_box(_label_crop(), 9, (4, 4, 4), np.random.default_rng(0))


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("channels", [True, False])
def test_mix_inside_outside(as_torch, channels):
    rng = np.random.default_rng(3)
    shape = (6, 7, 8)
    img_shape = (2, *shape) if channels else shape
    li, ui = rng.random(img_shape), rng.random(img_shape)
    ll, pl = rng.integers(0, 4, shape), rng.integers(0, 4, shape)
    if as_torch:
        li, ui, ll, pl = (torch.from_numpy(a) for a in (li, ui, ll, pl))
    copies = [a.copy() if isinstance(a, np.ndarray) else a.clone() for a in (li, ll, ui, pl)]
    box = (slice(1, 4), slice(2, 7), slice(0, 3))
    x, y, m = pic_mix(li, ll, ui, pl, box)
    for a, b in zip((li, ll, ui, pl), copies, strict=True):  # inputs untouched
        assert (np.asarray(a) == np.asarray(b)).all()
    x, y, m, li, ll, ui, pl = (np.asarray(a) for a in (x, y, m, li, ll, ui, pl))
    assert m.dtype == bool and m.shape == shape
    assert m.sum() == 3 * 5 * 3 and m[box].all()
    assert (y[m] == ll[m]).all() and (y[~m] == pl[~m]).all()
    assert (x[..., m] == li[..., m]).all() and (x[..., ~m] == ui[..., ~m]).all()
    assert x.shape == img_shape


def test_mix_returns_new_objects_of_input_type():
    li, ui = torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4)
    ll, pl = torch.zeros(4, 4, 4, dtype=torch.uint8), torch.full((4, 4, 4), 2)
    x, y, m = pic_mix(li, ll, ui, pl, (slice(0, 2),) * 3)
    assert isinstance(x, torch.Tensor) and x.data_ptr() != ui.data_ptr()
    assert y.dtype == pl.dtype and m.dtype == torch.bool
    assert int(y.sum()) == 2 * (64 - 8)


def test_settings_and_box_size():
    assert box_size_for((64, 128, 128), PicSettings().box_fraction) == (32, 64, 64)
    assert box_size_for((3, 3, 3), (0.1, 0.5, 1.0)) == (1, 2, 3)
    with pytest.raises(ValueError):
        PicSettings(box_fraction=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError):
        PicSettings(eta=-1)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (8, 10, 12)
    lab = torch.stack([torch.from_numpy(_label_crop(shape, s)) for s in range(2)])
    lab[1][lab[1] == 3] = 0  # labeled crop 1 has no class 3
    li = torch.rand(2, 1, *shape, generator=g)
    ui = torch.rand(3, 1, *shape, generator=g) + 10.0
    pl = torch.randint(0, 4, (3, *shape), generator=g)
    return li, lab, ui, pl


def test_batch_pairs_mixes_and_is_deterministic():
    li, ll, ui, pl = _batch()
    settings = PicSettings()
    out1 = pic_batch(li, ll, ui, pl, COUNTS, 0, 300, settings, np.random.default_rng(7))
    out2 = pic_batch(li, ll, ui, pl, COUNTS, 0, 300, settings, np.random.default_rng(7))
    x, y, m, drawn = out1
    assert x.shape == ui.shape and y.shape == pl.shape and m.shape == pl.shape and m.dtype == torch.bool
    assert len(drawn) == 3
    for a, b in zip(out1[:3], out2[:3], strict=True):
        assert torch.equal(a, b)
    assert drawn == out2[3]
    for i in range(3):
        j = i % 2
        mi = m[i]
        assert mi.any()
        assert torch.equal(y[i][mi], ll[j][mi]) and torch.equal(y[i][~mi], pl[i][~mi])
        assert torch.equal(x[i, 0][mi], li[j, 0][mi]) and torch.equal(x[i, 0][~mi], ui[i, 0][~mi])
        assert (ll[j][mi] == drawn[i]).any()  # the box holds a voxel of the drawn class
        assert drawn[i] in set(torch.unique(ll[j]).tolist())


def test_batch_redraws_classes_absent_from_the_paired_crop():
    li, ll, ui, pl = _batch()
    # Balanced at E = 0 with γ = 2 → class 3 has P ≈ 0.99; crop 1 (paired with sample 1) has no 3.
    settings = PicSettings(gamma=2.0)
    seen0, seen1 = [], []
    for seed in range(40):
        _, _, _, drawn = pic_batch(li, ll, ui, pl, COUNTS, 0, 300, settings, np.random.default_rng(seed))
        seen0.append(drawn[0])
        seen1.append(drawn[1])
    assert seen0.count(3) >= 35
    assert 3 not in seen1


def test_batch_disabled_returns_unmixed():
    li, ll, ui, pl = _batch()
    x, y, m, drawn = pic_batch(li, ll, ui, pl, COUNTS, 0, 300, PicSettings(enabled=False), np.random.default_rng(0))
    assert torch.equal(x, ui) and torch.equal(y, pl) and not m.any() and drawn == [-1, -1, -1]
