"""Teacher forwards on parallel streams, results in submission order.

On a CPU the teacher runs as one single-threaded stream per core, all sharing the same frozen
weights, rather than as one stream whose matrix products are split across cores: it was a little
faster alone (``docs/measurements.md``), and, more important, a split product waits at every barrier
for its slowest core, so whenever a reader thread borrows one core the other core idles too;
separate streams lose only the borrowed core. On a GPU one stream feeds the device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from dinomix_cache.teacher.model import Teacher

T = TypeVar("T")
R = TypeVar("R")


def default_streams(teacher: Teacher) -> int:
    """Streams for a teacher: the intra-op thread count on CPU, 1 on an accelerator."""
    return max(1, torch.get_num_threads()) if teacher.device.type == "cpu" else 1


def streamed_forward(
    teacher: Teacher, items: Iterable[tuple[T, torch.Tensor]], streams: int,
    forward: Callable[[torch.Tensor], R] | None = None,
) -> Iterator[tuple[T, R]]:
    """Yield ``(tag, forward(batch))`` for each ``(tag, batch)``, in input order.

    Args:
        teacher: the loaded teacher (thread-safe at inference: eval mode, no state changes).
        items: (tag, slices) pairs; slices (B, H, W) float32 in [0, 1]. Consumed lazily, so the
            producer (reading cases) runs while up to ``streams`` forwards are in flight.
        streams: parallel forwards; each stream thread runs torch single-threaded when > 1.
        forward: what runs on each batch; default ``teacher.forward_slices`` ((B, h, w, C) float32
            CPU features). Stage one passes :func:`~stage1_extract.windows.slice_forward`.

    Returns:
        An iterator of (tag, forward's result).
    """
    run = forward if forward is not None else teacher.forward_slices
    if streams <= 1:
        for tag, batch in items:
            yield tag, run(batch)  # type: ignore[misc]
        return
    pending: deque[tuple[T, Future]] = deque()
    with ThreadPoolExecutor(streams, thread_name_prefix="teacher", initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:
        try:
            for tag, batch in items:
                pending.append((tag, pool.submit(run, batch)))
                if len(pending) >= streams:
                    tag0, future = pending.popleft()
                    yield tag0, future.result()
            while pending:
                tag0, future = pending.popleft()
                yield tag0, future.result()
        finally:
            for _, future in pending:
                future.cancel()
