"""The schedules of a DINO-Mix run, as functions of where the run is: the poly learning rate, the
sigmoid ramp-up of λ_unsup and the EMA teacher's decay warm-up.

The ramp and the warm-up are those of the code the method builds on: DHC, SKCDF and GenericSSL ramp
their unsupervised weight as ``w · exp(-5 (1 - t)²)`` over the whole run; the mean teacher (and
DHC's UA-MT baseline) average with ``min(1 - 1/(t + 1), decay)``, so that the EMA starts as a copy
of the student rather than of its random initialisation.
"""

from __future__ import annotations

import math

__all__ = ["ema_decay_at", "poly_lr", "sigmoid_rampup", "unsup_weight"]


def poly_lr(base_lr: float, epoch: int, max_epoch: int, power: float = 0.9) -> float:
    """``base_lr · (1 - E / E_max)^power``, E clipped to [0, E_max] (0 at and after E_max).

    Raises:
        ValueError: ``max_epoch`` < 1.
    """
    if max_epoch < 1:
        raise ValueError(f"max_epoch must be >= 1, got {max_epoch}")
    return base_lr * (1 - min(max(epoch, 0), max_epoch) / max_epoch) ** power


def sigmoid_rampup(progress: float, length: float) -> float:
    """``exp(-5 (1 - t)²)`` with ``t = clip(progress / length, 0, 1)``: 0.0067 at the start, 1 from ``length`` on.

    Args:
        progress: where the run is, in any unit (here: the fraction of the run's iterations done).
        length: the ramp's length in that unit; 0 means no ramp (always 1).

    Raises:
        ValueError: a negative ``length``.
    """
    if length < 0:
        raise ValueError(f"ramp length must be >= 0, got {length}")
    if length == 0:
        return 1.0
    t = min(1.0, max(0.0, progress / length))
    return math.exp(-5.0 * (1.0 - t) ** 2)


def unsup_weight(lambda_unsup: float, step: int, total_steps: int, rampup: float) -> float:
    """λ_unsup at iteration ``step`` (0-based) of ``total_steps``: ``lambda_unsup · sigmoid_rampup(step /
    total_steps, rampup)``, ``rampup`` the ramp's length as a fraction of the run (1.0: the whole run, as
    the peers; 0: no ramp).

    Raises:
        ValueError: ``total_steps`` < 1 or a negative ``rampup``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return lambda_unsup * sigmoid_rampup(step / total_steps, rampup)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay of the update after iteration ``step`` (0-based): ``min(1 - 1/(step + 1), decay)``
    with the warm-up (0 after the first step: the EMA becomes the trained student, then averages over
    ever more steps until ``decay`` takes over at step ``1/(1 - decay) - 1``, 99 for 0.99), else ``decay``.
    """
    if not warmup:
        return decay
    return min(1.0 - 1.0 / (step + 1), decay)
