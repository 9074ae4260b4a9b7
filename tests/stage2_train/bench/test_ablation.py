"""bench ablation: the five rows of Table 3 over seeds, trained and evaluated end to end at a tiny size."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dinomix_cache.cli.app import app
from dinomix_cache.errors import UserError
from stage2_train.bench.ablation import ROWS, TABLE3_ROWS, AblationSettings, row_settings, run_ablation
from stage2_train.train.run_folder import RunFolder
from stage2_train.train.settings import preset


@pytest.fixture(scope="module")
def store(good_store):
    """The session's tiny store (16 x 32 x 32); the ablation only reads it."""
    return good_store


def test_rows_are_the_papers_switches(store, tmp_path):
    settings = AblationSettings(cache=store, out=tmp_path)
    rows = {row: row_settings(settings, row, 1) for row in ROWS}
    assert rows["labeled-only"].labeled_only
    c = rows["consistency"]
    assert not (c.fkd or c.aux or c.pic.enabled or c.labeled_only)
    assert rows["pic"].pic.enabled and not rows["pic"].fkd and not rows["pic"].aux
    assert rows["fkd"].fkd and not rows["fkd"].pic.enabled and not rows["fkd"].aux
    assert rows["fkd-mean"].fkd_reduction == "mean" and rows["fkd"].fkd_reduction == "channel_sum"
    assert rows["dino-mix-tau075"].tau == 0.75 and rows["dino-mix"].tau == 0.95
    assert rows["pic-fkd"].fkd and not rows["pic-fkd"].aux
    full = rows["dino-mix"]
    assert full.fkd and full.aux and full.pic.enabled and not full.labeled_only
    assert {r.seed for r in rows.values()} == {1} and full.out == tmp_path / "dino-mix-seed1"
    base = row_settings(settings, "dino-mix", 0)
    cpu = preset("cpu", store)  # every row starts from the cpu preset
    assert (base.width, base.crop, base.lr, base.normalization) == (cpu.width, cpu.crop, cpu.lr, cpu.normalization)
    assert base.epochs == 80  # the benchmark's own budget
    with pytest.raises(UserError):
        AblationSettings(cache=store, rows=("nope",))


def test_ablation_runs_end_to_end_and_reruns_nothing(store, tmp_path):
    settings = AblationSettings(cache=store, out=tmp_path / "bench", seeds=(0, 1), epochs=2, width=2,
                                crop=(16, 32, 32), targets="cache", max_steps=1, figures=False)
    summary = run_ablation(settings)
    assert [r["row"] for r in summary["rows"]] == list(TABLE3_ROWS)
    for r in summary["rows"]:
        assert r["steps"] == [1, 1] and len(r["dice"]) == 13
        assert len(r["mean_dice"]) == 2 and all(len(pair) == 2 for pair in r["dice"])
        assert (tmp_path / "bench" / f"evaluation-{r['row']}" / "results.md").exists()
    records = RunFolder(tmp_path / "bench" / "pic-seed1").records()
    assert "unsup" in records[0] and "distill" not in records[0] and "unsup_aux" not in records[0]
    assert "unsup" not in RunFolder(tmp_path / "bench" / "labeled-only-seed0").records()[0]
    table = (tmp_path / "bench" / "ablation.md").read_text()
    assert "+ PIC + FKD" in table and "±" in table and "Paired differences" in table
    assert "random, not pretrained" in table and "anatomy probe" in table  # the teacher beside the FKD rows
    assert 0.0 < summary["teacher"]["probe"]["balanced_accuracy"] <= 1.0
    paired = {d["row"]: d for d in summary["paired"]}
    assert "vs_labeled_only" not in paired["labeled-only"]
    assert paired["pic-fkd"]["vs_base"]["against"] == "pic" and len(paired["pic-fkd"]["vs_base"]["per_seed"]) == 2
    logs = next(r for r in summary["rows"] if r["row"] == "dino-mix")["logs"]
    assert len(logs) == 2 and "distill" in logs[0]["shares"] and logs[0]["ema_val_dice"] is not None
    # A second call trains nothing: every run is finished.
    log = (tmp_path / "bench" / "dino-mix-seed0" / "log.jsonl").read_text()
    again = run_ablation(settings)
    assert (tmp_path / "bench" / "dino-mix-seed0" / "log.jsonl").read_text() == log
    assert [r["mean_dice"] for r in again["rows"]] == [r["mean_dice"] for r in summary["rows"]]
    # A folder holding another row's settings is refused, not mixed in.
    with pytest.raises(UserError, match="other settings"):
        run_ablation(AblationSettings(cache=store, out=tmp_path / "bench", seeds=(0,), epochs=3, width=2,
                                      crop=(16, 32, 32), targets="cache", max_steps=1, figures=False))


def test_ablation_cli(store, tmp_path):
    result = CliRunner().invoke(app, ["bench", "ablation", "--cache", str(store), "--out", str(tmp_path / "b"),
                                      "--row", "labeled-only", "--row", "dino-mix", "--seed", "0", "--epochs", "1",
                                      "--width", "2", "--crop", "16x32x32", "--targets", "cache", "--max-steps", "1",
                                      "--no-figures", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "labeled only" in result.output and "DINO-Mix" in result.output
    summary = json.loads((tmp_path / "b" / "ablation.json").read_text())
    assert [r["row"] for r in summary["rows"]] == ["labeled-only", "dino-mix"]
    bad = CliRunner().invoke(app, ["bench", "ablation", "--cache", str(store), "--row", "nope"])
    assert bad.exit_code == 2


def test_paired_differences_are_per_seed():
    from stage2_train.bench.ablation_report import paired_differences

    def row(name, means):
        return {"row": name, "per_run_mean_dice": means, "per_run_dice": [[m, 0.0] for m in means]}

    rows = [row("labeled-only", [60.0, 50.0, 55.0]), row("consistency", [62.0, 49.0, 58.0]),
            row("pic", [70.0, 52.0, 57.0])]
    got = {d["row"]: d for d in paired_differences(rows, {"consistency": "labeled-only", "pic": "consistency"})}
    assert got["consistency"]["vs_labeled_only"]["per_seed"] == [2.0, -1.0, 3.0]
    assert got["consistency"]["vs_labeled_only"]["mean"] == pytest.approx(4 / 3, abs=0.01)
    assert got["pic"]["vs_base"]["per_seed"] == [8.0, 3.0, -1.0]
    assert got["pic"]["vs_base"]["std"] == pytest.approx(4.51, abs=0.01)
    assert got["pic"]["vs_labeled_only"]["per_class"] == [pytest.approx(14 / 3, abs=0.05), 0.0]
