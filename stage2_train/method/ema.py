"""The exponential-moving-average copy of the student that makes the pseudo-labels (mean teacher)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["EmaTeacher"]


class EmaTeacher:
    """An exponential-moving-average copy of a network, for pseudo-labels (mean teacher).

    The copy never receives gradients (``requires_grad`` False) and stays in ``eval()``: dropout off and
    BatchNorm on its running statistics, so pseudo-labels are deterministic. It is deliberately not an
    ``nn.Module``: a parent's ``.train()`` cannot switch it back to training mode, and it does not show up
    in the student's ``parameters()`` (so no optimiser can touch it).

    Args:
        model: the student; it is deep-copied, so the two never share storage.
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float = 0.99) -> None:
        """One EMA step: θ_ema ← decay·θ_ema + (1 − decay)·θ for every parameter; buffers copied.

        Args:
            student: the network being trained; same architecture as the copy.
            decay: weight of the old EMA value in [0, 1] (0.99 in the paper; 0 copies the student).

        Raises:
            ValueError: if ``decay`` is outside [0, 1] or the parameter/buffer names differ.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        ema_params = dict(self.module.named_parameters())
        params = dict(student.named_parameters())
        ema_buffers = dict(self.module.named_buffers())
        buffers = dict(student.named_buffers())
        if ema_params.keys() != params.keys() or ema_buffers.keys() != buffers.keys():
            raise ValueError("EMA update: the student's parameter/buffer names differ from the EMA copy's")
        for name, p_ema in ema_params.items():
            # lerp_ computes θ_ema + (1 − decay)(θ − θ_ema), the same average with a single rounding (and exact
            # copies at decay 0 or 1).
            p_ema.lerp_(params[name].detach(), 1.0 - decay)
        # BatchNorm running statistics are copied rather than averaged, the common practice in mean-teacher
        # code: they are already running averages, and copying keeps them consistent with the batch
        # statistics the student's current weights produce (num_batches_tracked is an integer anyway).
        for name, b_ema in ema_buffers.items():
            b_ema.copy_(buffers[name])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the EMA copy (in eval mode, without building an autograd graph)."""
        self.module.eval()
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> EmaTeacher:
        """Move the copy like ``nn.Module.to``; returns ``self``."""
        self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The copy's state dict (parameters and buffers), for checkpoints."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore the copy from :meth:`state_dict`; it stays gradient-free and in eval mode.

        Args:
            state_dict: as saved by :meth:`state_dict`.
            strict: require exactly matching keys (``nn.Module.load_state_dict``).

        Raises:
            RuntimeError: on missing/unexpected keys (strict) or shape mismatches.
        """
        self.module.load_state_dict(state_dict, strict=strict)
        self.module.requires_grad_(False)
        self.module.eval()
