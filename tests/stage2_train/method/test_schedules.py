"""Schedules: poly learning rate, λ_unsup's sigmoid ramp and the EMA decay warm-up at chosen iterations."""

from __future__ import annotations

import math

import pytest

from stage2_train.method.schedules import ema_decay_at, poly_lr, sigmoid_rampup, unsup_weight


def test_poly_lr():
    assert poly_lr(0.1, 0, 30) == pytest.approx(0.1)
    assert poly_lr(0.1, 15, 30) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert poly_lr(0.1, 30, 30) == 0.0 and poly_lr(0.1, 40, 30) == 0.0
    with pytest.raises(ValueError):
        poly_lr(0.1, 0, 0)


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0.0, 1.0) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0.5, 1.0) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(1.0, 1.0) == 1.0 and sigmoid_rampup(2.0, 1.0) == 1.0
    assert sigmoid_rampup(0.25, 0.5) == pytest.approx(math.exp(-1.25))  # half-way through a half-run ramp
    assert sigmoid_rampup(0.0, 0.0) == 1.0  # no ramp
    with pytest.raises(ValueError):
        sigmoid_rampup(0.1, -1.0)


def test_unsup_weight_at_chosen_iterations():
    # 240 iterations, λ = 0.5, ramp over the whole run (the peers'): iteration 0, 120, 192 and 240.
    assert unsup_weight(0.5, 0, 240, 1.0) == pytest.approx(0.5 * math.exp(-5))
    assert unsup_weight(0.5, 120, 240, 1.0) == pytest.approx(0.5 * math.exp(-5 * 0.25))
    assert unsup_weight(0.5, 192, 240, 1.0) == pytest.approx(0.5 * math.exp(-5 * 0.04))
    assert unsup_weight(0.5, 240, 240, 1.0) == pytest.approx(0.5)
    # A ramp over the first 40 % of the run is complete from iteration 96 on.
    assert unsup_weight(0.5, 96, 240, 0.4) == pytest.approx(0.5)
    assert unsup_weight(0.5, 48, 240, 0.4) == pytest.approx(0.5 * math.exp(-1.25))
    assert unsup_weight(0.5, 0, 240, 0.0) == 0.5


def test_ema_decay_warmup_at_chosen_iterations():
    assert ema_decay_at(0, 0.99, True) == 0.0  # the first update copies the student
    assert ema_decay_at(1, 0.99, True) == pytest.approx(0.5)
    assert ema_decay_at(9, 0.99, True) == pytest.approx(0.9)
    assert ema_decay_at(98, 0.99, True) == pytest.approx(1 - 1 / 99)
    assert ema_decay_at(99, 0.99, True) == pytest.approx(0.99)
    assert ema_decay_at(5000, 0.99, True) == pytest.approx(0.99)
    assert ema_decay_at(0, 0.99, False) == 0.99
