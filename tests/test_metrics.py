"""Per-case metrics: Dice and medpy-style ASD against hand values and brute force, DHC/strict absent-class
rules, spacing, summaries over cases and runs, input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stage2_train.metrics import CaseMetrics, case_metrics, mean_std_over_runs, summarize


def box(shape, lo, hi, value=1, out=None) -> np.ndarray:
    """Label volume (or ``out`` updated) with ``value`` on the box ``[lo, hi)``."""
    vol = np.zeros(shape, dtype=np.int64) if out is None else out
    vol[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = value
    return vol


def surface_coords(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (outside the volume counts as outside)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner).astype(np.float64)


def brute_asd(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """medpy ``asd`` by all pairwise distances between surface voxels: mean of the two directed means."""
    sa = surface_coords(a) * np.asarray(spacing)
    sb = surface_coords(b) * np.asarray(spacing)
    dist = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return 0.5 * (dist.min(axis=1).mean() + dist.min(axis=0).mean())


SHAPE = (20, 20, 20)


def test_dice_of_offset_cubes_is_exact():
    pred = box(SHAPE, (5, 5, 5), (15, 15, 15))
    label = box(SHAPE, (5, 5, 7), (15, 15, 17))  # shifted 2 voxels along x: overlap 10 * 10 * 8
    m = case_metrics(pred, label, num_classes=2)
    assert m.dice[0] == pytest.approx(80.0, abs=1e-12)
    assert m.present.tolist() == [[True, True]]


def test_asd_of_cube_shifted_by_one_voxel_matches_hand_value():
    # 10^3 cube: 488 surface voxels. Shifting by 1 along x, the leading face (100 voxels) and the
    # interior of the trailing face (8 x 8 = 64) lie 1 voxel from the other surface; the rest are on it.
    pred = box(SHAPE, (5, 5, 5), (15, 15, 15))
    label = box(SHAPE, (5, 5, 6), (15, 15, 16))
    m = case_metrics(pred, label, num_classes=2)
    assert m.asd_unit == "voxel"
    assert m.asd[0] == pytest.approx(164 / 488, rel=1e-6)


def test_asd_of_concentric_cubes_is_mean_of_directed_means_not_pooled():
    # Inner cube side 6 (152 surface voxels), each exactly 2 voxels from the outer surface; outer cube
    # side 10 (488 surface voxels) at per-axis offsets max(7 - c, 0, c - 12) from the inner box.
    pred = box(SHAPE, (5, 5, 5), (15, 15, 15))
    label = box(SHAPE, (7, 7, 7), (13, 13, 13))
    outer = surface_coords(pred.astype(bool))
    gap = np.maximum(np.maximum(7 - outer, 0), outer - 12)
    outer_to_inner = np.sqrt((gap**2).sum(1))
    expected = 0.5 * (outer_to_inner.mean() + 2.0)
    pooled = (outer_to_inner.sum() + 2.0 * 152) / (outer_to_inner.size + 152)  # MONAI symmetric=True
    m = case_metrics(pred, label, num_classes=2)
    assert outer_to_inner.size == 488
    assert m.asd[0] == pytest.approx(expected, rel=1e-6)
    assert m.asd[0] == pytest.approx(brute_asd(pred.astype(bool), label.astype(bool)), rel=1e-6)
    assert abs(m.asd[0] - pooled) > 0.05
    assert m.dice[0] == pytest.approx(200 * 216 / (1000 + 216))


@pytest.mark.parametrize("spacing", [None, (2.5, 0.8, 1.3)])
def test_multiclass_random_blobs_match_brute_force(spacing):
    rng = np.random.default_rng(7)
    shape = (9, 12, 11)
    pred = rng.integers(0, 4, size=shape)
    label = rng.integers(0, 4, size=shape)
    label[:, :6] = 3  # a large region touching the volume border
    m = case_metrics(pred, label, num_classes=4, spacing=spacing)
    for c in (1, 2, 3):
        a, b = pred == c, label == c
        assert m.dice[c - 1] == pytest.approx(200 * (a & b).sum() / (a.sum() + b.sum()), rel=1e-12)
        assert m.asd[c - 1] == pytest.approx(brute_asd(a, b, spacing or (1, 1, 1)), rel=1e-6)
    assert m.asd_unit == ("voxel" if spacing is None else "mm")


def test_cropping_far_from_each_other_and_at_the_border():
    pred = box(SHAPE, (0, 0, 0), (3, 4, 2))
    label = box(SHAPE, (15, 16, 17), (20, 20, 20))
    m = case_metrics(pred, label, num_classes=2)
    assert m.asd[0] == pytest.approx(brute_asd(pred.astype(bool), label.astype(bool)), rel=1e-6)
    assert m.dice[0] == 0.0


def test_dhc_rules_for_absent_classes():
    label = box(SHAPE, (2, 2, 2), (6, 6, 6), value=1)
    box(SHAPE, (10, 10, 10), (14, 14, 14), value=2, out=label)  # class 2: label only
    pred = box(SHAPE, (2, 2, 2), (6, 6, 6), value=1)
    box(SHAPE, (10, 2, 2), (14, 6, 6), value=3, out=pred)  # class 3: pred only; class 4: neither
    m = case_metrics(pred, label, num_classes=5)
    assert m.dice.tolist() == [100.0, 0.0, 0.0, 1.0]
    assert m.asd.tolist() == [0.0, 128.0, 128.0, 0.0]
    assert m.present.tolist() == [[True, True], [False, True], [True, False], [False, False]]

    mm = case_metrics(pred, label, num_classes=5, spacing=(2.0, 1.0, 1.0))
    assert mm.dice.tolist() == [100.0, 0.0, 0.0, 1.0]
    assert mm.asd[0] == 0.0 and math.isnan(mm.asd[1]) and math.isnan(mm.asd[2]) and mm.asd[3] == 0.0


def test_strict_rules_and_nan_excluded_from_means():
    label = box(SHAPE, (2, 2, 2), (6, 6, 6), value=1)
    box(SHAPE, (10, 10, 10), (14, 14, 14), value=2, out=label)
    pred = box(SHAPE, (2, 2, 3), (6, 6, 7), value=1)  # Dice 75
    m = case_metrics(pred, label, num_classes=4, convention="strict")
    assert m.dice[0] == pytest.approx(75.0) and m.dice[1] == 0.0 and math.isnan(m.dice[2])
    assert m.asd[0] > 0 and math.isnan(m.asd[1]) and math.isnan(m.asd[2])

    s = summarize([m])
    assert s["dice"][:2] == pytest.approx([75.0, 0.0]) and math.isnan(s["dice"][2])
    assert s["mean_dice"] == pytest.approx(37.5)  # NaN class skipped
    assert s["mean_asd"] == pytest.approx(m.asd[0])  # only class 1 has a defined ASD
    assert math.isnan(s["asd"][1]) and math.isnan(s["asd"][2])


def test_spacing_scales_asd_to_mm():
    pred = box(SHAPE, (4, 4, 4), (5, 5, 5))  # one voxel vs the one next to it
    along_z = box(SHAPE, (5, 4, 4), (6, 5, 5))
    along_x = box(SHAPE, (4, 4, 5), (5, 5, 6))
    assert case_metrics(pred, along_z, 2).asd[0] == pytest.approx(1.0)
    assert case_metrics(pred, along_z, 2, spacing=(2.5, 1.0, 0.7)).asd[0] == pytest.approx(2.5)
    assert case_metrics(pred, along_x, 2, spacing=(2.5, 1.0, 0.7)).asd[0] == pytest.approx(0.7)
    cube = box(SHAPE, (5, 5, 5), (15, 15, 15))
    shifted = box(SHAPE, (5, 5, 6), (15, 15, 16))
    iso = case_metrics(cube, shifted, 2, spacing=(1.5, 1.5, 1.5))
    assert iso.asd_unit == "mm" and iso.asd[0] == pytest.approx(1.5 * 164 / 488, rel=1e-6)


def test_torch_and_float_inputs_give_the_same_numbers():
    pred = box(SHAPE, (5, 5, 5), (15, 15, 15))
    label = box(SHAPE, (7, 7, 7), (13, 13, 13))
    ref = case_metrics(pred, label, 2)
    t = case_metrics(torch.from_numpy(pred).to(torch.uint8), torch.from_numpy(label), 2)
    f = case_metrics(pred.astype(np.float32), label.astype(np.float64), 2)
    for other in (t, f):
        np.testing.assert_array_equal(other.dice, ref.dice)
        np.testing.assert_array_equal(other.asd, ref.asd)


def test_case_metrics_json_round_trip_is_strict_json():
    m = CaseMetrics(dice=[80.0, math.nan], asd=[1.5, math.nan], asd_unit="mm", present=[[1, 1], [0, 0]])
    text = json.dumps(m.to_json(), allow_nan=False)
    back = CaseMetrics.from_json(json.loads(text))
    np.testing.assert_array_equal(back.dice, m.dice)
    np.testing.assert_array_equal(back.asd, m.asd)
    assert back.present.tolist() == [[True, True], [False, False]] and back.asd_unit == "mm"
    with pytest.raises(ValueError):
        m.dice[0] = 1.0  # read-only


def case(dice, asd, unit="voxel") -> CaseMetrics:
    return CaseMetrics(dice=dice, asd=asd, asd_unit=unit, present=np.ones((len(dice), 2), bool))


def test_summarize_hand_numbers():
    s = summarize([case([80.0, 60.0], [1.0, 4.0]), case([90.0, 40.0], [3.0, 128.0])])
    assert s["dice"] == pytest.approx([85.0, 50.0])
    assert s["asd"] == pytest.approx([2.0, 66.0])
    assert s["mean_dice"] == pytest.approx(67.5)
    assert s["mean_asd"] == pytest.approx(34.0)
    assert s["asd_unit"] == "voxel"


def test_mean_std_over_runs_uses_population_std():
    runs = [
        {"dice": [80.0, 60.0], "asd": [1.0, 2.0], "mean_dice": 70.0, "mean_asd": 1.5},
        {"dice": [90.0, 70.0], "asd": [2.0, 2.0], "mean_dice": 80.0, "mean_asd": 2.0},
        {"dice": [100.0, 80.0], "asd": [3.0, 2.0], "mean_dice": 90.0, "mean_asd": 2.5},
    ]
    r = mean_std_over_runs(runs)
    sd = math.sqrt(200 / 3)  # ddof=0 of (-10, 0, 10)
    assert r["dice_mean"] == pytest.approx([90.0, 70.0])
    assert r["dice_std"] == pytest.approx([sd, sd])
    assert r["asd_mean"] == pytest.approx([2.0, 2.0])
    assert r["asd_std"] == pytest.approx([math.sqrt(2 / 3), 0.0])
    assert r["mean_dice"] == pytest.approx((80.0, sd))
    assert r["mean_asd"] == pytest.approx((2.0, math.sqrt(0.5**2 * 2 / 3)))


def test_summaries_refuse_mixed_units_and_empty_input():
    with pytest.raises(ValueError, match="mixed ASD units"):
        summarize([case([1.0], [1.0], "voxel"), case([1.0], [1.0], "mm")])
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    with pytest.raises(ValueError, match="at least one"):
        mean_std_over_runs([])


@pytest.mark.parametrize(
    ("pred_shape", "label_shape", "kwargs", "message"),
    [
        ((4, 5, 6), (4, 5, 7), {}, "shapes differ"),
        ((4, 5), (4, 5), {}, "3D"),
        ((1, 4, 5, 6), (1, 4, 5, 6), {}, "3D"),
        ((4, 5, 6), (4, 5, 6), {"convention": "medpy"}, "unknown convention"),
        ((4, 5, 6), (4, 5, 6), {"spacing": (1.0, 1.0)}, "spacing"),
        ((4, 5, 6), (4, 5, 6), {"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ((4, 5, 6), (4, 5, 6), {"spacing": (1.0, math.nan, 1.0)}, "spacing"),
    ],
)
def test_bad_inputs_raise(pred_shape, label_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        case_metrics(np.zeros(pred_shape, np.int64), np.zeros(label_shape, np.int64), 3, **kwargs)


def test_out_of_range_or_non_integral_labels_raise():
    ok = np.zeros((4, 5, 6), np.int64)
    with pytest.raises(ValueError, match=r"label labels must lie in 0\.\.2"):
        case_metrics(ok, ok + 3, 3)
    with pytest.raises(ValueError, match=r"pred labels must lie in 0\.\.2"):
        case_metrics(ok - 1, ok, 3)
    with pytest.raises(ValueError, match="non-integral"):
        case_metrics(ok + 0.5, ok, 3)
    with pytest.raises(ValueError, match="num_classes"):
        case_metrics(ok, ok, 1)
