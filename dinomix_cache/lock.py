"""A writer lock for a feature store, so two extractions never write into one store.

The lock is an advisory ``flock`` on ``<store>.lock`` beside the store (not inside it, so the
Zarr group holds nothing foreign). The kernel releases it when the holder exits, even on
SIGKILL, so a killed extraction never leaves a stale lock; the file's JSON content only says who
holds it, for the message the second writer prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from dinomix_cache.errors import UserError


def lock_path(store: Path) -> Path:
    """``storage/x.zarr`` → ``storage/x.zarr.lock``."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


class StoreLock:
    """Exclusive writer lock on a store; use as a context manager.

    Raises:
        UserError: on enter, when another live process holds the lock; the message names its
            pid, host, start time and command.
    """

    def __init__(self, store: Path) -> None:
        self.path = lock_path(store)
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"{self.path.with_suffix('')} is being written by another extraction ({holder}); "
                "wait for it to finish or stop it, then rerun (complete cases are kept)"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv[:3]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            # The empty file stays: unlinking it would let a process that opened the old inode
            # and a process creating a new one both hold "the" lock.


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: {info.get('command')}"
