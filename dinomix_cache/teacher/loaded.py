"""What a teacher loader hands :func:`dinomix_cache.teacher.model.load_teacher`: the frozen model and its
provenance, before it is wrapped in a :class:`~dinomix_cache.teacher.model.Teacher`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class LoadedModel:
    """A frozen vision model and what the store records about it.

    Attributes:
        model: the frozen model, on its device and in its dtype.
        family: teacher family (a key of ``families.DISPLAY_NAME``).
        model_type: ``model_type`` of its config.
        mean, std: per-channel normalisation of inputs in [0, 1] (3 values each).
        is_random: random init (``random:NAME``), not pretrained weights.
        revision: the hub commit (or the requested revision when it could not be pinned); None for a
            directory or a random teacher.
        weight_files: the safetensors files the weights came from (hashed lazily); None for a random teacher.
        random_weights_sha256: SHA-256 of a random teacher's state dict; None for pretrained weights.
        label: how the teacher is named everywhere, when its folder says what it is (a teacher this
            project trained: :mod:`~dinomix_cache.teacher.provenance`); None: "random, not pretrained"
            or "pretrained" by ``is_random``.
        training: what the store records of such a teacher's training
            (:func:`~dinomix_cache.teacher.provenance.store_record`); None for any other teacher.
    """

    model: torch.nn.Module
    family: str
    model_type: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    is_random: bool
    revision: str | None
    weight_files: list[Path] | None
    random_weights_sha256: str | None
    label: str | None = None
    training: dict[str, Any] | None = None


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Evaluation mode and no gradients, in place; returns ``model``."""
    model.eval()  # DINOv3's RoPE jitters/rescales positions in train mode
    model.requires_grad_(False)
    return model
