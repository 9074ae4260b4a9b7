"""One DINO-Mix iteration: paired random draws across ablation switches, the weights in force."""

from __future__ import annotations

import math

import pytest
import torch

from stage2_train.method.iteration import DinoMixIteration
from stage2_train.method.pic import PicSettings
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.train.loop import open_training_store
from stage2_train.train.state import TrainState
from tests.tiny import tiny_train


def drawn(store_path, steps: int, **changes) -> tuple[list, list[torch.Tensor]]:
    """The crops (case, offset) of ``steps`` iterations, in order, and the strong views' gamma inputs."""
    settings = tiny_train(store_path, None, epochs=8, **changes)
    store = open_training_store(settings)
    try:
        volumes = VolumeCache(store, store.complete_cases(), with_labels=True)
        iteration = DinoMixIteration(settings, store, volumes, None, torch.device("cpu"))
        crops: list = []
        original = iteration._crops

        def recording(ids, rng):
            out = original(ids, rng)
            crops.extend((c.case_id, c.offset) for c in out)
            return out

        iteration._crops = recording  # type: ignore[method-assign]
        state = TrainState.seeded(settings.seed)
        lambdas = []
        for _ in range(steps):
            lambdas.append(iteration.step(state)["total"])
        return crops, lambdas
    finally:
        store.close()


def test_runs_differing_by_a_switch_draw_identical_crops(wide_store):
    base, _ = drawn(wide_store, 4)
    no_pic, _ = drawn(wide_store, 4, pic=PicSettings(enabled=False))
    no_aux, _ = drawn(wide_store, 4, aux=False)
    assert len(base) == 4 * 4  # 2 labeled (one case, repeated) and 2 unlabeled crops an iteration
    assert no_pic == base and no_aux == base
    labeled_only, _ = drawn(wide_store, 4, labeled_only=True)
    labeled = [c for c in base if c[0] in {c0 for c0, _ in labeled_only}]
    assert labeled_only == labeled[: len(labeled_only)]  # the labeled crops, without the unlabeled ones
    other_seed, _ = drawn(wide_store, 4, seed=1)
    assert other_seed != base


def test_step_logs_the_weights_in_force_and_the_ema_warms_up(wide_store):
    settings = tiny_train(wide_store, None, epochs=2)
    store = open_training_store(settings)
    try:
        volumes = VolumeCache(store, store.complete_cases(), with_labels=True)
        iteration = DinoMixIteration(settings, store, volumes, None, torch.device("cpu"))
        state = TrainState.seeded(0)
        first = iteration.step(state)  # 1 iteration an epoch, 2 in the run
        params = lambda m: {k: v.detach().clone() for k, v in m.named_parameters()}  # noqa: E731
        ema_1, student_1 = params(iteration.ema.module), params(iteration.student)
        second = iteration.step(state)
        ema_2, student_2 = params(iteration.ema.module), params(iteration.student)
    finally:
        store.close()
    assert first["lambda_unsup"] == pytest.approx(0.5 * math.exp(-5))  # step 0 of 2
    assert second["lambda_unsup"] == pytest.approx(0.5 * math.exp(-5 * 0.25))  # half-way
    assert first["ema_decay"] == 0.0 and second["ema_decay"] == pytest.approx(0.5)
    for k in ema_1:  # decay 0: the EMA is the student after its first step; then the mean of the two
        assert torch.equal(ema_1[k], student_1[k]), k
        torch.testing.assert_close(ema_2[k], 0.5 * ema_1[k] + 0.5 * student_2[k])
