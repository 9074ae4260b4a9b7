"""Pictures of ``dinomix-cache evaluate``: a per-class Dice bar chart and a qualitative slice figure.

Both figures are drawn on a bare :class:`matplotlib.figure.Figure` with an Agg canvas, so no global
backend (``matplotlib.use``) or pyplot state is touched, and written as PNG atomically (temp file in the
same folder, then rename): a crash never leaves a half-written picture.

Organ colours are fixed per class *name* (Synapse and AMOS share names but not indices, and a liver should
look the same in every figure): :func:`organ_colour` gives a conventional, saturated colour for the organs
of both datasets (liver reddish brown, aorta red, IVC blue, ...) and a fallback palette by index for any
other name. All named colours are pairwise far apart in RGB and far from grey, so they stay distinct as
half-transparent overlays on a CT slice.

Shapes and units:
    - Dice: percent (0-100), arrays of shape (C-1,) over the foreground classes (entry ``k`` is class
      ``k + 1``, as :mod:`stage2_train.evaluate.metrics` returns them); per-run values (R, C-1). NaN = undefined
      (class absent), drawn as a hatched "n/a" marker.
    - Volumes: (D, H, W), axial slices along axis 0, already in radiological display order; ``image`` in
      [0, 1] (values outside are clipped by the display), ``label`` / ``prediction`` integer class indices
      into ``class_names`` (entry 0 the background, as in :mod:`dinomix_cache.data.classes`).

Failure modes: :class:`ValueError` for empty inputs, shape or length mismatches, non-integral or
out-of-range labels, a slice index outside the volume, and ``count < 1`` in :func:`choose_slices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from dinomix_cache.atomic import atomic_path
from dinomix_cache.data.classes import AMOS_ABBREVIATIONS, AMOS_CLASSES, SYNAPSE_ABBREVIATIONS, SYNAPSE_CLASSES

__all__ = [
    "ORGAN_COLOURS",
    "choose_slices",
    "colour_table",
    "dice_bar_chart",
    "organ_colour",
    "qualitative_figure",
]

RGB = tuple[float, float, float]


def _rgb(r: int, g: int, b: int) -> RGB:
    return (r / 255.0, g / 255.0, b / 255.0)


# Conventional hues where anatomy atlases agree (liver brown, arteries red, veins blue, gallbladder green);
# the rest chosen so that no two organs of Synapse or AMOS are closer than ~0.25 in RGB [0, 1].
ORGAN_COLOURS: dict[str, RGB] = {
    "spleen": _rgb(150, 60, 205),
    "right_kidney": _rgb(255, 127, 14),
    "left_kidney": _rgb(255, 222, 30),
    "gallbladder": _rgb(30, 170, 60),
    "esophagus": _rgb(255, 120, 190),
    "liver": _rgb(175, 80, 45),
    "stomach": _rgb(250, 170, 120),
    "aorta": _rgb(225, 20, 30),
    "inferior_vena_cava": _rgb(35, 90, 255),
    "portal_splenic_veins": _rgb(0, 215, 235),
    "pancreas": _rgb(160, 225, 80),
    "right_adrenal_gland": _rgb(0, 160, 150),
    "left_adrenal_gland": _rgb(235, 0, 235),
    "duodenum": _rgb(125, 155, 255),
    "bladder": _rgb(255, 255, 150),
    "prostate_uterus": _rgb(125, 30, 90),
}

# For names outside the table (other datasets): saturated, pairwise >= 0.25 apart in RGB, none grey.
_FALLBACK: tuple[RGB, ...] = tuple(
    _rgb(*c)
    for c in [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (160, 82, 45),
        (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 187, 120), (152, 223, 138), (0, 255, 127),
        (128, 0, 0), (255, 0, 255), (250, 0, 135), (0, 170, 120), (255, 230, 0), (120, 40, 160),
    ]
)


def _alias_table() -> dict[str, str]:
    aliases = {"ivc": "inferior_vena_cava", "portal_vein_and_splenic_vein": "portal_splenic_veins",
               "oesophagus": "esophagus", "prostate/uterus": "prostate_uterus"}
    # The paper's abbreviations resolve too, so a bar chart given only "Sp RK ..." still gets organ colours.
    for names, abbrs in ((SYNAPSE_CLASSES, SYNAPSE_ABBREVIATIONS), (AMOS_CLASSES, AMOS_ABBREVIATIONS)):
        for name, abbr in zip(names[1:], abbrs[1:], strict=True):
            aliases[abbr.lower()] = name
    for name in ORGAN_COLOURS:
        parts = name.split("_")
        if parts[0] in ("right", "left"):  # "kidney_left" / "adrenal_gland_right" (TotalSegmentator style)
            aliases["_".join([*parts[1:], parts[0]])] = name
    return aliases


_ALIASES = _alias_table()


def _canonical(name: str) -> str:
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return _ALIASES.get(key, key)


def organ_colour(name: str, index: int) -> RGB:
    """RGB colour (floats in [0, 1]) of an organ class.

    Args:
        name: class name (``"liver"``, ``"right kidney"``, ``"kidney_right"``) or a paper abbreviation
            (``"Li"``); case, spaces and hyphens are ignored.
        index: the class index (1-based for foreground); only used to pick a fallback colour for names
            that are not in :data:`ORGAN_COLOURS`.
    """
    known = ORGAN_COLOURS.get(_canonical(name))
    if known is not None:
        return known
    return _FALLBACK[(index - 1) % len(_FALLBACK)]


def colour_table(class_names: Sequence[str]) -> np.ndarray:
    """(C, 3) float array of RGB colours indexed by label value; row 0 (background) is black and unused."""
    table = np.zeros((len(class_names), 3))
    for i, name in enumerate(class_names[1:], start=1):
        table[i] = organ_colour(name, i)
    return table


def _pretty(name: str) -> str:
    return name.replace("_", " ")


def _save_png(fig: Figure, path: Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        # format given explicitly: the temp suffix would otherwise decide the file type
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


# ----------------------------------------------------------------------------------------------
# Dice bar chart
# ----------------------------------------------------------------------------------------------

_RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def dice_bar_chart(
    path: Path,
    class_labels: list[str],
    dice_mean: np.ndarray,
    dice_std: np.ndarray | None,
    run_labels: list[str] | None = None,
    per_run: np.ndarray | None = None,
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Per-class Dice (%) bars with the spread over runs; write a PNG (dpi 150) and return its path.

    Bar height = ``dice_mean``; error bars = ``dice_std`` (drawn only when more than one run is known,
    clipped to the 0-100 range Dice can take); each run's value from ``per_run`` as a small black marker
    over its bar; a dashed line at the mean over classes (NaN skipped). A NaN class is drawn as a hatched
    "n/a" stub, not as a zero bar.

    Args:
        path: output file; written as PNG whatever its suffix, parent folders created.
        class_labels: x tick labels, one per foreground class (e.g. ``SYNAPSE_ABBREVIATIONS[1:]``).
        dice_mean: (C-1,) mean Dice over runs, percent.
        dice_std: (C-1,) std over runs, percent, or None.
        run_labels: names of the R runs (e.g. seeds), shown in the legend; R must match ``per_run``.
        per_run: (R, C-1) Dice of each run, percent, or None.
        title: figure title.
        class_names: full class names (same length as ``class_labels``) used for the organ colours; by
            default the colours are looked up from ``class_labels`` (abbreviations resolve).

    Raises:
        ValueError: no classes, or lengths / shapes that do not match ``class_labels``.
    """
    n = len(class_labels)
    if n == 0:
        raise ValueError("dice_bar_chart: class_labels is empty")
    mean = np.asarray(dice_mean, dtype=float)
    if mean.shape != (n,):
        raise ValueError(f"dice_bar_chart: dice_mean has shape {mean.shape}, expected ({n},) = one value per "
                         "class label (foreground only, e.g. SYNAPSE_ABBREVIATIONS[1:])")
    std = None if dice_std is None else np.asarray(dice_std, dtype=float)
    if std is not None and std.shape != (n,):
        raise ValueError(f"dice_bar_chart: dice_std has shape {std.shape}, expected ({n},)")
    runs = None if per_run is None else np.asarray(per_run, dtype=float)
    if runs is not None and (runs.ndim != 2 or runs.shape[1] != n or runs.shape[0] == 0):
        raise ValueError(f"dice_bar_chart: per_run has shape {runs.shape}, expected (R, {n}) with R >= 1")
    if run_labels is not None and runs is not None and len(run_labels) != runs.shape[0]:
        raise ValueError(f"dice_bar_chart: {len(run_labels)} run_labels for {runs.shape[0]} rows of per_run")
    if class_names is not None and len(class_names) != n:
        raise ValueError(f"dice_bar_chart: {len(class_names)} class_names for {n} class_labels")
    n_runs = runs.shape[0] if runs is not None else (len(run_labels) if run_labels is not None else None)

    names = list(class_names) if class_names is not None else list(class_labels)
    colours = [organ_colour(name, i + 1) for i, name in enumerate(names)]
    x = np.arange(n)
    valid = np.isfinite(mean)

    fig = Figure(figsize=(max(6.0, 0.55 * n + 3.5), 4.2), layout="constrained")
    ax = fig.add_subplot()
    handles: list = []
    ax.bar(x[valid], mean[valid], width=0.7, color=[c for c, v in zip(colours, valid, strict=True) if v],
           edgecolor="0.25", linewidth=0.6, zorder=2)
    if (~valid).any():
        # A zero bar would read as "total failure"; an undefined value must look different.
        ax.bar(x[~valid], 6.0, width=0.7, facecolor="none", edgecolor="0.45", hatch="///", linewidth=0.6,
               zorder=2)
        for xi in x[~valid]:
            ax.text(xi, 7.0, "n/a", ha="center", va="bottom", fontsize=8, color="0.3")
        handles.append(Patch(facecolor="none", edgecolor="0.45", hatch="///", label="n/a (class absent)"))
    if std is not None and (n_runs is None or n_runs > 1):
        ok = valid & np.isfinite(std)
        lo = np.minimum(std[ok], mean[ok])
        hi = np.minimum(std[ok], 100.0 - mean[ok])
        ax.errorbar(x[ok], mean[ok], yerr=np.vstack([lo, hi]), fmt="none", ecolor="0.15", elinewidth=1.0,
                    capsize=3, zorder=3)
        handles.append(Line2D([], [], color="0.15", marker="|", markersize=8, linestyle="none",
                              label="± std over runs" if n_runs is None else f"± std over {n_runs} runs"))
    if runs is not None:
        r = runs.shape[0]
        # Spread the runs across the bar width so identical values do not hide each other.
        offsets = np.linspace(-0.22, 0.22, r) if r > 1 else np.zeros(1)
        for k in range(r):
            marker = _RUN_MARKERS[k % len(_RUN_MARKERS)]
            ok = np.isfinite(runs[k])
            ax.scatter(x[ok] + offsets[k], runs[k, ok], s=14, marker=marker, facecolor="white",
                       edgecolor="black", linewidth=0.8, zorder=4)
            label = run_labels[k] if run_labels is not None else f"run {k + 1}"
            handles.append(Line2D([], [], marker=marker, markerfacecolor="white", markeredgecolor="black",
                                  linestyle="none", label=label))
    if valid.any():
        overall = float(np.mean(mean[valid]))
        ax.axhline(overall, color="0.2", linestyle="--", linewidth=1.0, zorder=3.5)  # visible across bars
        handles.insert(0, Line2D([], [], color="0.2", linestyle="--", label=f"mean over classes: {overall:.1f} %"))

    ax.set_xticks(x, list(class_labels), fontsize=9, rotation=0 if n <= 16 else 90)
    ax.set_xlim(-0.6, n - 0.4)
    # a little headroom so markers and caps at exactly 100 are not cut in half by the frame
    ax.set_ylim(0, 102.5)
    ax.set_yticks(np.arange(0, 101, 10))
    ax.set_ylabel("Dice (%)")
    ax.grid(axis="y", color="0.88", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title)
    # Outside the axes: bars reach 90+ and any in-plot corner would cover one of them.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save_png(fig, path, dpi=150)


# ----------------------------------------------------------------------------------------------
# slice choice and qualitative figure
# ----------------------------------------------------------------------------------------------


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
    ``origin="upper"``); labels are overlaid in :func:`organ_colour` colours at ``alpha``, background
    transparent, each organ outlined in its opaque colour. The legend, right of the grid, lists every class
    present in the shown slices (ground truth or prediction) as "full name (abbreviation)".

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
    return _save_png(fig, path, dpi=150)
