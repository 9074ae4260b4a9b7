"""``bench extract``: end-to-end extraction throughput against the teacher's forward alone.

Both are measured in one process, on the same device and the same slices: first the whole
pipeline (read NIfTI, preprocess, teacher, compress, write) into a temporary store, then the
teacher alone on the very slices that pipeline wrote, in the same batches. A ratio near 1 means
reading, preprocessing and writing hide behind the teacher.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dinomix_cache.preprocess import load_case
from dinomix_cache.store import FeatureStore
from stage1_extract.runner import extract_cases, open_or_create_store, prepare_dataset, store_meta
from stage1_extract.settings import ExtractSettings
from stage1_extract.teacher import load_teacher


def bench_extract(settings: ExtractSettings, max_cases: int = 8) -> dict[str, float]:
    """Measure ``{"slices_per_s_end_to_end", "slices_per_s_teacher_only", "ratio", ...}``.

    Args:
        settings: as for extract; ``out`` is ignored (a temporary store is used).
        max_cases: how many cases of the dataset to run (the first ones in id order).

    Returns:
        Throughputs in slices per second, their ratio, and what was measured.
    """
    settings = settings.resolved()
    spec = prepare_dataset(settings, progress=settings.progress)
    cases = list(spec.cases[:max_cases])
    teacher = load_teacher(settings.teacher)
    settings = replace(settings, teacher=teacher.settings, progress=False)
    hw = settings.preprocess.target_shape[1:]
    warm = torch.rand(min(settings.batch_size, 8), *teacher.resolved_input_size(hw))
    teacher.forward_slices(warm)  # first-call allocations and kernel selection stay out of both timings
    load_case(cases[0], settings.preprocess, len(spec.class_names))  # so do the readers' lazy imports
    with tempfile.TemporaryDirectory(prefix="dinomix-bench-") as tmp:
        out = Path(tmp) / "bench.zarr"
        run = replace(settings, out=out, overwrite=True)
        store = open_or_create_store(run, store_meta(run, spec, teacher))
        slices, end_to_end_s = extract_cases(store, teacher, spec, cases, run)
        store = FeatureStore.open(out)
        images = np.concatenate([store.read_volume(c.case_id, "image") for c in cases])
    batches = [torch.from_numpy(images[i:i + settings.batch_size]) for i in range(0, len(images), settings.batch_size)]
    start = time.perf_counter()
    for batch in batches:
        teacher.forward_slices(batch.float())
    teacher_s = time.perf_counter() - start
    e2e, alone = slices / end_to_end_s, len(images) / teacher_s
    return {
        "slices_per_s_end_to_end": round(e2e, 3),
        "slices_per_s_teacher_only": round(alone, 3),
        "ratio": round(e2e / alone, 4),
        "cases": len(cases),
        "slices": slices,
        "teacher": teacher.describe(),
        "device": str(teacher.device),
        "dtype": settings.teacher.dtype,
        "batch_size": settings.batch_size,
        "torch_threads": torch.get_num_threads(),
    }
