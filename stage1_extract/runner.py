"""The extraction runner: every axial slice of every case through the frozen teacher, into the store.

Three things overlap so the teacher is the bottleneck: worker threads read and preprocess the
next cases (ISA-L inflation and MONAI resizing release the GIL), the teacher runs on batches of
slices that span case boundaries (one stream per core on a CPU: :mod:`stage1_extract.streams`),
and one writer thread compresses and writes finished cases. A case is marked complete only after
all its arrays are written, so a crash or a kill at any moment loses at most the cases in flight,
and a rerun resumes.

With ``workers`` or ``scheduler`` set, the cases run as tasks on a ``dask.distributed`` cluster
instead (:mod:`stage1_extract.distributed`); everything else here (discovery, the lock, the group
attributes, statistics) stays in this process. The single-case pieces both paths share are
:func:`case_meta`, :func:`store_case` and :func:`case_batch_plan`.
"""

from __future__ import annotations

import logging
import platform
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dinomix_cache
from dinomix_cache.data.datasets import CaseSource, DatasetSpec, discover_dataset
from dinomix_cache.data.preprocess import PreprocessedCase, load_case
from dinomix_cache.errors import UserError
from dinomix_cache.phantom.generate import generate_phantom
from dinomix_cache.settings_codec import settings_to_json
from dinomix_cache.store.feature_store import FeatureStore, is_store, remove_store
from dinomix_cache.store.lock import StoreLock
from dinomix_cache.teacher.model import Teacher, load_teacher
from stage1_extract.progress import ExtractionProgress
from stage1_extract.settings import ExtractSettings
from stage1_extract.streams import default_streams, streamed_forward
from stage1_extract.windows import WindowGeometry, slice_forward, window_geometry

log = logging.getLogger("dinomix_cache.extract")


@dataclass
class ExtractionReport:
    """What a run did: cases computed and skipped, slices, seconds in the slice pipeline."""

    store: Path
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    slices: int = 0
    seconds: float = 0.0
    complete: bool = False

    @property
    def slices_per_s(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0


def prepare_dataset(settings: ExtractSettings, progress: bool = True) -> DatasetSpec:
    """Discover the dataset; the phantom is generated under ``settings.data`` on first use."""
    settings = settings.resolved()
    assert settings.data is not None
    if settings.dataset == "phantom":
        generate_phantom(settings.data, settings.phantom, progress=progress)
    return discover_dataset(settings.dataset, settings.data, settings.split)


def producer_meta() -> dict[str, Any]:
    """Versions of what produced a store; no host names."""
    import numcodecs
    import transformers
    import zarr

    return {
        "package": "dinomix-cache",
        "version": dinomix_cache.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


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


def store_meta(settings: ExtractSettings, spec: DatasetSpec, teacher: Teacher) -> dict[str, Any]:
    """The ``dinomix`` attribute of a new store (everything that changes feature values)."""
    slice_hw = tuple(settings.preprocess.target_shape[1:])
    cases = [{"id": c.case_id, "role": c.role} for c in spec.cases]
    geometry = crop_window_geometry(settings, teacher)
    return {
        "crop_windows": None if geometry is None else geometry.to_json(),
        "teacher": teacher.identity(slice_hw),
        "preprocessing": settings.preprocess.to_json(),
        "dataset": {
            "name": spec.name,
            "class_names": list(spec.class_names),
            "split": spec.split,
            "cases": cases,
        },
        "storage": settings_to_json(settings.storage),
        "producer": producer_meta(),
        "extraction": {"complete": False, "settings": settings_to_json(settings)},
    }


# Fields whose disagreement makes an existing store unusable for this run.
_MATCHED = (("teacher", None), ("preprocessing", None), ("storage", None),
            ("dataset", "name"), ("dataset", "class_names"), ("dataset", "cases"))


def meta_mismatches(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of fields that differ between a store's attributes and this run's, e.g.
    ``teacher.input_size: store [160, 160], requested [128, 128]``."""
    problems = []
    for section, key in _MATCHED:
        old, new = existing.get(section, {}), wanted[section]
        keys = [key] if key else sorted(set(old) | set(new))
        for k in keys:
            a, b = old.get(k), new.get(k)
            if k == "cases":  # finalize adds hashes to each entry; only ids and roles must agree
                a, b = ([(c.get("id"), c.get("role")) for c in v or []] for v in (a, b))
            if a != b:
                shown = ("(differs)" if k == "cases" else f"store {old.get(k)!r}, requested {new.get(k)!r}")
                problems.append(f"{section}.{k}: {shown}")
    old_windows, new_windows = existing.get("crop_windows"), wanted.get("crop_windows")
    if old_windows != new_windows:
        problems.append(f"crop_windows: store {old_windows!r}, requested {new_windows!r}")
    return problems


def open_or_create_store(settings: ExtractSettings, meta: dict[str, Any]) -> FeatureStore:
    """Open ``settings.out`` for appending if it matches ``meta``, else create it.

    Raises:
        UserError: the path holds something else, or a store made with other settings
            (``--overwrite`` rebuilds it).
    """
    out = settings.out
    assert out is not None
    if out.exists() and settings.overwrite:
        remove_store(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not is_store(out):
            raise UserError(f"{out} exists and is not a dinomix feature store; choose another --out")
        # Compare read-only first: opening to write drops the consolidated metadata, and a refused
        # store must stay byte-identical.
        problems = meta_mismatches(FeatureStore.open(out).meta, meta)
        if problems:
            raise UserError(
                f"{out} was made with other settings ({'; '.join(problems)}); refusing to append. "
                "Use --overwrite to rebuild it, or another --out"
            )
        return FeatureStore.open(out, mode="r+")
    return FeatureStore.create(out, meta)


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
    meta: dict[str, Any] = {"role": state.source.role, "source": source}
    if state.case.label is not None:
        counts = np.bincount(state.case.label.ravel(), minlength=len(spec.class_names))
        meta["class_voxels"] = [int(v) for v in counts]
    return meta


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


def finalize_store(store: FeatureStore, spec: DatasetSpec) -> bool:
    """Write statistics and per-case hashes into the group attributes once all cases are complete,
    then consolidate the metadata (a later ``extract`` opening the store to write drops that copy).

    Returns:
        True if every case of the dataset is complete (the store is then marked complete).
    """
    cases = []
    totals = np.zeros(len(spec.class_names), dtype=np.int64)
    all_complete = True
    for entry in store.meta["dataset"]["cases"]:
        attrs = store.case_attrs(entry["id"])
        if not (attrs and attrs.get("complete")):
            all_complete = False
            cases.append({"id": entry["id"], "role": entry["role"]})
            continue
        src = attrs.get("source", {})
        cases.append({"id": entry["id"], "role": entry["role"], "image_sha256": src.get("image_sha256"),
                      "label_sha256": src.get("label_sha256")})
        if entry["role"] == "labeled" and "class_voxels" in attrs:
            totals += np.asarray(attrs["class_voxels"], dtype=np.int64)
    dataset = {**store.meta["dataset"], "cases": cases}
    extraction = {**store.meta["extraction"], "complete": all_complete}
    if all_complete:
        store.write_class_voxels(totals)
        extraction["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    store.update_meta(dataset=dataset, extraction=extraction)
    if all_complete:
        store.consolidate()  # one request opens the finished store and all its cases (over HTTP too)
    return all_complete


def run_extraction(settings: ExtractSettings, teacher: Teacher | None = None,
                   client: Any | None = None) -> ExtractionReport:
    """``dinomix-cache extract``: build or resume a feature store.

    Order matters for "nothing written on bad input": the dataset is discovered, the teacher
    loaded and the cluster reached (all may fail) before the store is locked, opened or created.

    Args:
        settings: what to extract; ``workers`` / ``scheduler`` choose a dask cluster.
        teacher: an already loaded teacher (else loaded from ``settings.teacher``). On a cluster
            it only supplies the store's teacher identity; the workers load their own.
        client: a connected ``distributed.Client`` to run the cases on, instead of the cluster
            ``settings`` names (e.g. one cluster shared by several extractions).

    Raises:
        UserError: bad data, a teacher that cannot be loaded, an unreachable cluster, an
            incompatible or foreign store, a store locked by another extraction, or a failed write.
    """
    settings = settings.resolved()
    assert settings.out is not None
    on_cluster = settings.distributed or client is not None
    spec = prepare_dataset(settings, progress=settings.progress)
    wanted = spec.cases
    if settings.cases:
        known = {c.case_id for c in spec.cases}
        unknown = [c for c in settings.cases if c not in known]
        if unknown:
            raise UserError(f"--cases {' '.join(unknown)}: not in dataset {spec.name} at {spec.root}")
        wanted = tuple(c for c in spec.cases if c.case_id in settings.cases)
    if teacher is None:
        # On a cluster the client needs the teacher's identity only (for the store's attributes):
        # it loads it on the CPU and leaves the GPU to the workers; the requested device is recorded.
        teacher = load_teacher(replace(settings.teacher, device="cpu") if on_cluster else settings.teacher)
    else:
        settings = replace(settings, teacher=teacher.settings)
    slice_hw = tuple(settings.preprocess.target_shape[1:])
    teacher.resolved_input_size(slice_hw)
    meta = store_meta(settings, spec, teacher)

    report = ExtractionReport(store=settings.out)
    with ExitStack() as stack:
        described = teacher.describe()
        if on_cluster:
            from stage1_extract import distributed as dist

            if client is None:
                client = stack.enter_context(dist.cluster_client(settings))
            described = f"{described.rsplit(' on ', 1)[0]} on {dist.describe_cluster(client, settings)}"
            dist.warm_up(client, settings, meta["teacher"])
        stack.enter_context(StoreLock(settings.out))
        store = open_or_create_store(settings, meta)
        pending = [c for c in wanted if not store.is_complete(c.case_id)]
        report.skipped = [c.case_id for c in wanted if store.is_complete(c.case_id)]
        log.info("teacher %s; store %s", described, settings.out)
        log.info("%d case(s) complete and skipped; extracting %d: %s", len(report.skipped), len(pending),
                 " ".join(c.case_id for c in pending) or "-")
        depth = settings.preprocess.target_shape[0]
        with ExtractionProgress(len(pending), len(pending) * depth, described, enabled=settings.progress) as progress:
            if on_cluster:
                report.slices, report.seconds = dist.extract_cases_distributed(
                    client, spec, pending, settings, meta["teacher"], progress)
            else:
                report.slices, report.seconds = extract_cases(store, teacher, spec, pending, settings, progress)
        report.computed = [c.case_id for c in pending]
        report.complete = finalize_store(store, spec)
    return report
