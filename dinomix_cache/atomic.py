"""Files that appear whole or not at all: write beside the target, then rename over it.

A rename within one folder is atomic, so a reader (or a crash) never sees half a checkpoint, figure,
table, label file or zip. The temporary name carries the pid and a random token, so concurrent
writers of the same target never share one, and it starts with a dot, so folder listings skip it.
A writer killed mid-write (SIGKILL, power cut) leaves its temporary file behind;
:func:`remove_stale_temporaries` deletes those of dead processes when the next command starts.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "remove_stale_temporaries", "write_atomic"]

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` in ``folder`` whose writer has died.

    Args:
        folder: where the targets live (a missing folder holds none).
        names: only temporaries of these target names (e.g. ``["out.zip"]``); None = all.

    Returns:
        The files deleted. A live writer's temporary file is kept (its pid is alive on this host);
        one that cannot be deleted is left as it is.
    """
    folder, wanted = Path(folder), None if names is None else set(names)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or (wanted is not None and match["name"] not in wanted) or not path.is_file():
            continue
        if int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed
