"""The dask cluster of a distributed extraction: a local one started for ``--workers N``, or the one
at ``--scheduler ADDRESS``, and what the run needs to know about it (GPU resources, task slots per host).

``--workers N`` starts N worker *processes* with one thread each: the teacher forward and
preprocessing hold the GIL between torch calls, and torch's intra-op pools of several threads in one
process contend, so processes scale where threads do not. Workers of a running cluster must see
``--data``, ``--out`` and the teacher at the same paths as the client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from distributed import Client, LocalCluster

from dinomix_cache.errors import UserError
from stage1_extract.settings import ExtractSettings


def wants_gpu(device: str) -> bool:
    """True when the teacher will run on CUDA: ``cuda``/``cuda:N``, or ``auto`` where CUDA is visible."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def start_local_cluster(workers: int, gpu: bool) -> Any:
    """A ``distributed.LocalCluster`` of ``workers`` single-threaded processes (no dashboard).

    Args:
        workers: worker processes.
        gpu: give each worker a ``GPU`` resource, for tasks that claim one.
    """
    # memory_limit 0: every worker holds a whole teacher, which its default share of the RAM may
    # not fit; the nanny would then restart it again and again.
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        memory_limit=0, resources={"GPU": 1} if gpu else None)


@contextmanager
def cluster_client(settings: ExtractSettings) -> Iterator[Any]:
    """A ``distributed.Client`` on the cluster ``settings`` names, closed (a local cluster shut down) on exit.

    Raises:
        UserError: the scheduler is unreachable within ``connect_timeout`` seconds, or the address
            is malformed.
    """
    gpu = wants_gpu(settings.teacher.device)
    if settings.scheduler is None:
        with _dask_log_level(logging.WARNING):
            cluster = start_local_cluster(settings.workers, gpu)
            try:
                with Client(cluster, set_as_default=False) as client:
                    yield client
            finally:
                # Workers that outlive the close timeout are killed, with warnings and tracebacks
                # that say nothing about the extraction.
                with _dask_log_level(logging.ERROR):
                    cluster.close()
        return
    address = settings.scheduler.strip()
    try:
        client = Client(address, timeout=settings.connect_timeout, set_as_default=False)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"cannot reach the dask scheduler at {address} within {settings.connect_timeout:g} s "
                        f"({reason}); check --scheduler (like tcp://HOST:8786) and that the scheduler runs") from None
    with _dask_log_level(logging.WARNING), client:
        yield client


@contextmanager
def _dask_log_level(level: int) -> Iterator[None]:
    """Raise the ``distributed`` loggers to ``level`` for a while: their INFO lines (every worker
    start and stop) would otherwise reach the CLI's root handler."""
    logger = logging.getLogger("distributed")
    old = logger.level
    logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(old)


def describe_cluster(client: Any, settings: ExtractSettings) -> str:
    """``2 local dask worker(s)`` or ``dask scheduler tcp://head:8786 (8 worker(s))``."""
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    if settings.scheduler is None and settings.workers:
        return f"{workers} local dask worker(s)"
    return f"dask scheduler {client.scheduler.address} ({workers} worker(s))"


def slots_by_host(client: Any) -> dict[str, int]:
    """Task slots (worker threads) of the cluster per host address."""
    slots: dict[str, int] = {}
    for info in client.scheduler_info(n_workers=-1)["workers"].values():
        host = str(info.get("host"))
        slots[host] = slots.get(host, 0) + int(info.get("nthreads") or 1)
    return slots
