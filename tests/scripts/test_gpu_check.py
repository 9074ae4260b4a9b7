"""scripts/gpu-check.sh --dry-run: the GPU check's whole sequence, tiny and on CPU, writes every JSON it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_every_json(tmp_path):
    out = tmp_path / "out"
    before = sorted(p.name for p in ROOT.iterdir())
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and summary["dry_run"] is True
    assert summary["torch"] and "cuda" in summary and "nvidia_smi" in summary and summary["cuda_available"] is False
    names = ["extract", "bench-extract-tiny", "bench-targets-slice", "bench-targets-crop", "train"]
    assert list(summary["steps"]) == names
    assert all(summary["steps"][n]["status"] == "ok" for n in names)

    extract = json.loads((out / "bench-extract-tiny.json").read_text())
    assert "bench extract" in extract["command"] and "--teacher random:tiny" in extract["command"]
    result = extract["result"]
    assert result["slices_per_s_end_to_end"] > 0 and result["slices_per_s_teacher_only"] > 0
    assert result["ratio"] > 0 and result["cases"] == 1 and result["device"] == "cpu"

    for view in ("slice", "crop"):
        targets = json.loads((out / f"bench-targets-{view}.json").read_text())["result"]
        assert set(targets) == {"teacher", "view", "no_fkd", "online", "cache", "hybrid", "cross_view"}
        assert targets["view"] == view and targets["teacher"]["source"] == "random:ctx-tiny"
        assert all(targets[m]["step_s"] > 0 for m in ("no_fkd", "online", "cache", "hybrid"))
        assert all({"cosine", "recomputed"} <= set(targets[m]) for m in ("online", "cache", "hybrid"))

    train = json.loads((out / "train.json").read_text())["result"]
    assert train["steps"] == train["max_steps"] == 2 and len(train["step_seconds"]) == 2
    assert train["median_step_s"] > 0 and train["status"] == "ok"

    assert not (out / ".steps.tsv").exists() and (out / "logs" / "train.log").exists()
    assert sorted(p.name for p in ROOT.iterdir()) == before  # no data/, storage or runs/ made in the repository
    assert not list(tmp_path.glob("gpu-check.*"))  # the temporary work folder (phantom, store, run) is gone
