"""``bench targets``: what each distillation target policy costs and how close it is to ``online``.

For ``no_fkd``, ``online``, ``cache`` and ``hybrid``, the same seeded training iterations are run
(the crops and PIC boxes do not depend on the policy, so every policy sees the same batches),
interleaved one step of each mode at a time, and the median step time is taken after a warm-up.
The targets each policy produced are then compared, untimed, with ``online`` targets for the very
same mixed crops: mean cosine per student cell.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from stage2_train.sampling import VolumeCache
from stage2_train.settings import TrainSettings
from stage2_train.targets import MixedCrop, TargetPolicy, cosine_fidelity, make_policy
from stage2_train.train import load_store_teacher, open_training_store
from stage2_train.trainer import DinoMixIteration, TrainState

MODES = ("no_fkd", "online", "cache", "hybrid")


class _Recorder:
    """A target policy that keeps what it was asked and what it answered."""

    def __init__(self, inner: TargetPolicy) -> None:
        self.inner = inner
        self.calls: list[tuple[list[MixedCrop], torch.Tensor, float]] = []

    def targets(self, items: Sequence[MixedCrop]) -> tuple[torch.Tensor, float]:
        out, fraction = self.inner.targets(items)
        self.calls.append((list(items), out, fraction))
        return out, fraction


def bench_targets(settings: TrainSettings, steps: int = 5, warmup: int = 1) -> dict[str, dict[str, float]]:
    """``{"no_fkd": {"step_s"}, "online": {"step_s", "cosine", "recomputed"}, "cache": ..., "hybrid": ...}``.

    Args:
        settings: training settings (preset, crop, width); ``targets`` and ``fkd`` are set per mode.
        steps: timed iterations per mode (after ``warmup`` untimed ones).
        warmup: untimed iterations per mode (the first fills the feature memory of ``cache``).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = open_training_store(settings)
    volumes = VolumeCache(store, store.complete_cases(), with_labels=True, data=settings.data)
    teacher = load_store_teacher(store, "online")
    reference = make_policy("online", store, volumes, teacher)
    runs: dict[str, tuple[DinoMixIteration, TrainState, _Recorder | None]] = {}
    for mode in MODES:
        run = replace(settings, fkd=mode != "no_fkd", targets=settings.targets if mode == "no_fkd" else mode)
        policy = None if mode == "no_fkd" else _Recorder(
            make_policy(mode, store, volumes, None if mode == "cache" else teacher))
        runs[mode] = (DinoMixIteration(run, store, volumes, policy, device),  # type: ignore[arg-type]
                      TrainState.seeded(settings.seed), policy)
    # Round robin, one step of each mode per round: the machine's drift (±10 % over minutes here)
    # then weighs on every mode alike instead of on whichever ran last.
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(warmup + steps):
        for mode, (iteration, state, _) in runs.items():
            start = time.perf_counter()
            iteration.step(state)
            times[mode].append(time.perf_counter() - start)
    result: dict[str, dict[str, float]] = {}
    for mode, (_, _, policy) in runs.items():
        entry = {"step_s": round(statistics.median(times[mode][warmup:]), 4)}
        if policy is not None:
            cosines = [cosine_fidelity(out, reference.targets(items)[0]) for items, out, _ in policy.calls]
            entry["cosine"] = round(sum(cosines) / len(cosines), 4)
            entry["recomputed"] = round(sum(f for _, _, f in policy.calls) / len(policy.calls), 4)
        result[mode] = entry
    return result
