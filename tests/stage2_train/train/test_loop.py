"""Training from a store: resume is exact, run folders are complete, bad input is refused."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.errors import UserError
from stage1_extract.runner import run_extraction
from stage2_train.train.loop import train
from stage2_train.train.run_folder import RunFolder
from tests.tiny import tiny_settings, tiny_train

SHAPE = (32, 64, 64)


@pytest.fixture(scope="module")
def train_store(wide_store):
    """The session's store at SHAPE; tests that change a store change a copy."""
    return wide_store


small = tiny_train  # (store, out, **changes): the tiny run every test here starts from


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
    epoch = next(r for r in records if r["kind"] == "epoch")
    assert 0.0 < epoch["recomputed"] < 1.0 and len(epoch["val_dice_per_class"]) == 13
    # What the epoch's terms weighed, the EMA beside the student, and the unsupervised branch's state.
    assert set(epoch["shares"]) == {"sup", "sup_aux", "unsup", "unsup_aux", "distill"}
    assert sum(epoch["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= epoch["ema_val_dice"] <= 1.0 and len(epoch["ema_val_dice_per_class"]) == 13
    assert 0.0 <= epoch["confident"] <= epoch["kept"] <= 1.0 and epoch["distill_grad"] > 0
    assert epoch["ema_decay"] < 0.99  # warm-up: min(1 - 1/(t + 1), 0.99) over the first iterations
    # The phantom store keeps the labels of its unlabeled cases: the pseudo-labels are scored against them.
    assert len(epoch["pseudo_dice"]) == 13 and "confident_background" in epoch  # None: no confident voxel yet
    assert step["lambda_unsup"] == pytest.approx(0.5 * math.exp(-5))  # the ramp starts near 0
    for name in ("latest.pt", "best.pt", "progress.png"):
        assert (run / name).exists(), name


def test_labeled_only_and_ablations_run(train_store, tmp_path):
    from stage2_train.method.pic import PicSettings

    no_pic = PicSettings(enabled=False)
    changes = ({"labeled_only": True}, {"fkd": False}, {"targets": "cache"}, {"pic": no_pic},
               {"pic": no_pic, "targets": "cache"}, {"aux": False})
    for i, change in enumerate(changes):
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
    from dinomix_cache.store.feature_store import FeatureStore

    store = FeatureStore.open(other, mode="r+")
    store.update_meta(producer=store.attrs.producer.model_copy(update={"created": "another time"}))
    with pytest.raises(UserError, match="another store"):
        train(None, resume=run, cache=other)
    with pytest.raises(UserError, match="already holds a run"):
        train(small(train_store, run))


def _copy_with_meta(store, dest, **sections):
    from dinomix_cache.store.feature_store import FeatureStore

    shutil.copytree(store, dest)
    copy = FeatureStore.open(dest, mode="r+")
    copy.update_meta(**{k: v(copy.attrs) for k, v in sections.items()})
    return dest


def test_store_without_labeled_cases_is_refused(train_store, tmp_path):
    def unlabeled(attrs):
        cases = [c.model_copy(update={"role": "unlabeled" if c.role == "labeled" else c.role})
                 for c in attrs.dataset.cases]
        return attrs.dataset.model_copy(update={"cases": cases})

    store = _copy_with_meta(train_store, tmp_path / "nolab.zarr", dataset=unlabeled)
    with pytest.raises(UserError, match="no labeled cases"):
        train(small(store, tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_resume_with_other_classes_is_refused(train_store, tmp_path):
    run = train(small(train_store, tmp_path / "r"), max_steps=1)
    before = (run / "latest.pt").read_bytes()

    def renamed(attrs):
        return attrs.dataset.model_copy(update={"class_names": [*attrs.class_names[:-1], "kidney_cyst"]})

    other = _copy_with_meta(train_store, tmp_path / "classes.zarr", dataset=renamed)
    with pytest.raises(UserError, match="has classes .*kidney_cyst.* but .* was trained on"):
        train(None, resume=run, cache=other, max_steps=2)
    assert (run / "latest.pt").read_bytes() == before


def test_teacher_that_cannot_be_loaded(train_store, tmp_path):
    def moved(attrs):
        return attrs.teacher.model_copy(update={"source": str(tmp_path / "no-such-teacher")})

    store = _copy_with_meta(train_store, tmp_path / "moved.zarr", teacher=moved)
    for targets in ("hybrid", "online"):
        with pytest.raises(UserError, match="--targets cache"):
            train(small(store, tmp_path / targets, targets=targets))
        assert not (tmp_path / targets / "latest.pt").exists()
    run = train(small(store, tmp_path / "cache", targets="cache"), max_steps=1)
    assert "distill" in RunFolder(run).records()[0]


def test_store_without_volumes_trains_from_data(phantom_dir, tmp_path):
    from dinomix_cache.store.feature_store import StoreSettings

    store = tmp_path / "novol.zarr"
    run_extraction(tiny_settings(phantom_dir, store, preprocess=PreprocessSettings(target_shape=SHAPE),
                                 storage=StoreSettings(chunk_slices=4, volumes=False)))
    with pytest.raises(UserError, match="holds no volumes.*--data"):
        train(small(store, tmp_path / "a"))
    run = train(small(store, tmp_path / "b", data=phantom_dir), max_steps=1)
    assert "distill" in RunFolder(run).records()[0]
    altered = tmp_path / "altered"
    shutil.copytree(phantom_dir, altered)
    victim = sorted(altered.rglob("img*.nii.gz"))[0]
    import nibabel as nib
    import numpy as np

    img = nib.load(victim)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine, img.header), victim)
    with pytest.raises(UserError, match=f"{victim.name} differs from the file the store was made from"):
        train(small(store, tmp_path / "c", data=altered), max_steps=1)


def test_token_grid_crops(train_store, tmp_path):
    from stage2_train.method.iteration import DinoMixIteration, TrainState
    from stage2_train.sampling.volume_cache import VolumeCache
    from stage2_train.train.loop import open_training_store

    for grid, allowed in (("token", {0, 16, 32}), ("voxel", set(range(33)))):
        settings = small(train_store, None, crop_grid=grid)
        store = open_training_store(settings)
        volumes = VolumeCache(store, store.complete_cases(), with_labels=True)
        iteration = DinoMixIteration(settings, store, volumes, None, torch.device("cpu"))
        state = TrainState.seeded(0)
        rng = state.rngs["labeled_crops"]
        offsets = {o for _ in range(60) for c in iteration._crops(["0001"], rng) for o in c.offset[1:]}
        assert offsets <= allowed and len(offsets) >= 3
    with pytest.raises(ValueError, match="crop grid"):
        small(train_store, None, crop_grid="pixel")


def test_teacher_view_is_recorded_and_the_crop_view_needs_matching_windows(train_store, tmp_path):
    run = train(small(train_store, tmp_path / "slice"), max_steps=1)
    settings = json.loads((run / "settings.json").read_text())
    assert settings["teacher_view"] == "slice" and settings["crop_grid"] == "voxel"  # exact at any offset
    run = train(small(train_store, tmp_path / "crop", teacher_view="crop", targets="online"), max_steps=1)
    settings = json.loads((run / "settings.json").read_text())
    assert settings["teacher_view"] == "crop" and settings["crop_grid"] == "token"
    for targets in ("cache", "hybrid"):
        with pytest.raises(UserError, match="--crop-windows"):
            train(small(train_store, tmp_path / targets, teacher_view="crop", targets=targets), max_steps=1)
        assert not (tmp_path / targets).exists()
    with pytest.raises(ValueError, match="teacher view"):
        small(train_store, None, teacher_view="window")
