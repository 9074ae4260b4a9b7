"""Teacher forwards on parallel streams, results in submission order.

On a CPU the teacher runs as one single-threaded stream per core, all sharing the same frozen
weights, rather than as one stream whose matrix products are split across cores. Measured on the
2-core development machine (random:vits16, 160×160, batch 32): 50.4 slices/s for 2 × 1 thread
against 47.8 for 1 × 2 threads. More important, a split product waits at every barrier for its
slowest core, so whenever a reader thread borrows one core the other core idles too; separate
streams lose only the borrowed core. On a GPU one stream feeds the device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from dinomix_cache.teacher import Teacher

T = TypeVar("T")


def default_streams(teacher: Teacher) -> int:
    """Streams for a teacher: the intra-op thread count on CPU, 1 on an accelerator."""
    return max(1, torch.get_num_threads()) if teacher.device.type == "cpu" else 1


def streamed_forward(
    teacher: Teacher, items: Iterable[tuple[T, torch.Tensor]], streams: int
) -> Iterator[tuple[T, torch.Tensor]]:
    """Yield ``(tag, teacher.forward_slices(batch))`` for each ``(tag, batch)``, in input order.

    Args:
        teacher: the loaded teacher (thread-safe at inference: eval mode, no state changes).
        items: (tag, slices) pairs; slices (B, H, W) float32 in [0, 1]. Consumed lazily, so the
            producer (reading cases) runs while up to ``streams`` forwards are in flight.
        streams: parallel forwards; each stream thread runs torch single-threaded when > 1.

    Returns:
        An iterator of (tag, (B, h, w, C) float32 CPU features).
    """
    if streams <= 1:
        for tag, batch in items:
            yield tag, teacher.forward_slices(batch)
        return
    pending: deque[tuple[T, Future[torch.Tensor]]] = deque()
    with ThreadPoolExecutor(streams, thread_name_prefix="teacher", initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:
        try:
            for tag, batch in items:
                pending.append((tag, pool.submit(teacher.forward_slices, batch)))
                if len(pending) >= streams:
                    tag0, future = pending.popleft()
                    yield tag0, future.result()
            while pending:
                tag0, future = pending.popleft()
                yield tag0, future.result()
        finally:
            for _, future in pending:
                future.cancel()
