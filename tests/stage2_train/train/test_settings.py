"""Every choice of a settings dataclass is refused when it is built, naming the CLI option."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinomix_cache.data.datasets import SplitSettings
from dinomix_cache.errors import SettingsError, UserError
from dinomix_cache.store.storage import COMPRESSIONS, StoreSettings
from stage1_extract.settings import ExtractSettings
from stage2_train.bench.ablation import AblationSettings
from stage2_train.evaluate.evaluation import SPLITS, EvaluateSettings
from stage2_train.evaluate.inference import CHECKPOINTS, InferenceSettings
from stage2_train.evaluate.metrics import CONVENTIONS
from stage2_train.method.losses import AUX_MODES
from stage2_train.method.pic import PicSettings
from stage2_train.targets.policies import POLICIES
from stage2_train.targets.views import TEACHER_VIEWS
from stage2_train.train.precision import MEMORY_FORMATS, PRECISIONS
from stage2_train.train.settings import CROP_GRIDS, DEFAULT_PRESET, PRESETS, TrainSettings, preset


@pytest.mark.parametrize(("field", "option", "choices"), [
    ("targets", "--targets", POLICIES),
    ("aux_mode", "--aux-mode", AUX_MODES),
    ("teacher_view", "--teacher-view", TEACHER_VIEWS),
    ("crop_grid", "--crop-grid", CROP_GRIDS),
    ("precision", "--precision", PRECISIONS),
    ("memory_format", "--memory-format", MEMORY_FORMATS),
])
def test_train_settings_refuse_an_unknown_choice_at_construction(field, option, choices):
    for value in choices:
        assert getattr(TrainSettings(cache="s.zarr", **{field: value}), field) == value
    with pytest.raises(SettingsError, match=f"unknown .*'foo' \\({option}\\): use one of {', '.join(choices)}"):
        TrainSettings(cache="s.zarr", **{field: "foo"})


def test_settings_error_is_a_user_error_and_a_value_error():
    with pytest.raises(UserError):
        TrainSettings(cache="s.zarr", targets="foo")
    with pytest.raises(ValueError):
        TrainSettings(cache="s.zarr", targets="foo")


def test_presets():
    assert DEFAULT_PRESET in PRESETS
    assert preset(DEFAULT_PRESET, "s.zarr") == TrainSettings(cache="s.zarr")
    for name in PRESETS:
        assert preset(name, "s.zarr").cache == Path("s.zarr")
    with pytest.raises(SettingsError, match=r"unknown preset 'gpu-huge' \(--preset\)"):
        preset("gpu-huge", "s.zarr")


def test_pic_settings_name_their_options():
    with pytest.raises(SettingsError, match="--pic-eta"):
        PicSettings(eta=-1)
    with pytest.raises(SettingsError, match="--pic-gamma"):
        PicSettings(gamma=float("inf"))
    assert PicSettings(eta=float("inf")).eta == float("inf")


def test_evaluation_and_inference_settings_refuse_at_construction(tmp_path):
    run = (tmp_path / "run",)
    for split in SPLITS:
        assert EvaluateSettings(runs=run, split=split).split == split
    with pytest.raises(SettingsError, match=r"\(--split\)"):
        EvaluateSettings(runs=run, split="train")
    for convention in CONVENTIONS:
        EvaluateSettings(runs=run, convention=convention)
    with pytest.raises(SettingsError, match=r"\(--convention\)"):
        EvaluateSettings(runs=run, convention="loose")
    for checkpoint in CHECKPOINTS:
        EvaluateSettings(runs=run, checkpoint=checkpoint)
        InferenceSettings(checkpoint=checkpoint)
    with pytest.raises(SettingsError, match=r"\(--checkpoint\)"):
        EvaluateSettings(runs=run, checkpoint="first")
    with pytest.raises(SettingsError, match=r"\(--checkpoint\)"):
        InferenceSettings(checkpoint="first")
    with pytest.raises(SettingsError, match="--stride"):
        EvaluateSettings(runs=run, stride=(16, 0, 32))
    with pytest.raises(SettingsError, match="--sw-batch-size"):
        InferenceSettings(sw_batch_size=0)
    with pytest.raises(UserError, match="--run"):
        EvaluateSettings(runs=())


def test_store_extract_and_ablation_settings_refuse_at_construction():
    for compression in COMPRESSIONS:
        StoreSettings(compression=compression)
    with pytest.raises(SettingsError, match=r"\(--compression\)"):
        StoreSettings(compression="zip")
    with pytest.raises(SettingsError, match="--keepbits"):
        StoreSettings(keepbits=10)
    with pytest.raises(SettingsError, match=r"\(--dataset\)"):
        ExtractSettings(dataset="brats")
    assert ExtractSettings(dataset="Synapse", split=SplitSettings(labeled="10p")).dataset == "Synapse"
    with pytest.raises(SettingsError, match=r"\(--targets\)"):
        AblationSettings(targets="foo")
    with pytest.raises(SettingsError, match=r"\(--preset\)"):
        AblationSettings(preset="gpu-huge")
