"""Per-case segmentation metrics (Dice, ASD, ASSD) with the DHC evaluation conventions, and their summaries.

Conventions follow the peer code (DHC ``evaluate_Ntimes.py``): for each test case and each foreground
class ``i = 1 .. num_classes - 1``,

- ``pred`` and ``label`` both contain ``i``: Dice = 100 x medpy ``dc(pred == i, label == i)``, ASD =
  medpy ``asd(pred == i, label == i)`` (directed, see below);
- exactly one contains ``i``: Dice 0, ASD 128 (``convention="dhc"``);
- neither contains ``i``: Dice 1 and ASD 0 (``convention="dhc"``). The 1 is on the 0-100 scale: a slip in
  DHC, kept on purpose so that numbers compare with the paper.

Then the mean over cases per class (:func:`summarize`), the mean over classes, and the mean and std over
runs (:func:`mean_std_over_runs`); the sums add the values in order, as DHC's ``np.mean`` over an outer
axis does, so the means too equal DHC's to the last digit.

``convention="strict"`` instead marks undefined values as NaN, which the means skip: neither contains
``i`` -> Dice NaN and ASD NaN; exactly one contains ``i`` -> Dice 0.0 and ASD NaN (no surface to measure
a distance to).

Units and shapes:
    - ``pred`` and ``label``: integer label volumes of shape (D, H, W) (numpy or torch), values in
      ``0 .. num_classes - 1``, 0 the background. Float volumes are accepted if every value is integral.
    - Dice: percent (0-100), float64 array of shape (C-1,); entry ``k`` is class ``k + 1``.
    - ASD and ASSD: float64 arrays of shape (C-1,), in voxels (``spacing=None``, ``asd_unit="voxel"``)
      or in mm (``spacing=(sz, sy, sx)`` the voxel size along D, H, W; ``asd_unit="mm"``). The DHC
      penalty of 128 is a voxel count and means nothing in mm: with a spacing, ``convention="dhc"``
      gives NaN (skipped by the means) when exactly one of pred / label contains the class.

Surface distances, as medpy 0.5.2 (``medpy.metric.binary``) computes them: the surface of a mask is the
set of its voxels removed by one binary erosion with the 6-connected structure
(``generate_binary_structure(3, 1)``; voxels on the volume border count as surface), and ``d(p, S)`` is
the exact Euclidean distance (scaled by the spacing) from voxel ``p`` to the nearest voxel of surface
``S``, from ``scipy.ndimage.distance_transform_edt``.

- **ASD** (medpy ``asd(pred, label)``, what DHC reports) is *directed*: the mean over the prediction's
  surface voxels of their distance to the label's surface, ``mean_{p in S_pred} d(p, S_label)``. It is
  not symmetric: ``asd(label, pred)`` differs in general.
- **ASSD**, the average symmetric surface distance (medpy 0.5.2 ``assd``), pools both directed sets:
  ``(sum_{p in S_pred} d(p, S_label) + sum_{g in S_label} d(g, S_pred)) / (|S_pred| + |S_label|)``.
  (medpy 0.4 and older averaged the two directed means instead; the two differ when the surfaces have
  different voxel counts.) ASSD follows the same absent-class rules as ASD; it is not in the paper.

The computation is medpy's, step for step, in float64, so values agree with medpy to the last digit.
Each class is cropped to the bounding box of ``pred | label`` (1-voxel margin) first: the erosion of
every mask voxel sees the same neighbours as in the full volume, and every surface voxel lies in the
box, so the distances are the same numbers in the same order.

Failure modes: :class:`ValueError` (one line) for a shape mismatch, a non-3D volume, non-integral or
out-of-range labels, ``num_classes < 2``, an unknown convention, a spacing that is not three positive
finite numbers, and for summaries of an empty list, of differing class counts or of mixed ASD units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from scipy import ndimage as ndi

__all__ = [
    "ABSENT_ASD",
    "CONVENTIONS",
    "Convention",
    "CaseMetrics",
    "case_metrics",
    "mean_std_over_runs",
    "summarize",
]

Convention = Literal["dhc", "strict"]
CONVENTIONS: tuple[Convention, ...] = get_args(Convention)
ABSENT_ASD = 128.0  # DHC's ASD (voxels) when exactly one of pred / label contains the class
_SURFACE_STRUCTURE = ndi.generate_binary_structure(3, 1)  # medpy's default connectivity 1 (6-connected)


@dataclass(frozen=True, eq=False)
class CaseMetrics:
    """Metrics of one case for the foreground classes ``1 .. C-1`` (entry ``k`` is class ``k + 1``).

    Attributes:
        dice: Dice in percent, float64 array of shape (C-1,); NaN where undefined (strict convention).
        asd: average surface distance, directed from the prediction's surface to the label's (medpy
            ``asd(pred, label)``), float64 array of shape (C-1,), in ``asd_unit``; NaN where undefined.
        asd_unit: ``"voxel"`` or ``"mm"``, the unit of ``asd`` and ``assd``.
        present: bool array of shape (C-1, 2): whether the class occurs in (pred, label).
        assd: average symmetric surface distance (medpy 0.5.2 ``assd``), float64 array of shape (C-1,),
            in ``asd_unit``; NaN where undefined. ``None`` (e.g. results written before ASSD existed):
            all NaN.

    The arrays are stored as read-only copies.
    """

    dice: np.ndarray
    asd: np.ndarray
    asd_unit: str
    present: np.ndarray
    assd: np.ndarray | None = None

    def __post_init__(self) -> None:
        dice = np.array(self.dice, dtype=np.float64)
        asd = np.array(self.asd, dtype=np.float64)
        assd = np.full(dice.shape, math.nan) if self.assd is None else np.array(self.assd, dtype=np.float64)
        present = np.array(self.present, dtype=bool)
        if dice.ndim != 1 or asd.shape != dice.shape or assd.shape != dice.shape or present.shape != (dice.size, 2):
            raise ValueError(
                f"CaseMetrics needs dice (K,), asd (K,), assd (K,), present (K, 2); got {dice.shape}, {asd.shape}, "
                f"{assd.shape}, {present.shape}"
            )
        if self.asd_unit not in ("voxel", "mm"):
            raise ValueError(f"asd_unit must be 'voxel' or 'mm', got {self.asd_unit!r}")
        for name, value in (("dice", dice), ("asd", asd), ("assd", assd), ("present", present)):
            value.flags.writeable = False
            object.__setattr__(self, name, value)

    @property
    def num_classes(self) -> int:
        """C, the number of classes background included."""
        return int(self.dice.size) + 1

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (plain lists; NaN written as ``None`` so the output is strict JSON)."""
        return {
            "dice": [_json_float(v) for v in self.dice],
            "asd": [_json_float(v) for v in self.asd],
            "assd": [_json_float(v) for v in self.assd],
            "asd_unit": self.asd_unit,
            "present": self.present.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseMetrics:
        """Inverse of :meth:`to_json` (``None`` read back as NaN; a missing ``assd``, as in results written
        before it existed, reads back as all NaN)."""
        return cls(
            dice=_from_json_floats(data["dice"]),
            asd=_from_json_floats(data["asd"]),
            asd_unit=data["asd_unit"],
            present=np.array(data["present"], dtype=bool).reshape(-1, 2),
            assd=None if data.get("assd") is None else _from_json_floats(data["assd"]),
        )


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    num_classes: int,
    convention: str = "dhc",
    spacing: Sequence[float] | None = None,
) -> CaseMetrics:
    """Dice (percent), ASD (directed, medpy ``asd(pred, label)``) and ASSD of one case, per foreground class.

    Args:
        pred: predicted label volume, shape (D, H, W), integer values in ``0 .. num_classes - 1``.
        label: ground-truth label volume, same shape and value range.
        num_classes: C, background included (C >= 2); metrics are returned for classes ``1 .. C-1``.
        convention: ``"dhc"`` (DHC's penalties: absent in both -> Dice 1, ASD 0; in exactly one ->
            Dice 0, ASD 128, or ASD NaN when ``spacing`` is given) or ``"strict"`` (absent in both ->
            Dice NaN, ASD NaN; in exactly one -> Dice 0, ASD NaN). ASSD follows the ASD rules.
        spacing: ``(sz, sy, sx)`` voxel size in mm along (D, H, W); ASD and ASSD are then in mm (medpy's
            ``voxelspacing``). ``None``: voxels.

    Returns:
        a :class:`CaseMetrics`.

    Raises:
        ValueError: on a shape mismatch, a non-3D volume, non-integral or out-of-range labels,
            ``num_classes < 2``, an unknown convention or a bad spacing.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    num_classes = int(num_classes)
    sampling = _check_spacing(spacing)
    p = _as_label_volume(pred, "pred", num_classes)
    g = _as_label_volume(label, "label", num_classes)
    if p.shape != g.shape:
        raise ValueError(f"pred and label shapes differ: {p.shape} vs {g.shape}")

    n_pred = np.bincount(p.ravel(), minlength=num_classes)
    n_label = np.bincount(g.ravel(), minlength=num_classes)
    n_both = np.bincount(g[p == g], minlength=num_classes)  # |pred == c & label == c| per class c
    boxes_pred = ndi.find_objects(p, max_label=num_classes - 1)
    boxes_label = ndi.find_objects(g, max_label=num_classes - 1)

    dhc = convention == "dhc"
    k = num_classes - 1
    dice = np.empty(k, dtype=np.float64)
    asd = np.empty(k, dtype=np.float64)
    assd = np.empty(k, dtype=np.float64)
    present = np.stack([n_pred[1:] > 0, n_label[1:] > 0], axis=1)
    for c in range(1, num_classes):
        in_pred, in_label = present[c - 1]
        if in_pred and in_label:
            # medpy dc: 2 |A & B| / (|A| + |B|), then x 100 as DHC (same operations, same float64 rounding).
            dice[c - 1] = 2.0 * float(n_both[c]) / float(n_pred[c] + n_label[c]) * 100
            box = _union_box(boxes_pred[c - 1], boxes_label[c - 1], p.shape)
            asd[c - 1], assd[c - 1] = _surface_distance_means(p[box] == c, g[box] == c, sampling)
        elif in_pred or in_label:
            dice[c - 1] = 0.0
            asd[c - 1] = assd[c - 1] = ABSENT_ASD if dhc and sampling is None else math.nan
        else:
            dice[c - 1] = 1.0 if dhc else math.nan
            asd[c - 1] = assd[c - 1] = 0.0 if dhc else math.nan
    return CaseMetrics(dice=dice, asd=asd, asd_unit="voxel" if sampling is None else "mm", present=present,
                       assd=assd)


def summarize(cases: Sequence[CaseMetrics]) -> dict[str, Any]:
    """Mean over cases per class, then mean over classes (both skip NaN).

    Args:
        cases: the :class:`CaseMetrics` of one run's test cases (same C and ASD unit).

    Returns:
        ``{"dice": [C-1 floats], "asd": [C-1 floats], "assd": [C-1 floats], "mean_dice": float,
        "mean_asd": float, "mean_assd": float, "asd_unit": str}`` (``asd`` directed, ``assd`` symmetric,
        both in ``asd_unit``). A class that is NaN in every case stays NaN (and is skipped by the overall
        mean); an all-NaN overall mean is NaN.

    Raises:
        ValueError: for an empty list, differing class counts or mixed ASD units.
    """
    if len(cases) == 0:
        raise ValueError("summarize needs at least one CaseMetrics")
    units = {c.asd_unit for c in cases}
    if len(units) != 1:
        raise ValueError(f"cannot summarize cases with mixed ASD units {sorted(units)}")
    sizes = {c.dice.size for c in cases}
    if len(sizes) != 1:
        raise ValueError(f"cases have different numbers of classes: {sorted(s + 1 for s in sizes)}")
    out: dict[str, Any] = {}
    for key in ("dice", "asd", "assd"):
        per_class = _nanmean(np.stack([getattr(c, key) for c in cases]), axis=0)
        out[key] = per_class.tolist()
        out[f"mean_{key}"] = float(_nanmean(per_class))
    out["asd_unit"] = units.pop()
    return out


def mean_std_over_runs(run_summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over runs (e.g. 3 seeds) of :func:`summarize` outputs.

    The std is the population std (``numpy.std``, ``ddof=0``), as DHC computes it over its runs. NaN
    entries are skipped.

    Args:
        run_summaries: one :func:`summarize` dict per run (same number of classes, same ASD unit).

    Returns:
        ``{"dice_mean": [...], "dice_std": [...], "asd_mean": [...], "asd_std": [...],
        "mean_dice": (mean, std), "mean_asd": (mean, std), "asd_unit": str}``, and the same ``assd_*`` /
        ``mean_assd`` entries when every summary has ``assd``; the per-class lists have C-1 floats, the
        tuples are over the runs' ``mean_dice`` / ``mean_asd`` / ``mean_assd``.

    Raises:
        ValueError: for an empty list, differing class counts or mixed ASD units.
    """
    if len(run_summaries) == 0:
        raise ValueError("mean_std_over_runs needs at least one run summary")
    units = {s.get("asd_unit", "voxel") for s in run_summaries}
    if len(units) != 1:
        raise ValueError(f"cannot combine runs with mixed ASD units {sorted(units)}")
    sizes = {len(s["dice"]) for s in run_summaries} | {len(s["asd"]) for s in run_summaries}
    if len(sizes) != 1:
        raise ValueError(f"run summaries have different numbers of classes: {sorted(sizes)}")
    out: dict[str, Any] = {}
    keys = ("dice", "asd", "assd") if all("assd" in s for s in run_summaries) else ("dice", "asd")
    for key in keys:
        per_class = np.array([s[key] for s in run_summaries], dtype=np.float64)
        overall = np.array([s[f"mean_{key}"] for s in run_summaries], dtype=np.float64)
        out[f"{key}_mean"] = _nanmean(per_class, axis=0).tolist()
        out[f"{key}_std"] = _nanstd(per_class, axis=0).tolist()
        out[f"mean_{key}"] = (float(_nanmean(overall)), float(_nanstd(overall)))
    out["asd_unit"] = units.pop()
    return out


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _surface(mask: np.ndarray) -> np.ndarray:
    """medpy's surface of a boolean mask: the voxels one 6-connected erosion removes (border value 0)."""
    return mask ^ ndi.binary_erosion(mask, structure=_SURFACE_STRUCTURE, iterations=1)


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray,
                        sampling: tuple[float, ...] | None) -> np.ndarray:
    """Distance of each voxel of ``from_surface`` (C order) to the nearest voxel of ``to_surface``: float64."""
    return ndi.distance_transform_edt(~to_surface, sampling=sampling)[from_surface]


def _surface_distance_means(pred_mask: np.ndarray, label_mask: np.ndarray,
                            sampling: tuple[float, ...] | None) -> tuple[float, float]:
    """``(asd, assd)`` of two non-empty boolean masks: medpy 0.5.2 ``asd(pred, label)`` and ``assd``."""
    surface_pred, surface_label = _surface(pred_mask), _surface(label_mask)
    d_pred = _directed_distances(surface_pred, surface_label, sampling)  # prediction -> label
    d_label = _directed_distances(surface_label, surface_pred, sampling)  # label -> prediction
    return float(d_pred.mean()), float(np.concatenate([d_pred, d_label]).mean())


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Bounding box of two boxes, grown by a 1-voxel margin and clipped to the volume."""
    return tuple(
        slice(max(min(sa.start, sb.start) - 1, 0), min(max(sa.stop, sb.stop) + 1, n))
        for sa, sb, n in zip(a, b, shape, strict=True)
    )


def _as_label_volume(x: Any, name: str, num_classes: int) -> np.ndarray:
    """A checked int64 (D, H, W) copy-or-view of a label volume."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D (D, H, W) label volume, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name} has non-integral values; expected integer labels")
    elif arr.dtype.kind not in "biu":
        raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1}, got values in {lo}..{hi}")
    return arr


def _check_spacing(spacing: Sequence[float] | None) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    try:
        values = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1))
        ok = np.asarray(spacing).ndim == 1
    except (TypeError, ValueError):
        values, ok = (), False
    if not ok or len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive finite numbers (sz, sy, sx) in mm, got {spacing!r}")
    return values


def _nanmean(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Mean along ``axis`` (``None``: all values) skipping NaN; all-NaN slices give NaN, without a warning.

    The values are added one after the other in index order. That is the order of numpy's reduction over
    the outer axis of an array, which DHC's ``np.mean(values, axis=0)`` over cases (a (cases, classes, 2)
    array) and over classes (a (classes, 2) array) uses, so without NaN the means equal DHC's to the last
    digit; ``ndarray.sum`` of a 1-D array instead adds pairwise, which can differ in the last bits.
    """
    a = np.asarray(a, dtype=np.float64)
    a = a.reshape(-1) if axis is None else np.moveaxis(a, axis, 0)
    ok = ~np.isnan(a)
    total = np.zeros(a.shape[1:], dtype=np.float64)
    for row in np.where(ok, a, 0.0):
        total = total + row
    count = ok.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), math.nan)


def _nanstd(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Population std (``ddof=0``) skipping NaN; all-NaN slices give NaN."""
    a = np.asarray(a, dtype=np.float64)
    mean = _nanmean(a, axis=axis)
    centred = a - (mean if axis is None else np.expand_dims(mean, axis))
    return np.sqrt(_nanmean(centred**2, axis=axis))


def _from_json_floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else float(v)
