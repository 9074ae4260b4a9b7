"""Per-case metrics: Dice, directed ASD and ASSD against medpy itself (DHC's evaluation loop), hand values and
brute force, DHC/strict absent-class rules, spacing, summaries over cases and runs, input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from scipy import ndimage as ndi

from stage2_train.evaluate.metrics import CaseMetrics, case_metrics, mean_std_over_runs, summarize


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


def brute_distances(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> tuple[float, float]:
    """(ASD, ASSD) by all pairwise distances between surface voxels: the mean over a's surface of the
    distance to b's (directed), and the mean over both directed sets pooled (symmetric)."""
    sa = surface_coords(a) * np.asarray(spacing)
    sb = surface_coords(b) * np.asarray(spacing)
    dist = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    a_to_b, b_to_a = dist.min(axis=1), dist.min(axis=0)
    return a_to_b.mean(), np.concatenate([a_to_b, b_to_a]).mean()


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
    assert m.asd[0] == pytest.approx(164 / 488, rel=1e-12)  # the same both ways here, so ASSD too
    assert m.assd[0] == pytest.approx(164 / 488, rel=1e-12)


def test_asd_of_concentric_cubes_is_directed_and_assd_pools_both_directions():
    # Inner cube side 6 (152 surface voxels), each exactly 2 voxels from the outer surface; outer cube
    # side 10 (488 surface voxels) at per-axis offsets max(7 - c, 0, c - 12) from the inner box.
    outer_cube = box(SHAPE, (5, 5, 5), (15, 15, 15))
    inner_cube = box(SHAPE, (7, 7, 7), (13, 13, 13))
    outer = surface_coords(outer_cube.astype(bool))
    gap = np.maximum(np.maximum(7 - outer, 0), outer - 12)
    outer_to_inner = np.sqrt((gap**2).sum(1))
    pooled = (outer_to_inner.sum() + 2.0 * 152) / (outer_to_inner.size + 152)
    assert outer_to_inner.size == 488

    big = case_metrics(outer_cube, inner_cube, num_classes=2)  # prediction the outer cube
    small = case_metrics(inner_cube, outer_cube, num_classes=2)  # prediction the inner cube
    assert big.asd[0] == pytest.approx(outer_to_inner.mean(), rel=1e-12)  # about 2.56
    assert small.asd[0] == pytest.approx(2.0, rel=1e-12)
    assert big.assd[0] == pytest.approx(pooled, rel=1e-12) and small.assd[0] == pytest.approx(pooled, rel=1e-12)
    assert abs(big.assd[0] - 0.5 * (outer_to_inner.mean() + 2.0)) > 0.05  # pooled, not the mean of the two means
    assert big.dice[0] == pytest.approx(200 * 216 / (1000 + 216))


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
        asd, assd = brute_distances(a, b, spacing or (1, 1, 1))
        assert m.dice[c - 1] == pytest.approx(200 * (a & b).sum() / (a.sum() + b.sum()), rel=1e-12)
        assert m.asd[c - 1] == pytest.approx(asd, rel=1e-9)
        assert m.assd[c - 1] == pytest.approx(assd, rel=1e-9)
    assert m.asd_unit == ("voxel" if spacing is None else "mm")


# ----------------------------------------------------------------------------------------------
# against medpy itself, as DHC's evaluate_Ntimes.py calls it
# ----------------------------------------------------------------------------------------------

MEDPY_SHAPE = (24, 40, 36)
MEDPY_CLASSES = 8  # foreground 1..7
# Per class: present in (pred, label). Classes 1-4 in both, 5 in the label only, 6 in the prediction only,
# 7 in neither.
MEDPY_PRESENT = [(True, True)] * 4 + [(False, True), (True, False), (False, False)]


def ellipsoid(rng: np.random.Generator, shape, centre=None, radii=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random axis-aligned ellipsoid mask (and its centre and radii)."""
    centre = rng.uniform(4, np.array(shape) - 4) if centre is None else centre
    radii = rng.uniform(2.5, 7.0, size=3) if radii is None else radii
    grid = np.indices(shape, dtype=np.float64)
    inside = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0
    return inside, centre, radii


def blob(rng: np.random.Generator, shape, fraction: float) -> np.ndarray:
    """An irregular mask: the top ``fraction`` of smoothed noise, inside a random sub-box."""
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    lo = rng.integers(0, np.array(shape) // 2)
    window = np.zeros(shape, bool)
    window[tuple(slice(a, a + n // 2 + 2) for a, n in zip(lo, shape, strict=True))] = True
    return window & (noise > np.quantile(noise[window], 1.0 - fraction))


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A multi-class (pred, label) pair: ellipsoids whose prediction is moved and resized, irregular blobs
    whose prediction is an independent blob over the same region, and a class touching the volume border."""
    pred = np.zeros(MEDPY_SHAPE, np.int64)
    label = np.zeros(MEDPY_SHAPE, np.int64)
    for c, (in_pred, in_label) in enumerate(MEDPY_PRESENT, start=1):
        if c in (2, 4):
            a, b = blob(rng, MEDPY_SHAPE, 0.25), blob(rng, MEDPY_SHAPE, 0.25)
            b |= a & (rng.random(MEDPY_SHAPE) < 0.5)  # partial overlap
        elif c == 3:  # a slab on the volume border; the prediction is thinner and ragged
            a = np.zeros(MEDPY_SHAPE, bool)
            b = np.zeros(MEDPY_SHAPE, bool)
            b[:, :, :5] = True
            a[2:20, 3:30, :3] = rng.random((18, 27, 3)) < 0.9
        else:
            b, centre, radii = ellipsoid(rng, MEDPY_SHAPE)
            a, _, _ = ellipsoid(rng, MEDPY_SHAPE, centre + rng.normal(0, 1.5, 3), radii * rng.uniform(0.6, 1.1, 3))
        if in_pred:
            pred[a & (pred == 0)] = c
        if in_label:
            label[b & (label == 0)] = c
    return pred, label


def dhc_reference(pred: np.ndarray, label: np.ndarray, num_cls: int) -> np.ndarray:
    """DHC's per-case loop with medpy: a (num_cls - 1, 2) array of (Dice, ASD)."""
    values = np.zeros((num_cls - 1, 2))
    for i in range(1, num_cls):
        pred_i, label_i = pred == i, label == i
        if pred_i.sum() > 0 and label_i.sum() > 0:
            values[i - 1] = (medpy_binary.dc(pred_i, label_i) * 100, medpy_binary.asd(pred_i, label_i))
        elif pred_i.sum() > 0 or label_i.sum() > 0:
            values[i - 1] = (0, 128)
        else:
            values[i - 1] = (1, 0)
    return values


@pytest.fixture(scope="module")
def medpy_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(2024)
    return [random_case(rng) for _ in range(3)]


def test_random_cases_cover_every_presence_pattern(medpy_cases):
    for pred, label in medpy_cases:
        m = case_metrics(pred, label, MEDPY_CLASSES)
        assert m.present.tolist() == [list(p) for p in MEDPY_PRESENT]
        # Both directions differ clearly for some class, so a symmetric distance cannot pass for ASD.
        gaps = [abs(medpy_binary.asd(pred == c, label == c) - medpy_binary.asd(label == c, pred == c))
                for c in (1, 2, 3, 4)]
        assert max(gaps) > 0.2


def test_dice_and_asd_equal_dhc_with_medpy(medpy_cases):
    reference = np.stack([dhc_reference(pred, label, MEDPY_CLASSES) for pred, label in medpy_cases])
    ours = [case_metrics(pred, label, MEDPY_CLASSES, convention="dhc") for pred, label in medpy_cases]
    dice = np.stack([m.dice for m in ours])
    asd = np.stack([m.asd for m in ours])
    np.testing.assert_allclose(dice, reference[..., 0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(asd, reference[..., 1], rtol=0, atol=1e-6)
    # medpy's own steps in float64 on the cropped box: the same numbers to the last digit.
    np.testing.assert_array_equal(dice, reference[..., 0])
    np.testing.assert_array_equal(asd, reference[..., 1])
    # DHC's means: over cases per class, then over classes.
    per_class = np.mean(reference, axis=0)
    overall = np.mean(per_class, axis=0)
    s = summarize(ours)
    assert s["dice"] == per_class[:, 0].tolist() and s["asd"] == per_class[:, 1].tolist()
    assert (s["mean_dice"], s["mean_asd"]) == (overall[0], overall[1])


def test_assd_equals_medpy_assd(medpy_cases):
    for pred, label in medpy_cases:
        m = case_metrics(pred, label, MEDPY_CLASSES)
        for c in (1, 2, 3, 4):
            a, b = pred == c, label == c
            assert m.assd[c - 1] == pytest.approx(medpy_binary.assd(a, b), rel=0, abs=1e-6)
            assert m.assd[c - 1] == medpy_binary.assd(a, b)
            assert m.assd[c - 1] != pytest.approx(m.asd[c - 1], rel=1e-6)  # pooled both ways, not directed


def test_spacing_equals_medpy_voxelspacing(medpy_cases):
    spacing = (2.5, 0.8, 1.3)
    for pred, label in medpy_cases:
        m = case_metrics(pred, label, MEDPY_CLASSES, spacing=spacing)
        assert m.asd_unit == "mm"
        for c in (1, 2, 3, 4):
            a, b = pred == c, label == c
            assert m.asd[c - 1] == pytest.approx(medpy_binary.asd(a, b, voxelspacing=spacing), rel=1e-12)
            assert m.assd[c - 1] == pytest.approx(medpy_binary.assd(a, b, voxelspacing=spacing), rel=1e-12)
        assert np.isnan(m.asd[4:6]).all() and m.asd[6] == 0.0  # one side only: no distance in mm


def test_cropping_far_from_each_other_and_at_the_border():
    pred = box(SHAPE, (0, 0, 0), (3, 4, 2))
    label = box(SHAPE, (15, 16, 17), (20, 20, 20))
    m = case_metrics(pred, label, num_classes=2)
    a, b = pred.astype(bool), label.astype(bool)
    assert m.asd[0] == medpy_binary.asd(a, b) and m.assd[0] == medpy_binary.assd(a, b)  # crop changes no digit
    assert (m.asd[0], m.assd[0]) == pytest.approx(brute_distances(a, b), rel=1e-12)
    assert m.dice[0] == 0.0


def test_dhc_rules_for_absent_classes():
    label = box(SHAPE, (2, 2, 2), (6, 6, 6), value=1)
    box(SHAPE, (10, 10, 10), (14, 14, 14), value=2, out=label)  # class 2: label only
    pred = box(SHAPE, (2, 2, 2), (6, 6, 6), value=1)
    box(SHAPE, (10, 2, 2), (14, 6, 6), value=3, out=pred)  # class 3: pred only; class 4: neither
    m = case_metrics(pred, label, num_classes=5)
    assert m.dice.tolist() == [100.0, 0.0, 0.0, 1.0]
    assert m.asd.tolist() == [0.0, 128.0, 128.0, 0.0]
    assert m.assd.tolist() == [0.0, 128.0, 128.0, 0.0]
    assert m.present.tolist() == [[True, True], [False, True], [True, False], [False, False]]

    mm = case_metrics(pred, label, num_classes=5, spacing=(2.0, 1.0, 1.0))
    assert mm.dice.tolist() == [100.0, 0.0, 0.0, 1.0]
    for values in (mm.asd, mm.assd):
        assert values[0] == 0.0 and math.isnan(values[1]) and math.isnan(values[2]) and values[3] == 0.0


def test_strict_rules_and_nan_excluded_from_means():
    label = box(SHAPE, (2, 2, 2), (6, 6, 6), value=1)
    box(SHAPE, (10, 10, 10), (14, 14, 14), value=2, out=label)
    pred = box(SHAPE, (2, 2, 3), (6, 6, 7), value=1)  # Dice 75
    m = case_metrics(pred, label, num_classes=4, convention="strict")
    assert m.dice[0] == pytest.approx(75.0) and m.dice[1] == 0.0 and math.isnan(m.dice[2])
    assert m.asd[0] > 0 and math.isnan(m.asd[1]) and math.isnan(m.asd[2])
    assert m.assd[0] > 0 and math.isnan(m.assd[1]) and math.isnan(m.assd[2])

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
        np.testing.assert_array_equal(other.assd, ref.assd)


def test_case_metrics_json_round_trip_is_strict_json():
    m = CaseMetrics(dice=[80.0, math.nan], asd=[1.5, math.nan], asd_unit="mm", present=[[1, 1], [0, 0]],
                    assd=[1.25, math.nan])
    text = json.dumps(m.to_json(), allow_nan=False)
    back = CaseMetrics.from_json(json.loads(text))
    np.testing.assert_array_equal(back.dice, m.dice)
    np.testing.assert_array_equal(back.asd, m.asd)
    np.testing.assert_array_equal(back.assd, m.assd)
    assert back.present.tolist() == [[True, True], [False, False]] and back.asd_unit == "mm"
    with pytest.raises(ValueError):
        m.dice[0] = 1.0  # read-only
    with pytest.raises(ValueError):
        m.assd[0] = 1.0
    older = {k: v for k, v in m.to_json().items() if k != "assd"}  # results written before ASSD existed
    assert np.isnan(CaseMetrics.from_json(older).assd).all()


def case(dice, asd, unit="voxel", assd=None) -> CaseMetrics:
    return CaseMetrics(dice=dice, asd=asd, asd_unit=unit, present=np.ones((len(dice), 2), bool), assd=assd)


def test_summarize_hand_numbers():
    s = summarize([case([80.0, 60.0], [1.0, 4.0], assd=[2.0, 5.0]),
                   case([90.0, 40.0], [3.0, 128.0], assd=[4.0, 128.0])])
    assert s["dice"] == pytest.approx([85.0, 50.0])
    assert s["asd"] == pytest.approx([2.0, 66.0])
    assert s["assd"] == pytest.approx([3.0, 66.5])
    assert s["mean_dice"] == pytest.approx(67.5)
    assert s["mean_asd"] == pytest.approx(34.0)
    assert s["mean_assd"] == pytest.approx(34.75)
    assert s["asd_unit"] == "voxel"


def test_summarize_equals_dhc_means_to_the_last_digit():
    # DHC: values (cases, classes, 2); np.mean over cases, then over classes, both along an outer axis
    # (added in order). With 13 classes a pairwise 1-D sum differs in the last bits now and then.
    pairwise_differs = False
    for seed in range(10):
        rng = np.random.default_rng(seed)
        values = np.stack([rng.uniform(0, 100, (6, 13)), rng.uniform(0, 30, (6, 13))], axis=-1)
        values[0, :4] = (0, 128)
        values[1, 4:6] = (1, 0)
        per_class = np.mean(values, axis=0)
        overall = np.mean(per_class, axis=0)
        s = summarize([case(v[:, 0], v[:, 1]) for v in values])
        assert s["dice"] == per_class[:, 0].tolist() and s["asd"] == per_class[:, 1].tolist()
        assert (s["mean_dice"], s["mean_asd"]) == (overall[0], overall[1])
        pairwise_differs |= bool((np.ascontiguousarray(per_class.T).sum(axis=1) / 13 != overall).any())
        # Over runs: DHC's std of the runs' means over cases and classes, np.std (ddof 0).
        runs = [summarize([case(v[:, 0], v[:, 1]) for v in values[i : i + 2]]) for i in (0, 2, 4)]
        fold_means = np.stack([np.mean(np.mean(values[i : i + 2], axis=0), axis=0) for i in (0, 2, 4)])
        r = mean_std_over_runs(runs)
        assert r["mean_dice"] == (np.mean(fold_means[:, 0]), np.std(fold_means[:, 0]))
        assert r["mean_asd"] == (np.mean(fold_means[:, 1]), np.std(fold_means[:, 1]))
    assert pairwise_differs  # the check above can tell the two summation orders apart


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
    assert "assd_mean" not in r and "mean_assd" not in r  # summaries written before ASSD existed

    with_assd = [{**run, "assd": [a + 1 for a in run["asd"]], "mean_assd": run["mean_asd"] + 1} for run in runs]
    r = mean_std_over_runs(with_assd)
    assert r["assd_mean"] == pytest.approx([3.0, 3.0])
    assert r["assd_std"] == pytest.approx([math.sqrt(2 / 3), 0.0])
    assert r["mean_assd"] == pytest.approx((3.0, math.sqrt(0.5**2 * 2 / 3)))


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
