"""SIGKILL an extraction mid-way, rerun it: only missing cases are computed, the result is exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.inspection import verify_store
from tests.tiny import TINY_PHANTOM

ROOT = Path(__file__).resolve().parents[3]


def extract_cmd(data: Path, out: Path) -> list[str]:
    # random:vits16 on 64x64 slices: slow enough per case (~0.2 s) for a kill to land mid-way.
    return [sys.executable, "-m", "dinomix_cache", "extract", "--dataset", "phantom", "--data", str(data),
            "--out", str(out), "--teacher", "random:vits16", "--target-shape", "32x64x64",
            "--phantom-cases", str(len(TINY_PHANTOM.case_ids)), "--phantom-matrix", str(TINY_PHANTOM.matrix),
            "--batch-size", "16", "--chunk-slices", "4", "--no-progress"]


def chunk_mtimes(store: Path, case: str) -> dict[str, int]:
    folder = store / "features" / case
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_sigkill_then_rerun_resumes_exactly(phantom_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(extract_cmd(phantom_dir, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    complete: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "zarr.json").exists():
            try:
                complete = FeatureStore.open(out).complete_cases()
            except Exception:  # the store is being created; look again
                complete = []
            if complete:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert complete, "the extraction finished no case before the deadline"
    done_before = FeatureStore.open(out).complete_cases()
    missing = [c for c in TINY_PHANTOM.case_ids if c not in done_before]
    assert missing, "the kill landed after the last case; nothing left to resume"
    mtimes = {c: chunk_mtimes(out, c) for c in done_before}

    rerun = subprocess.run(extract_cmd(phantom_dir, out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"extracting {len(missing)}: {' '.join(missing)}" in rerun.stderr
    assert {c: chunk_mtimes(out, c) for c in done_before} == mtimes  # complete cases were not recomputed
    assert verify_store(out, data=phantom_dir) == []

    fresh = tmp_path / "fresh.zarr"
    subprocess.run(extract_cmd(phantom_dir, fresh), env=env, check=True, capture_output=True, timeout=300)
    a, b = FeatureStore.open(out), FeatureStore.open(fresh)
    for case in TINY_PHANTOM.case_ids:
        np.testing.assert_array_equal(a.read_features(case), b.read_features(case))
        np.testing.assert_array_equal(a.read_volume(case, "image"), b.read_volume(case, "image"))
        assert a.case_attrs(case) == b.case_attrs(case)
    np.testing.assert_array_equal(a.class_voxels(), b.class_voxels())
