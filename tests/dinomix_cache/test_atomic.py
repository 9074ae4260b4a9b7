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


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from dinomix_cache.atomic import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    stale, live = tmp_path / f".latest.pt.{dead.pid}.0123abcd.tmp", tmp_path / ".latest.pt.1.0123abcd.tmp"
    other = tmp_path / f".notes.{dead.pid}.tmp"  # not an atomic_path name
    for path in (stale, live, other):
        path.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path, ["best.pt"]) == []
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and other.exists()
