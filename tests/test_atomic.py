"""Atomic writes: the target is replaced whole, or left as it was."""

from __future__ import annotations

import pytest

from dinomix_cache.atomic import atomic_path, write_atomic


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, "old")
    write_atomic(target, b"new bytes", sync=True)
    assert target.read_bytes() == b"new bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failing_writer_leaves_the_old_file(tmp_path):
    target = tmp_path / "latest.pt"
    target.write_text("complete checkpoint")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a check")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "complete checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_missing_folder_raises(tmp_path):
    with pytest.raises(OSError):
        write_atomic(tmp_path / "no" / "such" / "file", "x")
