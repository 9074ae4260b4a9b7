"""evaluate: tables, files and pictures from run folders; several seeds; a store that has gone."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from dinomix_cache.errors import UserError
from stage2_train.evaluate.evaluation import EvaluateSettings, _teacher_note, evaluate
from stage2_train.train.loop import train
from tests.tiny import tiny_train


@pytest.fixture(scope="module")
def three_runs(wide_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    store = wide_store
    runs = []
    for seed in (0, 1, 666):
        settings = tiny_train(store, root / f"seed{seed}", epochs=1, checkpoint_every=100, seed=seed, targets="cache")
        runs.append(train(settings, max_steps=2))
    return store, runs


def test_one_run_writes_tables_csv_and_pictures(three_runs):
    store, runs = three_runs
    result = evaluate(EvaluateSettings(runs=(runs[0],)))
    out = runs[0] / "evaluation-test"
    for name in ("results.json", "results.md", "cases.csv", "dice.png", "qualitative.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["class_labels"][:3] == ["Sp", "RK", "LK"] and len(saved["class_labels"]) == 13
    run = saved["runs"][0]
    test_ids = [c["id"] for c in saved_meta(runs[0])["dataset"]["cases"] if c["role"] == "test"]
    assert [c["case"] for c in run["cases"]] == test_ids
    summary = run["summary"]
    assert summary["mean_dice"] == pytest.approx(np.mean(summary["dice"]))
    assert summary["asd_unit"] == "voxel" and run["summary_mm"]["asd_unit"] == "mm"
    assert len(summary["assd"]) == 13 and "mean_assd" in summary and "mean_assd" in run["summary_mm"]
    assert "asd(pred" in saved["metrics"]["asd"] and "symmetric" in saved["metrics"]["assd"]
    with open(out / "cases.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(test_ids) * 13
    assert list(rows[0]) == ["run", "case", "class", "label", "dice_percent", "asd_voxels", "asd_mm", "assd_voxels",
                             "assd_mm"]
    md = (out / "results.md").read_text()
    assert "| Run | Avg. Dice | Avg. ASD | Sp | RK | LK |" in md and "random, not pretrained" in md
    assert "| Run | Avg. ASSD | Sp |" in md and "| Run | Avg. ASD (mm) | Avg. ASSD (mm) | Sp |" in md
    assert result["over_runs"] is None


def saved_meta(run):
    return json.loads((run / "store.json").read_text())["meta"]


def test_three_seeds_give_mean_and_std(three_runs):
    _, runs = three_runs
    result = evaluate(EvaluateSettings(runs=tuple(runs), mm=False, figures=False))
    over = result["over_runs"]
    per_run = np.array([r["summary"]["mean_dice"] for r in result["runs"]])
    assert over["mean_dice"][0] == pytest.approx(per_run.mean())
    assert over["mean_dice"][1] == pytest.approx(per_run.std())
    assert over["mean_assd"][0] == pytest.approx(np.mean([r["summary"]["mean_assd"] for r in result["runs"]]))
    assert (runs[0].parent / "evaluation-test" / "results.md").read_text().count("mean ± std (3 runs)") == 2


def test_store_gone_needs_data(three_runs, phantom_dir, tmp_path):
    store, runs = three_runs
    moved = tmp_path / "moved.zarr"
    shutil.copytree(store, moved)
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    settings = json.loads((run / "settings.json").read_text())
    (run / "settings.json").write_text(json.dumps({**settings, "cache": str(tmp_path / "gone.zarr")}))
    with pytest.raises(UserError, match="is gone .* --data DIR"):
        evaluate(EvaluateSettings(runs=(run,), figures=False))
    by_cache = evaluate(EvaluateSettings(runs=(run,), cache=moved, figures=False, out=tmp_path / "a"))
    by_data = evaluate(EvaluateSettings(runs=(run,), data=phantom_dir, figures=False, out=tmp_path / "b"))
    assert by_data["runs"][0]["summary"] == by_cache["runs"][0]["summary"]


def test_run_without_checkpoint_or_other_classes(three_runs, tmp_path):
    _, runs = three_runs
    bare = tmp_path / "bare"
    shutil.copytree(runs[0], bare)
    for name in ("best.pt", "latest.pt"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(UserError, match="holds no checkpoint"):
        evaluate(EvaluateSettings(runs=(bare,)))
    with pytest.raises(UserError, match="split"):
        evaluate(EvaluateSettings(runs=(runs[0],), split="train"))


@pytest.mark.parametrize(("label", "says"), [
    ("random, not pretrained", "test the pipeline"),
    ("trained on phantom labels (labeled split), not pretrained", "not a pretrained DINOv3"),
    ("trained on phantom labels (all training cases), not pretrained; ORACLE: trained on the labels of unlabeled "
     "cases", "not a semi-supervised result"),
    ("pretrained", None),
])
def test_results_say_what_the_teacher_is(label, says):
    note = _teacher_note(label)
    assert (note is None) if says is None else (says in note and label in note)
