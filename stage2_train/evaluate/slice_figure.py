"""The qualitative figure of ``dinomix-cache evaluate``: CT, ground truth and prediction on a few axial
slices, and the rule that picks the slices.

Volumes are (D, H, W), axial slices along axis 0, already in radiological display order; ``image`` in
[0, 1] (values outside are clipped by the display), ``label`` / ``prediction`` integer class indices
into ``class_names`` (entry 0 the background, as in :mod:`dinomix_cache.data.classes`).

Failure modes: :class:`ValueError` for empty inputs, shape or length mismatches, non-integral or
out-of-range labels, a slice index outside the volume, and ``count < 1`` in :func:`choose_slices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from stage2_train.evaluate.colours import colour_table
from stage2_train.evaluate.figures import save_png

__all__ = ["choose_slices", "qualitative_figure"]


def _pretty(name: str) -> str:
    return name.replace("_", " ")


def _check_labels(name: str, label: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(label)
    if arr.ndim != 3 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty (D, H, W) volume, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integral class indices")
        arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bound = "" if num_classes is None else f" .. {num_classes - 1}"
        raise ValueError(f"{name} values must lie in 0{bound}, got {lo} .. {hi}")
    return arr


def choose_slices(label: np.ndarray, count: int = 3, rare_first: bool = True, min_gap: int | None = None
                  ) -> list[int]:
    """Pick ``count`` axial slices (indices along axis 0) that show the organs of ``label`` best.

    Rule (greedy, one slice at a time):

    1. A class's rarity is its total voxel count in ``label``; its weight is
       ``w_c = min_volume / volume_c`` with ``rare_first`` (the rarest class weighs 1, a class 100x larger
       0.01), or 1 for every class without.
    2. Candidates are the slices with foreground at least ``min_gap`` slices from those already picked
       (default ``min_gap`` = foreground extent // (2 * count), at least 1, so picks spread out).
    3. Pick the candidate maximising, in this order: the summed weight of the classes it shows that no
       picked slice shows yet; the number of distinct classes it shows; its foreground area.
       Hence the first slice shows the rarest organ (with as many others as possible), the next ones the
       rarest still-unshown organs, and once every organ is shown, the slices with the most organs.
    4. If the gap leaves too few candidates, the remaining picks ignore it; with no foreground at all,
       ``count`` evenly spaced slices are returned.

    Args:
        label: (D, H, W) integer class volume, 0 the background.
        count: how many slices; at most D are returned.
        rare_first: weight classes by rarity (see 1.).
        min_gap: minimum distance in slices between picks, or None for the default above.

    Returns:
        Sorted slice indices (top-down display order).

    Raises:
        ValueError: ``count < 1``, a label that is not a non-empty 3D integral volume, or negative values.
    """
    if count < 1:
        raise ValueError(f"choose_slices: count must be >= 1, got {count}")
    lab = _check_labels("label", label)
    depth = lab.shape[0]
    count = min(count, depth)
    num_classes = int(lab.max()) + 1
    # (D, C-1) foreground voxel counts per slice and class; slice by slice to keep memory at one slice
    per_slice = np.stack([np.bincount(lab[z].ravel(), minlength=num_classes) for z in range(depth)])[:, 1:]
    present = per_slice > 0
    fg_slices = np.flatnonzero(present.any(axis=1))
    if fg_slices.size == 0:
        return sorted({int(round(z)) for z in np.linspace(0, depth - 1, count)})
    volume = per_slice.sum(axis=0).astype(float)
    weight = np.zeros_like(volume)
    has = volume > 0
    weight[has] = volume[has].min() / volume[has] if rare_first else 1.0
    if min_gap is None:
        extent = int(fg_slices[-1] - fg_slices[0] + 1)
        min_gap = max(1, extent // (2 * count))

    picked: list[int] = []
    shown = np.zeros(present.shape[1], dtype=bool)
    area = per_slice.sum(axis=1)
    n_distinct = present.sum(axis=1)
    for respect_gap in (True, False):
        while len(picked) < count:
            cands = [int(z) for z in fg_slices if z not in picked
                     and (not respect_gap or all(abs(int(z) - p) >= min_gap for p in picked))]
            if not cands:
                break
            best = max(cands, key=lambda z: (float(weight[present[z] & ~shown].sum()), int(n_distinct[z]),
                                             int(area[z]), -z))
            picked.append(best)
            shown |= present[best]
    if len(picked) < count:  # fewer foreground slices than asked: pad with background slices
        picked += [z for z in range(depth) if z not in picked][: count - len(picked)]
    return sorted(picked)


def _overlay(lab2d: np.ndarray, table: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros((*lab2d.shape, 4))
    rgba[..., :3] = table[lab2d]
    rgba[..., 3] = np.where(lab2d > 0, alpha, 0.0)  # background stays fully transparent
    return rgba


def qualitative_figure(
    path: Path,
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    class_names: list[str],
    class_labels: list[str],
    slices: Sequence[int] | None = None,
    title: str = "",
    alpha: float = 0.5,
) -> Path:
    """CT / ground truth / prediction for a few axial slices (as in DINO-Mix Fig. 2); write a PNG.

    Rows are slices (``slices`` or :func:`choose_slices` on ``label``, or on ``prediction`` when the ground
    truth is empty), columns "CT", "Ground truth", "Prediction". ``image[z]`` is shown as is (grey, 0-1,
    ``origin="upper"``); labels are overlaid in :func:`~stage2_train.evaluate.colours.organ_colour` colours
    at ``alpha``, background transparent, each organ outlined in its opaque colour. The legend, right of the
    grid, lists every class present in the shown slices (ground truth or prediction) as "full name
    (abbreviation)".

    Args:
        path: output file; written as PNG (dpi 150) whatever its suffix, parent folders created.
        image: (D, H, W) preprocessed CT in [0, 1].
        label: (D, H, W) ground truth class indices.
        prediction: (D, H, W) predicted class indices.
        class_names: C names indexed by label value, entry 0 the background (e.g. ``SYNAPSE_CLASSES``).
        class_labels: C abbreviations, same indexing (e.g. ``SYNAPSE_ABBREVIATIONS``).
        slices: axial indices to show, top to bottom; None picks 3 with :func:`choose_slices`.
        title: figure title.
        alpha: overlay opacity in [0, 1].

    Raises:
        ValueError: empty or non-3D volumes, differing shapes, name / abbreviation lists of different
            lengths or shorter than 2, labels outside ``0 .. C-1``, no slices, or a slice outside ``0 .. D-1``.
    """
    img = np.asarray(image, dtype=float)
    if img.ndim != 3 or img.size == 0:
        raise ValueError(f"qualitative_figure: image must be a non-empty (D, H, W) volume, got {img.shape}")
    if np.shape(label) != img.shape or np.shape(prediction) != img.shape:
        raise ValueError(f"qualitative_figure: shapes differ: image {img.shape}, label {np.shape(label)}, "
                         f"prediction {np.shape(prediction)}")
    if len(class_names) < 2 or len(class_names) != len(class_labels):
        raise ValueError(f"qualitative_figure: need >= 2 class names (background first) and as many labels, "
                         f"got {len(class_names)} names and {len(class_labels)} labels")
    num_classes = len(class_names)
    gt = _check_labels("label", label, num_classes)
    pred = _check_labels("prediction", prediction, num_classes)
    if slices is None:
        slices = choose_slices(gt if gt.any() else pred, count=3)
    rows = [int(z) for z in slices]
    if not rows:
        raise ValueError("qualitative_figure: no slices to show")
    bad = [z for z in rows if not 0 <= z < img.shape[0]]
    if bad:
        raise ValueError(f"qualitative_figure: slices {bad} outside 0 .. {img.shape[0] - 1}")

    table = colour_table(class_names)
    h, w = img.shape[1:]
    panel = 3.0
    fig = Figure(figsize=(3 * panel * min(1.0, w / h) + 2.6, len(rows) * panel * min(1.0, h / w) + 0.6),
                 layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    shown: set[int] = set()
    for r, z in enumerate(rows):
        for c, overlay in enumerate((None, gt[z], pred[z])):
            ax = axes[r, c]
            ax.imshow(img[z], cmap="gray", vmin=0.0, vmax=1.0, origin="upper", interpolation="nearest")
            if overlay is not None:
                ax.imshow(_overlay(overlay, table, alpha), origin="upper", interpolation="nearest")
                present = [int(v) for v in np.unique(overlay) if v > 0]
                shown.update(present)
                for k in present:
                    mask = (overlay == k).astype(float)
                    if not mask.all():  # an all-k slice has no boundary to draw
                        # An opaque outline keeps small organs (adrenals) visible under the translucent fill.
                        ax.contour(mask, levels=[0.5], colors=[table[k]], linewidths=0.8)
            # ticks off but the axis kept, so the row's y label still shows
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(("CT", "Ground truth", "Prediction")[c])
        axes[r, 0].set_ylabel(f"slice z = {z}")
    handles = [Patch(facecolor=table[k], edgecolor="0.3", label=f"{_pretty(class_names[k])} ({class_labels[k]})")
               for k in sorted(shown)]
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return save_png(fig, path, dpi=150)
