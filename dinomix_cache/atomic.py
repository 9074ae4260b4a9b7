"""Files that appear whole or not at all: write beside the target, then rename over it.

A rename within one folder is atomic, so a reader (or a crash) never sees half a checkpoint, figure,
table, label file or zip. The temporary name carries the pid and a random token, so concurrent
writers of the same target never share one, and it starts with a dot, so folder listings skip it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_atomic"]


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest`` to write to; renamed over ``dest`` when the block ends
    without an exception. The temporary file never outlives the block. The folder must exist."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(dest: Path, data: bytes | str, sync: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``dest`` atomically; ``sync`` flushes it to the disk before
    the rename, so that after a power cut the name never points at missing data.

    Raises:
        OSError: the folder is missing or not writable, or the disk is full.
    """
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        fh.write(raw)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    return Path(dest)
