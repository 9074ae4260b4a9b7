"""The in-process extraction pipeline: every axial slice of the pending cases through the frozen
teacher, into the store.

Three things overlap so the teacher is the bottleneck: worker threads read and preprocess the
next cases (ISA-L inflation and MONAI resizing release the GIL), the teacher runs on batches of
slices that span case boundaries (one stream per core on a CPU: :mod:`stage1_extract.streams`),
and one writer thread compresses and writes finished cases. A case is marked complete only after
all its arrays are written, so a crash or a kill at any moment loses at most the cases in flight,
and a rerun resumes.

The single-case pieces the dask tasks (:mod:`stage1_extract.distributed`) share with it are
:class:`CaseInFlight`, :func:`case_meta`, :func:`store_case` and :func:`case_batch_plan`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinomix_cache.data.datasets import CaseSource, DatasetSpec
from dinomix_cache.data.preprocess import PreprocessedCase, load_case
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.teacher.model import Teacher
from stage1_extract.progress import ExtractionProgress
from stage1_extract.settings import ExtractSettings
from stage1_extract.streams import default_streams, streamed_forward
from stage1_extract.windows import WindowGeometry, slice_forward, window_geometry


def crop_window_geometry(settings: ExtractSettings, teacher: Teacher) -> WindowGeometry | None:
    """The crop windows ``settings.crop_windows`` asks for, on the teacher's token grid (None: none).

    Raises:
        UserError: windows that cannot lie on the token grid (see :func:`~stage1_extract.windows.window_geometry`).
    """
    if settings.crop_windows is None:
        return None
    slice_hw = tuple(settings.preprocess.target_shape[1:])
    input_hw = teacher.resolved_input_size(slice_hw)  # type: ignore[arg-type]
    return window_geometry(tuple(settings.crop_windows), slice_hw, input_hw, teacher.patch_size)  # type: ignore[arg-type]


@dataclass
class CaseInFlight:
    """A preprocessed case and its (D, h, w, C) float16 features (and, in a store with crop windows,
    its (D, ny, nx, h', w', C) window tokens), filled batch by batch."""

    case: PreprocessedCase
    source: CaseSource
    features: np.ndarray
    windows: np.ndarray | None = None

    @classmethod
    def allocate(cls, case: PreprocessedCase, source: CaseSource, grid: tuple[int, int, int],
                 geometry: WindowGeometry | None) -> CaseInFlight:
        """Empty arrays for the case's tokens: ``grid`` = (h, w, C) of a slice."""
        depth = case.image.shape[0]
        windows = None
        if geometry is not None:
            windows = np.empty((depth, *geometry.positions, *geometry.token_grid, grid[2]), dtype=np.float16)
        return cls(case, source, np.empty((depth, *grid), dtype=np.float16), windows)

    def fill(self, start: int, stop: int, tokens: tuple[torch.Tensor, torch.Tensor | None], row: int = 0) -> None:
        """Slices ``start:stop`` from rows ``row:row + stop - start`` of a batch's forward (see
        :func:`~stage1_extract.windows.slice_forward`)."""
        feats, windows = tokens
        self.features[start:stop] = feats[row:row + stop - start].numpy()
        if self.windows is not None and windows is not None:
            self.windows[start:stop] = windows[row:row + stop - start].numpy()


def _batches(
    loaded: Iterator[tuple[CaseSource, PreprocessedCase]], batch_size: int, grid: tuple[int, int, int],
    geometry: WindowGeometry | None = None,
) -> Iterator[tuple[list[tuple[CaseInFlight, int, int]], list[CaseInFlight]]]:
    """Yield (batch parts, cases finished once this batch is done), batches spanning cases.

    Each part is (case, start, stop): slices start:stop of that case. Every batch but the last
    holds exactly ``batch_size`` slices.
    """
    parts: list[tuple[CaseInFlight, int, int]] = []
    count = 0
    for source, case in loaded:
        depth = case.image.shape[0]
        state = CaseInFlight.allocate(case, source, grid, geometry)
        start = 0
        while start < depth:
            take = min(batch_size - count, depth - start)
            parts.append((state, start, start + take))
            count += take
            start += take
            if count == batch_size:
                yield parts, _finished(parts)
                parts, count = [], 0
    if parts:
        yield parts, _finished(parts)


def _finished(parts: list[tuple[CaseInFlight, int, int]]) -> list[CaseInFlight]:
    return [state for state, _, stop in parts if stop == state.case.image.shape[0]]


def case_batch_plan(offset: int, depth: int, total: int, batch_size: int) -> list[tuple[int, int, int, int]]:
    """Where a case's slices sit in the batches of :func:`_batches`, for computing it alone.

    The teacher's float32 output for a slice can differ in the last bit with the number of slices
    in its batch (matrix kernels are chosen by shape; measured with random:vits16 on CPU), though
    not with the other slices' content or its row. So a case computed alone is bit-identical to
    the in-process pipeline only in batches of the pipeline's sizes, at the pipeline's rows, the
    other rows padded.

    Args:
        offset: index of the case's first slice in the stream of all slices of the run's pending
            cases, in order (case index × depth, since preprocessing gives every case one depth).
        depth: the case's slices.
        total: slices of all pending cases.
        batch_size: the run's batch size.

    Returns:
        One (batch length, first row, start, stop) per batch touching the case: slices
        ``start:stop`` of the case go to rows ``first row:first row + stop - start`` of a batch of
        ``batch length`` slices.
    """
    if offset < 0 or offset + depth > total or batch_size < 1:
        raise ValueError(f"case slices {offset}:{offset + depth} outside a stream of {total} (batch {batch_size})")
    plan = []
    start, end = offset, offset + depth
    while start < end:
        first = start - start % batch_size
        length = min(batch_size, total - first)
        stop = min(end, first + length)
        plan.append((length, start - first, start - offset, stop - offset))
        start = stop
    return plan


def _read_ahead(
    cases: Sequence[CaseSource], load: Callable[[CaseSource], PreprocessedCase], pool: ThreadPoolExecutor,
    prefetch: int,
) -> Iterator[tuple[CaseSource, PreprocessedCase]]:
    """Load cases in order, keeping ``prefetch`` loads in flight on the pool."""
    queue: deque[tuple[CaseSource, Future[PreprocessedCase]]] = deque()
    todo = iter(cases)
    for _ in range(max(1, prefetch)):
        nxt = next(todo, None)
        if nxt is not None:
            queue.append((nxt, pool.submit(load, nxt)))
    while queue:
        source, future = queue.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            queue.append((nxt, pool.submit(load, nxt)))
        yield source, future.result()


def case_meta(state: CaseInFlight, spec: DatasetSpec) -> dict[str, Any]:
    """Per-case provenance written with the case: source hashes, geometry, role, class voxels."""
    source = dict(state.case.source)
    for key in ("image", "label"):
        if source.get(key):
            path = Path(source[key])
            source[key] = str(path.relative_to(spec.root)) if path.is_relative_to(spec.root) else str(path)
    provenance: dict[str, Any] = {"role": state.source.role, "source": source}
    if state.case.label is not None:
        counts = np.bincount(state.case.label.ravel(), minlength=len(spec.class_names))
        provenance["class_voxels"] = [int(v) for v in counts]
    return provenance


def store_case(store: FeatureStore, state: CaseInFlight, spec: DatasetSpec) -> str:
    """Write a computed case (its volumes too if the store keeps them), marked complete last.

    Only this case's arrays are written, so any number of writers may each write their own case.

    Returns:
        The case id.

    Raises:
        UserError: the write failed; the case stays incomplete.
    """
    case = state.case
    volumes = store.storage.volumes
    store.write_case(case.case_id, state.features, case.image if volumes else None,
                     case.label if volumes else None, case_meta(state, spec), windows=state.windows)
    return case.case_id


def extract_cases(
    store: FeatureStore,
    teacher: Teacher,
    spec: DatasetSpec,
    cases: Sequence[CaseSource],
    settings: ExtractSettings,
    progress: ExtractionProgress | None = None,
) -> tuple[int, float]:
    """Run the overlapped read → teacher → write pipeline over ``cases``.

    Returns:
        (slices computed, seconds from the first read to the last write).

    Raises:
        UserError: a case failed to read or write; cases finished before it stay complete.
    """
    slice_hw = tuple(settings.preprocess.target_shape[1:])
    grid = (*teacher.grid_shape(slice_hw), teacher.hidden_size)
    geometry = crop_window_geometry(settings, teacher)
    num_classes = len(spec.class_names)

    def load(source: CaseSource) -> PreprocessedCase:
        return load_case(source, settings.preprocess, num_classes)

    def write(state: CaseInFlight) -> str:
        return store_case(store, state, spec)

    slices = 0
    start = time.perf_counter()
    writes: deque[Future[str]] = deque()
    # Readers run torch single-threaded (the setting is per thread), so their small ops do not
    # oversubscribe the cores the teacher streams run on.
    with ThreadPoolExecutor(settings.read_threads, thread_name_prefix="read", initializer=torch.set_num_threads,
                            initargs=(1,)) as readers, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
        try:
            loaded = _read_ahead(cases, load, readers, settings.prefetch)
            batches = (((parts, finished), torch.from_numpy(np.concatenate([s.case.image[a:b] for s, a, b in parts])))
                       for parts, finished in _batches(loaded, settings.batch_size, grid, geometry))
            streams = settings.teacher_streams or default_streams(teacher)
            forward = slice_forward(teacher, geometry)
            for (parts, finished), out in streamed_forward(teacher, batches, streams, forward):
                offset = 0
                for state, a, b in parts:
                    state.fill(a, b, out, offset)
                    offset += b - a
                slices += offset
                if progress:
                    progress.advance_slices(offset)
                for state in finished:
                    writes.append(writer.submit(write, state))
                # Bound memory: at most two finished cases wait for the writer.
                while len(writes) > 2 or (writes and writes[0].done()):
                    done_id = writes.popleft().result()
                    if progress:
                        progress.case_done(done_id)
            while writes:
                done_id = writes.popleft().result()
                if progress:
                    progress.case_done(done_id)
        except BaseException:
            # Cases already computed are still written (nothing lost); reads in flight are dropped.
            readers.shutdown(wait=True, cancel_futures=True)
            for future in writes:
                if future.exception() is None and progress:
                    progress.case_done(future.result())
            raise
    return slices, time.perf_counter() - start
