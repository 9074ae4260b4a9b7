"""StoreLock: a second writer is refused with the holder named; a killed holder frees the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dinomix_cache.errors import UserError
from dinomix_cache.store.lock import ReaderLock, StoreLock, exclusive_or_refuse, lock_path


def test_second_writer_refused_and_told_who_holds_it(tmp_path):
    store = tmp_path / "s.zarr"
    held = rf"being written by another extraction \(pid {os.getpid()}"
    with StoreLock(store), pytest.raises(UserError, match=held), StoreLock(store):
        pass
    with StoreLock(store):  # released on exit
        pass


def test_lock_of_a_killed_process_is_released(tmp_path):
    store = tmp_path / "s.zarr"
    code = ("import sys, time; from dinomix_cache.store.lock import StoreLock\n"
            f"with StoreLock({str(store)!r}):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            StoreLock(store).__enter__()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.stdout.close()
    time.sleep(0.05)
    assert lock_path(store).exists()  # the file stays; the kernel dropped the lock
    with StoreLock(store):
        pass


def test_a_symlink_to_a_store_takes_the_store_s_own_lock(tmp_path):
    (tmp_path / "s.zarr").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "s.zarr")
    assert lock_path(tmp_path / "link.zarr") == lock_path(tmp_path / "s.zarr") == (tmp_path / "s.zarr.lock").resolve()
    with StoreLock(tmp_path / "s.zarr"), pytest.raises(UserError, match="being written"), StoreLock(
            tmp_path / "link.zarr"):
        pass


def test_readers_of_this_process_do_not_stop_its_own_overwrite(tmp_path):
    (tmp_path / "s.zarr").mkdir()
    with ReaderLock(tmp_path / "s.zarr"), exclusive_or_refuse(tmp_path / "s.zarr"):
        pass
    with ReaderLock(tmp_path / "missing.zarr"), ReaderLock("https://host/s.zarr"):  # nothing to lock: no-ops
        pass
