"""How good the EMA teacher's pseudo-labels are, where the truth of unlabeled cases is known.

A store of the phantom (and any store made from a fully labelled dataset) keeps the labels of its
unlabeled cases too; training never reads them, but counting them against the pseudo-labels shows
what the unsupervised branch teaches: how much of each organ the pseudo-labels find, and whether the
"confident" voxels are anything but background.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PseudoLabelStats"]


class PseudoLabelStats:
    """Per-class counts of pseudo-labels against the truth, accumulated over steps and read per epoch.

    Args:
        num_classes: C, background included.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget every count (start of an epoch)."""
        c = self.num_classes
        self.true = np.zeros(c, np.int64)             # voxels of class c in the truth
        self.pred = np.zeros(c, np.int64)             # voxels pseudo-labelled c
        self.hit = np.zeros(c, np.int64)              # ... and truly c
        self.confident_pred = np.zeros(c, np.int64)   # confident voxels pseudo-labelled c
        self.confident_hit = np.zeros(c, np.int64)    # ... and truly c
        self.voxels = 0

    def add(self, truth: torch.Tensor, pseudo: torch.Tensor, confident: torch.Tensor) -> None:
        """Count one crop.

        Args:
            truth: (D, H, W) integer labels in [0, C).
            pseudo: (D, H, W) integer pseudo-labels in [0, C).
            confident: (D, H, W) bool, True where the pseudo-label passed the threshold τ.
        """
        c = self.num_classes
        t = truth.reshape(-1).long().numpy()
        p = pseudo.reshape(-1).long().numpy()
        k = confident.reshape(-1).numpy()
        hit = t == p
        self.true += np.bincount(t, minlength=c)[:c]
        self.pred += np.bincount(p, minlength=c)[:c]
        self.hit += np.bincount(p[hit], minlength=c)[:c]
        self.confident_pred += np.bincount(p[k], minlength=c)[:c]
        self.confident_hit += np.bincount(p[k & hit], minlength=c)[:c]
        self.voxels += t.size

    def summary(self) -> dict[str, object] | None:
        """What the epoch's pseudo-labels were worth, or None when no labelled crop was counted.

        Returns:
            ``pseudo_dice``: per foreground class Dice of the pseudo-labels against the truth (None where the
            class is in neither); ``pseudo_recall``: the share of each foreground class's voxels it found
            (None where absent from the truth); ``confident_precision``: per foreground class, the share of
            its confident pseudo-labels that are right (None where none); ``confident_accuracy`` over all
            confident voxels; ``confident_background``: the share of confident voxels labelled background.
        """
        if self.voxels == 0:
            return None

        def ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
            return [None if d == 0 else round(float(n) / float(d), 4) for n, d in zip(num, den, strict=True)]

        confident = int(self.confident_pred.sum())
        return {
            "pseudo_dice": ratio(2 * self.hit[1:], self.true[1:] + self.pred[1:]),
            "pseudo_recall": ratio(self.hit[1:], self.true[1:]),
            "confident_precision": ratio(self.confident_hit[1:], self.confident_pred[1:]),
            "confident_accuracy": None if confident == 0 else round(self.confident_hit.sum() / confident, 4),
            "confident_background": None if confident == 0 else round(self.confident_pred[0] / confident, 4),
        }
