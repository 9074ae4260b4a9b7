"""Helpers of the bad-input corpus: run a verb, check its one-line refusal, prove nothing changed."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dinomix_cache.cli.app import app

runner = CliRunner()
# The CLI options of a tiny, fast training run on the conftest store (16 x 32 x 32 volumes).
TRAIN = ["--preset", "cpu-small", "--width", "2", "--crop", "16x32x32", "--epochs", "1", "--max-steps", "1",
         "--targets", "cache", "--no-progress"]


def cli(*args: Any) -> Any:
    """Run ``dinomix-cache ARGS`` in this process."""
    return runner.invoke(app, [str(a) for a in args])


def refused(result: Any, *named: Any) -> str:
    """Assert exit 2 and one ``error:`` line, the last one, without a traceback, naming each of ``named``."""
    stderr = result.stderr
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in stderr and "Traceback" not in result.stdout, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    for name in named:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: (size, mtime) of files, (-1, 0) of folders and links.

    A writer's ``.lock`` file counts by its size only: extract writes who holds it while it does and
    empties it on exit, so its time changes though nothing it holds does.
    """
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            mtime = 0 if name.endswith(".lock") else st.st_mtime_ns
            out[str(path.relative_to(root))] = (-1, 0) if not path.is_file() or path.is_symlink() else (
                st.st_size, mtime)
    return out


@contextmanager
def unchanged(root: Path) -> Iterator[None]:
    """Assert the block creates, changes and deletes nothing under ``root``."""
    before = snapshot(root)
    yield
    after = snapshot(root)
    assert after == before, {"created": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                             "changed": sorted(k for k in before if k in after and before[k] != after[k])}


def copy_store(store: Path, dest: Path) -> Path:
    """A copy of a store, with the lock file extract leaves beside it."""
    copied = Path(shutil.copytree(store, dest, symlinks=True))
    lock = store.with_name(store.name + ".lock")
    if lock.exists():
        shutil.copy2(lock, dest.with_name(dest.name + ".lock"))
    return copied


def write_msd(root: Path, n: int = 3, shape: tuple[int, int, int] = (24, 20, 10)) -> Path:
    """A tiny MSD-style dataset (dataset.json, imagesTr/, labelsTr/) of ``n`` cases."""
    import nibabel as nib
    import numpy as np

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))
    rng = np.random.default_rng(0)
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        label[5:15, 5:15, 2:8] = 1
        affine = np.diag([0.8, 0.8, 3.0, 1.0])
        nib.save(nib.Nifti1Image(rng.integers(-200, 300, shape).astype(np.int16), affine),
                 root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    return root


def edit_attrs(store: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """Apply ``edit`` to the store's ``dinomix`` attribute in its zarr.json (as a careless user would)."""
    meta_file = store / "zarr.json"
    doc = json.loads(meta_file.read_text())
    edit(doc["attributes"]["dinomix"])
    meta_file.write_text(json.dumps(doc))
    return store


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    changed = edit(data)
    path.write_text(json.dumps(data if changed is None else changed))


def feature_chunks(store: Path, case: str) -> list[Path]:
    return sorted(p for p in (store / "features" / case / "c").rglob("*") if p.is_file())


@contextmanager
def read_only(monkeypatch: pytest.MonkeyPatch, folder: Path, err: int = errno.EROFS) -> Iterator[None]:
    """Make every write under ``folder`` fail as on a read-only file system (``err``): opening a file to
    write, creating a file or folder, renaming into it. (Tests run as root, whom chmod does not stop.)"""
    folder = Path(folder).resolve()
    real_open, real_os_open, real_mkdir, real_replace = builtins.open, os.open, os.mkdir, os.replace

    def inside(path: Any) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(folder)
        except (TypeError, ValueError):
            return False

    def fail(path: Any) -> OSError:
        return OSError(err, os.strerror(err), os.fsdecode(path))

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | bytes | os.PathLike) and inside(file) and any(c in mode for c in "wax+"):
            raise fail(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if inside(path):
            raise fail(path)
        return real_mkdir(path, *args, **kwargs)

    def fake_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if inside(dst):
            raise fail(dst)
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        for module in (builtins, io):
            patch.setattr(module, "open", fake_open)
        patch.setattr(os, "open", fake_os_open)
        patch.setattr(os, "mkdir", fake_mkdir)
        patch.setattr(os, "replace", fake_replace)
        yield
