"""Training from a store: resume is exact, run folders are complete, bad input is refused."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import tiny_settings

from dinomix_cache.errors import UserError
from dinomix_cache.preprocess import PreprocessSettings
from stage1_extract.runner import run_extraction
from stage2_train.run_folder import RunFolder
from stage2_train.settings import TrainSettings
from stage2_train.train import train

SHAPE = (32, 64, 64)


@pytest.fixture(scope="module")
def train_store(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "s.zarr"
    run_extraction(tiny_settings(phantom_dir, out, preprocess=PreprocessSettings(target_shape=SHAPE)))
    return out


def small(store, out, **changes) -> TrainSettings:
    base = TrainSettings(cache=store, out=out, width=2, crop=(16, 32, 32), epochs=4, checkpoint_every=1)
    return replace(base, **changes)


def weights(run) -> dict[str, torch.Tensor]:
    ckpt = RunFolder(run).load_checkpoint("latest")
    return {**{f"s.{k}": v for k, v in ckpt["networks"]["student"].items()},
            **{f"e.{k}": v for k, v in ckpt["networks"]["ema"].items()}}


def test_resume_gives_identical_weights(train_store, tmp_path):
    straight = train(small(train_store, tmp_path / "a"), max_steps=4)
    half = train(small(train_store, tmp_path / "b"), max_steps=2)
    resumed = train(None, resume=half, max_steps=4)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in RunFolder(resumed).records() if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4]


def test_run_folder_holds_settings_log_checkpoints_and_plot(train_store, tmp_path):
    run = train(small(train_store, tmp_path / "r"), max_steps=3)
    settings = json.loads((run / "settings.json").read_text())
    assert settings["targets"] == "hybrid" and settings["width"] == 2
    assert json.loads((run / "store.json").read_text())["attrs_sha256"]
    records = RunFolder(run).records()
    step = next(r for r in records if r["kind"] == "step")
    for term in ("sup", "sup_aux", "unsup", "unsup_aux", "distill", "total", "lr", "recomputed"):
        assert term in step, term
    assert 0.0 < step["recomputed"] < 1.0  # hybrid: only the slices holding the pasted box
    assert any(r["kind"] == "epoch" for r in records)
    for name in ("latest.pt", "best.pt", "progress.png"):
        assert (run / name).exists(), name


def test_labeled_only_and_ablations_run(train_store, tmp_path):
    for i, change in enumerate(({"labeled_only": True}, {"fkd": False}, {"targets": "cache"})):
        run = train(small(train_store, tmp_path / f"r{i}", **change), max_steps=1)
        step = RunFolder(run).records()[0]
        assert ("unsup" in step) != bool(change.get("labeled_only"))
        assert ("distill" in step) == (change.get("fkd", True) and not change.get("labeled_only", False))


def test_bad_input_is_refused(train_store, phantom_dir, tmp_path):
    with pytest.raises(UserError, match="larger than the store's volumes"):
        train(small(train_store, tmp_path / "x", crop=(48, 32, 32)))
    partial = tmp_path / "partial.zarr"
    shape = PreprocessSettings(target_shape=SHAPE)
    run_extraction(tiny_settings(phantom_dir, partial, cases=("0001",), preprocess=shape))
    with pytest.raises(UserError, match="not complete.*rerun extract"):
        train(small(partial, tmp_path / "y"))
    run = train(small(train_store, tmp_path / "z"), max_steps=1)
    other = tmp_path / "other.zarr"
    shutil.copytree(train_store, other)
    from dinomix_cache.store import FeatureStore

    store = FeatureStore.open(other, mode="r+")
    store.update_meta(producer={**store.meta["producer"], "created": "another time"})
    with pytest.raises(UserError, match="another store"):
        train(None, resume=run, cache=other)
    with pytest.raises(UserError, match="already holds a run"):
        train(small(train_store, run))


def test_bench_targets_reports_time_fidelity_and_recompute(train_store):
    from stage2_train.bench import bench_targets

    result = bench_targets(small(train_store, None), steps=1)
    assert list(result) == ["no_fkd", "online", "cache", "hybrid"]
    assert "cosine" not in result["no_fkd"] and result["no_fkd"]["step_s"] > 0
    assert result["online"]["cosine"] == pytest.approx(1.0, abs=1e-4) and result["online"]["recomputed"] == 1.0
    assert result["cache"]["recomputed"] == 0.0 and -1.0 <= result["cache"]["cosine"] <= 1.0
    assert 0.0 < result["hybrid"]["recomputed"] < 1.0
    assert result["hybrid"]["cosine"] >= result["cache"]["cosine"] - 1e-6  # recomputing the box only helps
