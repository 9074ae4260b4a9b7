"""How the pictures of ``dinomix-cache evaluate`` are drawn and written.

Every figure is drawn on a bare :class:`matplotlib.figure.Figure` with an Agg canvas, so no global
backend (``matplotlib.use``) or pyplot state is touched, and written as PNG atomically (temp file in the
same folder, then rename): a crash never leaves a half-written picture. The figures are the per-class
Dice bar chart (:mod:`stage2_train.evaluate.dice_chart`) and the qualitative slice figure
(:mod:`stage2_train.evaluate.slice_figure`), coloured by :mod:`stage2_train.evaluate.colours`.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dinomix_cache.atomic import atomic_path

__all__ = ["save_png"]


def save_png(fig: Figure, path: Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` as PNG at ``dpi`` (whatever the suffix; parent folders created, the file
    replaced atomically); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        # format given explicitly: the temp suffix would otherwise decide the file type
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
