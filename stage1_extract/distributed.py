"""Stage one on a ``dask.distributed`` cluster: one task per pending case.

The client (the ``extract`` process, :func:`stage1_extract.runner.run_extraction`) discovers the
dataset, takes the store lock, creates the store and writes the group attributes, then submits
one :func:`extract_one_case` task per pending case. A task preprocesses its case, runs the teacher
and writes that case's arrays only (chunks never span cases, so no two writers share a file);
the client writes statistics and marks the store complete after the last task, as in-process.

- ``--workers N`` starts a local cluster of N worker *processes* with one thread each: the teacher
  forward and preprocessing hold the GIL between torch calls, and torch's intra-op pools of
  several threads in one process contend, so processes scale where threads do not. Each task sets
  its torch threads to its share of the host's cores (cores / task slots on that host).
- ``--scheduler ADDRESS`` uses a running cluster. Its workers must see ``--data``, ``--out`` and
  the teacher (hub cache or directory) at the same paths. Start them with ``--nthreads 1``; for
  GPU extraction (``--device cuda``, or ``auto`` where the client sees CUDA) with
  ``--resources GPU=1`` too, one worker per GPU: tasks then claim the ``GPU`` resource.

Results are bit-identical to the in-process pipeline (features, volumes, statistics,
attributes; tested on CPU): each task reproduces the pipeline's batch sizes and rows for its case
(:func:`~stage1_extract.pipeline.case_batch_plan`), zeros in the rows of neighbouring cases, and
runs single-threaded forwards as the pipeline does on a CPU with the default ``teacher_streams``.
The padding costs up to two extra batches per case, none when ``batch_size`` divides the depth
(e.g. 16 or 40 for 80 slices). On a CPU a task has only as many parallel forwards as its case has
batches, so many single-threaded workers (one per core) beat few wide ones.

Failures: a task that dies with its worker is rerun by the scheduler, one that raises is retried
twice (``retries=2``); a half-written case is simply overwritten, since a case is complete only
once its last attribute is written. A task's :class:`~dinomix_cache.errors.UserError` (a bad file,
a full disk) comes back as a value, so it is not retried: the client cancels the queued tasks,
waits for the running ones (their cases are kept), and raises the message.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import KilledWorker, as_completed, get_worker
from distributed.comm import get_address_host

from dinomix_cache.data.datasets import CaseSource, DatasetSpec
from dinomix_cache.data.preprocess import load_case
from dinomix_cache.errors import UserError
from dinomix_cache.settings_codec import settings_to_json
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.teacher.model import Teacher, TeacherSettings, load_teacher
from stage1_extract.cluster import slots_by_host, wants_gpu
from stage1_extract.pipeline import CaseInFlight, case_batch_plan, crop_window_geometry, store_case
from stage1_extract.progress import ExtractionProgress
from stage1_extract.settings import ExtractSettings
from stage1_extract.streams import default_streams, streamed_forward
from stage1_extract.windows import slice_forward

log = logging.getLogger("dinomix_cache.extract")

# Per worker process: (teacher settings, slice size) as JSON -> (teacher, its identity). A worker
# loads its teacher once and reuses it for every case; one entry at most, so a long-lived worker
# serving runs with other teachers holds one model, not all of them.
_TEACHERS: dict[str, tuple[Teacher, dict[str, Any]]] = {}


@dataclass(frozen=True)
class RunContext:
    """What every task of one run needs (pickled to the workers).

    Attributes:
        settings: the run's settings (teacher device as requested, not as the client loaded it).
        spec: the dataset, with absolute paths so workers need not share the client's directory.
        store: absolute path of the store.
        identity: the store's ``teacher`` attribute; a worker whose teacher differs refuses.
        total: slices of all pending cases (for the batch layout).
        slots: task slots (worker threads) per host, to share a host's cores among its tasks.
    """

    settings: ExtractSettings
    spec: DatasetSpec
    store: str
    identity: dict[str, Any]
    total: int
    slots: dict[str, int]


def _absolute(spec: DatasetSpec) -> DatasetSpec:
    # absolute() rather than resolve(): following a symlinked file out of the root would change
    # the relative source path recorded in the case's attributes.
    cases = tuple(replace(c, image=Path(c.image).absolute(),
                          label=None if c.label is None else Path(c.label).absolute()) for c in spec.cases)
    return replace(spec, root=Path(spec.root).absolute(), cases=cases)


def extract_cases_distributed(
    client: Any,
    spec: DatasetSpec,
    cases: Sequence[CaseSource],
    settings: ExtractSettings,
    identity: dict[str, Any],
    progress: ExtractionProgress | None = None,
) -> tuple[int, float]:
    """Run one task per case of ``cases`` on ``client``'s cluster; each task writes its own case
    into the store at ``settings.out`` (created, its group attributes written, by the caller).

    Args:
        client: a connected ``distributed.Client``.
        spec: the dataset; cases: the pending cases, in the in-process pipeline's order.
        settings: the run's settings; identity: the store's ``teacher`` attribute.
        progress: advanced by a case's slices when its task finishes.

    Returns:
        (slices computed, seconds from the first case submitted to the last case written; the
        teacher loads before, in :func:`warm_up`, as it does before the in-process pipeline).

    Raises:
        UserError: a task's UserError (bad file, failed write, other teacher) or a case whose
            worker kept dying; cases finished before it stay complete.
    """
    if not cases:
        return 0, 0.0
    depth = settings.preprocess.target_shape[0]
    assert settings.out is not None
    context = RunContext(settings=settings, spec=_absolute(spec), store=str(Path(settings.out).absolute()),
                         identity=identity, total=depth * len(cases), slots=slots_by_host(client))
    by_id = {c.case_id: c for c in context.spec.cases}
    # A fresh token per run: a rerun on the same cluster never joins a task of a cancelled run.
    token = uuid.uuid4().hex[:12]
    resources = {"GPU": 1} if wants_gpu(settings.teacher.device) else None
    futures: dict[Any, str] = {}
    start = time.perf_counter()
    try:
        futures = {
            client.submit(extract_one_case, context, by_id[source.case_id], index * depth,
                          key=f"extract-{source.case_id}-{token}", pure=False, retries=2, resources=resources):
            source.case_id
            for index, source in enumerate(cases)
        }
        slices = forwarded = 0
        for future in as_completed(futures, loop=client.loop):
            case_id = futures[future]
            try:
                result = future.result()
            except KilledWorker as exc:
                raise UserError(f"case {case_id}: its worker died every time it ran it ({exc}); out of memory? "
                                "Complete cases are kept; rerun to resume") from None
            if "error" in result:
                raise UserError(" ".join(result["error"].split()))
            slices += result["slices"]
            forwarded += result["forwarded"]
            log.debug("case %s: %d slices in %.2f s on %s", case_id, result["slices"], result["seconds"],
                      result["worker"])
            if progress:
                progress.advance_slices(result["slices"])
                progress.case_done(case_id)
    except Exception:
        client.cancel(list(futures))
        _wait_for_running(client, token)
        raise
    except BaseException:  # Ctrl-C: stop queued cases, do not wait for running ones
        client.cancel(list(futures))
        raise
    log.debug("teacher forwards: %d slices for %d (the in-process batch layout)", forwarded, slices)
    return slices, time.perf_counter() - start


def warm_up(client: Any, settings: ExtractSettings, identity: dict[str, Any]) -> None:
    """Load the teacher on every worker, before the store is touched and before the clock starts.

    A worker that cannot load the teacher (no CUDA, no weights) or loads another one then fails
    the run before anything is written, as a bad teacher does in-process; and the reported speed
    is the extraction's, the teacher load coming before it as in-process.

    Raises:
        UserError: a worker's teacher failed to load or differs from ``identity``; the teacher
            runs on CUDA but no worker offers a ``GPU`` resource (its tasks would wait forever).
    """
    info = client.scheduler_info(n_workers=-1)["workers"]
    if not info:
        log.info("no dask worker connected yet; the cases wait for workers to join")
        return
    resources = {"GPU": 1} if wants_gpu(settings.teacher.device) else None
    if resources and not any((w.get("resources") or {}).get("GPU") for w in info.values()):
        raise UserError(f"--device {settings.teacher.device}: no dask worker offers a GPU resource, so no case "
                        "could run; start the workers with `dask worker ADDRESS --nthreads 1 --resources GPU=1`, "
                        "or pass --device cpu")
    workers = list(info)
    start = time.perf_counter()
    token = uuid.uuid4().hex[:12]
    slice_hw = tuple(settings.preprocess.target_shape[1:])
    # allow_other_workers: a worker that leaves must not strand its warm-up task.
    futures = [client.submit(_load_teacher_task, settings.teacher, identity, slice_hw, key=f"warm-{i}-{token}",
                             workers=[address], allow_other_workers=True, pure=False, resources=resources)
               for i, address in enumerate(workers)]
    try:
        for future in as_completed(futures, loop=client.loop):
            error = future.result()
            if error:
                raise UserError(" ".join(error.split()))
    except BaseException:
        client.cancel(futures)
        raise
    log.info("%d dask worker(s) ready in %.1f s", len(workers), time.perf_counter() - start)


def _load_teacher_task(teacher: TeacherSettings, identity: dict[str, Any], slice_hw: tuple[int, ...]) -> str | None:
    """Task body of the warm-up: load this worker's teacher; a UserError's message, or None."""
    try:
        _worker_teacher(teacher, identity, slice_hw, _worker())
    except UserError as exc:
        return str(exc)
    return None


def _running_keys(token: str, dask_worker: Any = None) -> list[str]:
    """On a worker: keys of this run's tasks still occupying a thread (cancelled ones included)."""
    return [str(ts.key) for ts in dask_worker.state.all_running_tasks if str(ts.key).endswith(token)]


def _wait_for_running(client: Any, token: str, timeout: float = 600.0) -> None:
    """Wait until no task of the run executes, so the lock is not released under a writer.

    Cancelling cannot stop a running task (a thread), only forget it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = client.run(_running_keys, token, on_error="ignore")
        except Exception:  # the cluster is gone: nothing runs any more
            return
        if not any(running.values()):
            return
        time.sleep(0.2)
    log.warning("cases still running on the cluster after %.0f s; not waiting for them", timeout)


# ------------------------------------------------------------------------------------ worker side


def extract_one_case(context: RunContext, source: CaseSource, offset: int) -> dict[str, Any]:
    """Task body: preprocess one case, run the teacher over it, write it into the store.

    Args:
        context: the run (:class:`RunContext`).
        source: the case's files.
        offset: index of the case's first slice among all pending slices (batch layout).

    Returns:
        ``{"case_id", "slices", "forwarded", "seconds", "worker"}``, or ``{"case_id", "error"}``
        with a UserError's message (returned, not raised, so dask does not retry a bad file).
    """
    start = time.perf_counter()
    settings = context.settings
    worker = _worker()
    try:
        threads = _torch_threads(worker, context.slots)
        torch.set_num_threads(threads)  # per thread: this task's thread only
        slice_hw = tuple(settings.preprocess.target_shape[1:])
        teacher = _worker_teacher(settings.teacher, context.identity, slice_hw, worker)
        case = load_case(source, settings.preprocess, len(context.spec.class_names))
        depth = case.image.shape[0]
        grid = (*teacher.grid_shape(slice_hw), teacher.hidden_size)
        geometry = crop_window_geometry(settings, teacher)
        state = CaseInFlight.allocate(case, source, grid, geometry)
        plan = case_batch_plan(offset, depth, context.total, settings.batch_size)
        forwarded = forward_case(teacher, state, plan, settings.teacher_streams or default_streams(teacher),
                                 slice_forward(teacher, geometry))
        store_case(FeatureStore.open(context.store, mode="r+"), state, context.spec)
    except UserError as exc:
        return {"case_id": source.case_id, "error": str(exc)}
    return {"case_id": source.case_id, "slices": depth, "forwarded": forwarded,
            "seconds": time.perf_counter() - start, "worker": getattr(worker, "address", "local")}


def forward_case(teacher: Teacher, state: CaseInFlight, plan: list[tuple[int, int, int, int]], streams: int,
                 forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> int:
    """Fill ``state.features`` batch by batch as ``plan`` lays the case out.

    Args:
        teacher: the loaded teacher.
        state: the case; its image (D, H, W) is read, its features (D, h, w, C) written.
        plan: from :func:`~stage1_extract.pipeline.case_batch_plan`; rows of other cases are zeros
            (measured: they do not change this case's rows, only the batch length does).
        streams: parallel forwards (:func:`~stage1_extract.streams.streamed_forward`).
        forward: the batch forward (default: the slice tokens only, ``slice_forward(teacher, None)``).

    Returns:
        Slices forwarded, padding included.
    """
    image = state.case.image

    def batches() -> Iterator[tuple[tuple[int, int, int], torch.Tensor]]:
        for length, row, a, b in plan:
            if length == b - a:
                batch = image[a:b]
            else:
                batch = np.zeros((length, *image.shape[1:]), dtype=image.dtype)
                batch[row:row + b - a] = image[a:b]
            yield (row, a, b), torch.from_numpy(np.ascontiguousarray(batch))

    forwarded = 0
    for (row, a, b), out in streamed_forward(teacher, batches(), streams, forward or slice_forward(teacher, None)):
        state.fill(a, b, out, row)
        forwarded += len(out[0])
    return forwarded


def _worker() -> Any:
    try:
        return get_worker()
    except ValueError:  # called outside a worker (a direct call)
        return None


def _torch_threads(worker: Any, slots: dict[str, int]) -> int:
    """This task's share of its host's cores: cores / task slots on the host (at submission)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if worker is None:
        return cores
    host_slots = slots.get(get_address_host(worker.address)) or worker.state.nthreads
    return max(1, cores // max(1, host_slots))


def _worker_device(device: str, worker: Any) -> str:
    # Local workers are named 0..N-1: spread them over the GPUs rather than all on cuda:0.
    # Remote workers are expected to see one GPU each (CUDA_VISIBLE_DEVICES).
    if device not in ("auto", "cuda") or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return device
    name = getattr(worker, "name", None)
    return f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else device


def _worker_teacher(settings: TeacherSettings, identity: dict[str, Any], slice_hw: tuple[int, ...],
                    worker: Any) -> Teacher:
    """The worker's teacher, loaded once per process and checked against the store's identity.

    Raises:
        UserError: it cannot be loaded here, or its weights, config or normalisation differ
            from the teacher the client recorded (another hub revision or directory content).
    """
    settings = replace(settings, device=_worker_device(settings.device, worker))
    key = json.dumps([settings_to_json(settings), list(slice_hw)], sort_keys=True)
    cached = _TEACHERS.get(key)
    # A cached teacher of another identity (its directory was rewritten since) is loaded again.
    if cached is None or cached[1] != identity:
        _TEACHERS.clear()
        teacher = load_teacher(settings)
        mine = teacher.identity(slice_hw)
        differing = sorted(k for k in set(mine) | set(identity) if mine.get(k) != identity.get(k))
        if differing:
            raise UserError(f"worker {getattr(worker, 'address', '?')}: teacher {settings.source} differs from the "
                            f"store's in {', '.join(differing)}; give every worker the same teacher files")
        cached = _TEACHERS[key] = (teacher, mine)
    return cached[0]
