"""Instruments of target fidelity: cosine between target tensors, and a teacher's context sensitivity.

A fidelity figure can only fail if the teacher's tokens depend on their context: with a
context-free teacher (the ``random:tiny|vits16|...`` DINOv3s, layerscale 1e-5) a crop's tokens equal
the window of the slice's tokens whatever the code does, and every cosine is 1.0.
:func:`context_cosine` says how much a teacher depends on its context, so that it is printed beside
every fidelity figure.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dinomix_cache.teacher.model import Teacher

__all__ = ["context_cosine", "cosine_fidelity"]


def cosine_fidelity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over cells (channels on axis 1) of two (B, C, z, y, x) target tensors.

    Raises:
        ValueError: the shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"target shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(F.cosine_similarity(a.double(), b.double(), dim=1).mean())


def context_cosine(teacher: Teacher, slices: torch.Tensor | np.ndarray, border: int = 1) -> float:
    """How much the teacher's tokens depend on the rest of the image: the mean cosine, over the
    tokens of the centre window, between the window's tokens seen inside the whole slice and the
    tokens of the window seen alone.

    The window is the slice less ``border`` tokens on every side (a 128-pixel window of a 160-pixel
    slice at 16 px a token), at the teacher's own input scale. 1.0 means context-free (a crop's
    tokens are a window of the slice's); a trained ViT-S/16-sized model gives about 0.65.

    Args:
        teacher: the teacher, at its settings' input size (None: the slice size).
        slices: (B, H, W) slices in [0, 1].
        border: tokens cut from each side for the window.

    Raises:
        ValueError: slices too small for a window.
    """
    images = torch.as_tensor(np.asarray(slices, dtype=np.float32))
    if images.ndim != 3:
        raise ValueError(f"slices must be (B, H, W), got shape {tuple(images.shape)}")
    full = teacher.forward_slices(images)
    gh, gw = full.shape[1:3]
    if gh <= 2 * border or gw <= 2 * border:
        raise ValueError(f"a {gh}x{gw} token grid leaves no window inside a border of {border} tokens")
    height, width = images.shape[1:]
    ty, tx = height / gh, width / gw
    y0, y1 = round(border * ty), round((gh - border) * ty)
    x0, x1 = round(border * tx), round((gw - border) * tx)
    patch = teacher.patch_size
    size = ((gh - 2 * border) * patch, (gw - 2 * border) * patch)
    alone = teacher.forward_slices(images[:, y0:y1, x0:x1], input_size=size)
    inside = full[:, border:gh - border, border:gw - border]
    return float(F.cosine_similarity(inside.double(), alone.double(), dim=-1).mean())
