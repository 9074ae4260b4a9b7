"""The per-class Dice bar chart of ``dinomix-cache evaluate``, with the spread over runs.

Shapes and units: Dice in percent (0-100), arrays of shape (C-1,) over the foreground classes (entry
``k`` is class ``k + 1``, as :mod:`stage2_train.evaluate.metrics` returns them); per-run values (R, C-1).
NaN = undefined (class absent), drawn as a hatched "n/a" marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from stage2_train.evaluate.colours import organ_colour
from stage2_train.evaluate.figures import save_png

__all__ = ["dice_bar_chart"]

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
    return save_png(fig, path, dpi=150)
