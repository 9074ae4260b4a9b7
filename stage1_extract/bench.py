"""``bench extract``: end-to-end extraction throughput against the teacher's forward alone.

Both are measured in one process, on the same device and the same slices: the whole pipeline
(read NIfTI, preprocess, teacher, compress, write) into a temporary store, then the teacher alone
on the very slices that pipeline wrote, in the same batches. The pair is repeated and medians are
reported, since a shared machine's speed drifts by several percent from minute to minute. A ratio
near 1 means reading, preprocessing and writing hide behind the teacher.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dinomix_cache.data.preprocess import load_case
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.teacher.model import Teacher, load_teacher
from stage1_extract.pipeline import extract_cases
from stage1_extract.runner import open_or_create_store, prepare_dataset, store_meta
from stage1_extract.settings import ExtractSettings
from stage1_extract.streams import default_streams, streamed_forward


def _teacher_only(teacher: Teacher, images: np.ndarray, batch_size: int, streams: int) -> float:
    """Seconds for the teacher's forward over ``images`` (N, H, W), batch by batch, on the same
    streams as the extraction."""
    batches = ((i, torch.from_numpy(images[i:i + batch_size])) for i in range(0, len(images), batch_size))
    start = time.perf_counter()
    for _ in streamed_forward(teacher, batches, streams):
        pass
    return time.perf_counter() - start


def bench_extract(settings: ExtractSettings, max_cases: int = 8, repeats: int = 3) -> dict[str, object]:
    """Measure ``{"slices_per_s_end_to_end", "slices_per_s_teacher_only", "ratio", ...}``.

    Args:
        settings: as for extract; ``out`` is ignored (a temporary store is used).
        max_cases: how many cases of the dataset to run (the first ones in id order).
        repeats: how many (end-to-end, teacher-only) pairs to run; medians are reported.

    Returns:
        Median throughputs in slices per second, their ratio, each repeat's numbers, and what was
        measured (teacher, device, dtype, batch size, threads).
    """
    settings = settings.resolved()
    spec = prepare_dataset(settings, progress=settings.progress)
    cases = list(spec.cases[:max_cases])
    teacher = load_teacher(settings.teacher)
    settings = replace(settings, teacher=teacher.settings, progress=False)
    hw = settings.preprocess.target_shape[1:]
    # First-call costs (allocations, kernel choice, the readers' lazy imports) stay out of the timings.
    teacher.forward_slices(torch.rand(min(settings.batch_size, 8), *teacher.resolved_input_size(hw)))
    load_case(cases[0], settings.preprocess, len(spec.class_names))
    streams = settings.teacher_streams or default_streams(teacher)
    end_to_end, alone = [], []
    with tempfile.TemporaryDirectory(prefix="dinomix-bench-") as tmp:
        for i in range(max(1, repeats)):
            run = replace(settings, out=Path(tmp) / f"bench{i}.zarr", overwrite=True)
            store = open_or_create_store(run, store_meta(run, spec, teacher))
            slices, seconds = extract_cases(store, teacher, spec, cases, run)
            end_to_end.append(slices / seconds)
            store = FeatureStore.open(run.out)
            images = np.concatenate([store.read_volume(c.case_id, "image") for c in cases])
            alone.append(len(images) / _teacher_only(teacher, images, settings.batch_size, streams))
    e2e, only = statistics.median(end_to_end), statistics.median(alone)
    return {
        "slices_per_s_end_to_end": round(e2e, 3),
        "slices_per_s_teacher_only": round(only, 3),
        "ratio": round(e2e / only, 4),
        "ratios": [round(a / b, 4) for a, b in zip(end_to_end, alone, strict=True)],
        "cases": len(cases),
        "slices": slices,
        "repeats": len(end_to_end),
        "teacher": teacher.describe(),
        "device": str(teacher.device),
        "dtype": settings.teacher.dtype,
        "batch_size": settings.batch_size,
        "torch_threads": torch.get_num_threads(),
        "teacher_streams": streams,
    }
