"""Locks on a feature store: one writer at a time, and no deleting a store that is being read.

The writer lock (:class:`StoreLock`) is an advisory ``flock`` on ``<store>.lock`` beside the store
(not inside it, so the Zarr group holds nothing foreign), keyed by the store's resolved path: a
second ``extract`` through a symbolic link meets the same lock. The kernel releases it when the
holder exits, even on SIGKILL, so a killed extraction never leaves a stale lock; the file's JSON
content only says who holds it, for the message the second writer prints.

Readers (``train``, ``evaluate``, ``pack``) hold a shared ``flock`` on the store folder itself
(:class:`ReaderLock`), which creates no file. ``extract --overwrite`` takes it exclusively before
deleting (:func:`exclusive_or_refuse`) and refuses, naming the readers' pids from ``/proc/locks``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from dinomix_cache.errors import UserError, write_failed


def lock_path(store: Path) -> Path:
    """``storage/x.zarr`` → ``/abs/storage/x.zarr.lock``, beside the store's resolved path (symbolic links
    followed, so every way of naming one store gives one lock)."""
    store = Path(store).resolve()
    return store.with_name(store.name + ".lock")


class StoreLock:
    """Exclusive writer lock on a store; use as a context manager.

    Raises:
        UserError: on enter, when another live process holds the lock (the message names its
            pid, host, start time and command), or the lock file cannot be created (a read-only
            or full folder; the message names it).
    """

    def __init__(self, store: Path) -> None:
        self.path = lock_path(store)
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_failed(self.path, exc, "the store's lock file") from None
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


class ReaderLock:
    """A shared lock on a store folder for as long as a reader uses it; use as a context manager.

    Nothing is created: the lock is a shared ``flock`` on the folder. A zip, a URL or a path that
    is no folder takes no lock (a zip is replaced by renaming, which leaves open readers intact).

    Raises:
        UserError: on enter, while ``extract --overwrite`` is deleting the store.
    """

    def __init__(self, store: Path | str) -> None:
        self.store = store
        self._fd: int | None = None

    def __enter__(self) -> ReaderLock:
        fd = _open_folder(self.store)
        if fd is None:
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.store} is being deleted by extract --overwrite ({_holders_text(self.store)}); "
                            "wait for the new store, then rerun") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


@contextlib.contextmanager
def exclusive_or_refuse(store: Path) -> Iterator[None]:
    """Hold the store folder exclusively (for deleting it); refuse while another process reads it.

    Readers in this very process do not count (the caller knows about them).

    Raises:
        UserError: another process holds a :class:`ReaderLock` on the store; the message names its
            pid and command.
    """
    fd = _open_folder(store)
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            others = [h for h in _folder_holders(fd) if h != os.getpid()]
            if others:
                raise UserError(f"refusing to delete {store}: it is being read by {_describe_pids(others)}; "
                                "wait for it to finish or stop it, then rerun with --overwrite") from None
        yield
    finally:
        os.close(fd)


def _open_folder(store: Path | str) -> int | None:
    """A read-only descriptor of the store folder, or None for a zip, a URL or a missing folder."""
    path = Path(store) if not isinstance(store, str) or "://" not in store else None
    if path is None or not path.is_dir():
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None


def _folder_holders(fd: int) -> list[int]:
    """Pids holding a ``flock`` on the file behind ``fd``, from ``/proc/locks`` (Linux; [] elsewhere)."""
    inode = os.fstat(fd).st_ino
    pids = []
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                    continue
                if fields[5].rsplit(":", 1)[-1] == str(inode) and fields[4].isdigit():
                    pids.append(int(fields[4]))
    except OSError:
        return [-1]  # the holders cannot be named; someone holds it
    return sorted(set(pids)) or [-1]


def _holders_text(store: Path | str) -> str:
    fd = _open_folder(store)
    if fd is None:
        return "holder unknown"
    try:
        return _describe_pids([h for h in _folder_holders(fd) if h != os.getpid()])
    finally:
        os.close(fd)


def _describe_pids(pids: list[int]) -> str:
    out = []
    for pid in pids:
        if pid < 0:
            out.append("another process (unknown pid)")
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                command = " ".join(a.decode(errors="replace") for a in fh.read().split(b"\0") if a)
        except OSError:
            command = ""
        out.append(f"pid {pid}" + (f" ({command[:120]})" if command else ""))
    return ", ".join(out) or "another process"
