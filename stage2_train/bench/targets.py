"""``bench targets``: what each distillation target policy costs and how close it is to ``online``.

For ``no_fkd``, ``online``, ``cache`` and ``hybrid``, the same seeded training iterations are run
(the crops and PIC boxes do not depend on the policy, so every policy sees the same batches),
interleaved one step of each mode at a time, and the median step time is taken after a warm-up.
The targets each policy produced are then compared, untimed, with ``online`` targets of the run's
teacher view for the very same mixed crops (mean cosine per student cell); the two views' online
targets are compared with each other (the cross-view figure); and the teacher's context cosine
(:func:`~stage2_train.targets.fidelity.context_cosine`) says whether the fidelity figures can mean anything.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from stage2_train.method.iteration import DinoMixIteration, TrainState
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.targets.fidelity import context_cosine, cosine_fidelity
from stage2_train.targets.policies import POLICIES, MixedCrop, TargetPolicy, make_policy
from stage2_train.train.loop import load_store_teacher, open_training_store
from stage2_train.train.settings import TrainSettings

MODES = ("no_fkd", *POLICIES)


class _Recorder:
    """A target policy that keeps what it was asked and what it answered."""

    def __init__(self, inner: TargetPolicy) -> None:
        self.inner = inner
        self.calls: list[tuple[list[MixedCrop], torch.Tensor, float]] = []

    def targets(self, items: Sequence[MixedCrop]) -> tuple[torch.Tensor, float]:
        out, fraction = self.inner.targets(items)
        self.calls.append((list(items), out, fraction))
        return out, fraction


def bench_targets(settings: TrainSettings, steps: int = 5, warmup: int = 1) -> dict[str, object]:
    """``{"teacher": {...}, "view": ..., "no_fkd": {"step_s"}, "online": {"step_s", "cosine", "recomputed"},
    "cache": ..., "hybrid": ..., "cross_view": {"cosine"}}``.

    Args:
        settings: training settings (preset, crop, width, teacher view); ``targets`` and ``fkd`` are
            set per mode.
        steps: timed iterations per mode (after ``warmup`` untimed ones).
        warmup: untimed iterations per mode (the first fills the feature memory of ``cache``).

    Raises:
        UserError: the store's teacher cannot be loaded, or the crop view on a store without
            matching crop windows.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = open_training_store(settings)
    volumes = VolumeCache(store, store.complete_cases(), with_labels=True, data=settings.data)
    teacher = load_store_teacher(store, "online")
    view = settings.teacher_view
    references = {v: make_policy("online", store, volumes, teacher, view=v) for v in ("slice", "crop")}
    runs: dict[str, tuple[DinoMixIteration, TrainState, _Recorder | None]] = {}
    for mode in MODES:
        run = replace(settings, fkd=mode != "no_fkd", targets=settings.targets if mode == "no_fkd" else mode)
        policy = None if mode == "no_fkd" else _Recorder(
            make_policy(mode, store, volumes, None if mode == "cache" else teacher, view=view))
        runs[mode] = (DinoMixIteration(run, store, volumes, policy, device),  # type: ignore[arg-type]
                      TrainState.seeded(settings.seed), policy)
    # Round robin, one step of each mode per round: the machine's speed drifts over minutes, and the
    # drift then weighs on every mode alike instead of on whichever ran last.
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(warmup + steps):
        for mode, (iteration, state, _) in runs.items():
            start = time.perf_counter()
            iteration.step(state)
            times[mode].append(time.perf_counter() - start)
    cases = volumes.case_ids[:2]
    sample = [volumes.image(c)[volumes.shape(c)[0] // 2 - 2: volumes.shape(c)[0] // 2 + 2] for c in cases]
    result: dict[str, object] = {
        "teacher": {"source": teacher.settings.source, "label": teacher.label,
                    "context_cosine": round(context_cosine(teacher, np.concatenate(sample)), 4)},
        "view": view,
    }
    # Every mode saw the same batches: each reference is computed once per batch (keyed by its crops).
    memo: dict[tuple[str, str], torch.Tensor] = {}

    def reference(which: str, items: list[MixedCrop]) -> torch.Tensor:
        key = (which, repr(items))
        if key not in memo:
            memo[key] = references[which].targets(items)[0]
        return memo[key]

    for mode, (_, _, policy) in runs.items():
        entry = {"step_s": round(statistics.median(times[mode][warmup:]), 4)}
        if policy is not None:
            cosines = [cosine_fidelity(out, reference(view, items)) for items, out, _ in policy.calls]
            entry["cosine"] = round(sum(cosines) / len(cosines), 4)
            entry["recomputed"] = round(sum(f for _, _, f in policy.calls) / len(policy.calls), 4)
        result[mode] = entry
    calls = runs["online"][2].calls  # type: ignore[union-attr]
    cross = [cosine_fidelity(reference("slice", items), reference("crop", items)) for items, _, _ in calls]
    result["cross_view"] = {"cosine": round(sum(cross) / len(cross), 4)}
    return result
