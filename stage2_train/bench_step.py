"""``bench step``: the time of one training iteration of a preset, float32 against the run's resolved path.

Two iterations of the same preset are built on the same store and seed: ``float32`` (float32 forwards,
contiguous tensors: what every run used before precision and memory format were resolved per
machine) and ``auto`` (the precision and memory format ``train`` resolves on this machine, e.g. bf16
autocast with channels-last on a CPU with native bf16). They see the same batches and are stepped
alternately, one step each per round, so that the machine's drift weighs on both alike; the median
and the spread (min, max) of the timed steps are reported, and their ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from stage2_train.sampling import VolumeCache
from stage2_train.settings import TrainSettings
from stage2_train.train import load_policy, open_training_store
from stage2_train.trainer import DinoMixIteration, TrainState

VARIANTS = ("float32", "auto")


def bench_step(settings: TrainSettings, steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """``{"preset": {width, crop, batch, targets}, "float32": {...}, "auto": {...}, "speedup": x}``, each
    variant with its resolved ``precision``, ``memory_format`` and ``step_s`` (median), ``min_s``, ``max_s``.

    Args:
        settings: the training settings to time (a preset, possibly changed); ``precision`` and
            ``memory_format`` are set per variant.
        steps: timed iterations per variant, after ``warmup`` untimed rounds.
        warmup: untimed rounds (the first one allocates, fills caches and loads the teacher's weights).

    Raises:
        UserError: the store cannot be trained from with these settings (crop larger than its
            volumes, a teacher that cannot be loaded for ``online``/``hybrid``, ...).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = open_training_store(settings)
    volumes = VolumeCache(store, store.complete_cases(), with_labels=True, data=settings.data)
    runs: dict[str, tuple[DinoMixIteration, TrainState, TrainSettings]] = {}
    for variant in VARIANTS:
        wanted = settings if variant == "auto" else replace(settings, precision="float32", memory_format="contiguous")
        resolved = wanted.resolved(device)
        policy = load_policy(resolved, store, volumes)
        runs[variant] = (DinoMixIteration(resolved, store, volumes, policy, device), TrainState.seeded(settings.seed),
                         resolved)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(warmup + steps):
        for variant, (iteration, state, _) in runs.items():
            start = time.perf_counter()
            iteration.step(state)
            times[variant].append(time.perf_counter() - start)
    result: dict[str, Any] = {"preset": {"width": settings.width, "crop": list(settings.crop),
                                         "batch": settings.batch, "targets": settings.targets,
                                         "normalization": settings.normalization, "device": str(device)}}
    for variant, (_, _, resolved) in runs.items():
        timed = times[variant][warmup:]
        result[variant] = {"precision": resolved.precision, "memory_format": resolved.memory_format,
                           "step_s": round(statistics.median(timed), 4), "min_s": round(min(timed), 4),
                           "max_s": round(max(timed), 4)}
    result["speedup"] = round(result["float32"]["step_s"] / result["auto"]["step_s"], 3)
    return result
