"""One JSON codec for every settings dataclass: round trips, and settings recorded by older runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinomix_cache.data.datasets import SplitSettings
from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.errors import SettingsError, UserError
from dinomix_cache.phantom.generate import PhantomSettings
from dinomix_cache.settings_codec import settings_from_json, settings_to_json
from dinomix_cache.store.feature_store import StoreSettings
from dinomix_cache.teacher.model import TeacherSettings
from stage1_extract.settings import ExtractSettings
from stage2_train.bench.ablation import AblationSettings
from stage2_train.evaluate.evaluation import EvaluateSettings
from stage2_train.evaluate.inference import InferenceSettings
from stage2_train.method.pic import PicSettings
from stage2_train.train.run_schema import dataclass_from_json, train_settings_from_json
from stage2_train.train.settings import TrainSettings

EVERY_SETTINGS = [
    ExtractSettings(dataset="msd", data=Path("data/x"), out=Path("out/s.zarr"), cases=("a", "b"),
                    crop_windows=(128, 128), split=SplitSettings(labeled="10p", split_dir=Path("splits")),
                    teacher=TeacherSettings(source="random:tiny", input_size=(224, 224)),
                    storage=StoreSettings(compression="lossy", keepbits=5), phantom=PhantomSettings(matrix=64)),
    ExtractSettings(),
    SplitSettings(),
    PreprocessSettings(target_shape=(16, 32, 32), hu_window=(-100.0, 200.0)),
    TeacherSettings(),
    StoreSettings(volumes=False),
    PhantomSettings(case_ids=("0001", "0002"), noise_hu=(0.0, 5.0)),
    PicSettings(eta=float("inf"), box_fraction=(0.25, 0.5, 0.5)),
    TrainSettings(cache="s.zarr"),
    TrainSettings(cache="https://host/s.zarr", out=Path("runs/r"), data=Path("data"), crop=(32, 64, 64),
                  pic=PicSettings(enabled=False), crop_grid="token", projector_hidden=256),
    TrainSettings(cache="s.zarr", precision="float32").resolved(torch.device("cpu")),
    EvaluateSettings(runs=(Path("runs/a"), Path("runs/b")), cache="s.zip", stride=(8, 16, 16)),
    InferenceSettings(patch=(16, 32, 32)),
    AblationSettings(rows=("pic",), seeds=(0, 1), crop=(16, 32, 32)),
]


@pytest.mark.parametrize("settings", EVERY_SETTINGS, ids=lambda s: type(s).__name__)
def test_every_settings_dataclass_round_trips(settings):
    data = settings_to_json(settings)
    assert json.loads(json.dumps(data)) == data  # plain JSON
    back = settings_from_json(type(settings), json.loads(json.dumps(data)))
    assert back == settings
    assert settings_to_json(back) == data


def test_json_form_of_paths_tuples_nested_and_none():
    data = settings_to_json(EVERY_SETTINGS[0])
    assert data["out"] == "out/s.zarr" and data["crop_windows"] == [128, 128]
    assert data["teacher"]["input_size"] == [224, 224] and data["teacher"]["revision"] is None
    assert data["split"]["split_dir"] == "splits"
    back = settings_from_json(ExtractSettings, data)
    assert isinstance(back.out, Path) and isinstance(back.split.split_dir, Path) and back.crop_windows == (128, 128)


def test_a_url_keeps_its_double_slash():
    settings = settings_from_json(TrainSettings, settings_to_json(TrainSettings(cache="s3://bucket/s.zarr")))
    assert settings.cache == "s3://bucket/s.zarr"


def test_missing_keys_take_the_defaults_and_unknown_keys_are_refused():
    assert settings_from_json(StoreSettings, {"keepbits": 5}) == StoreSettings(keepbits=5)
    with pytest.raises(SettingsError, match="unknown StoreSettings setting.*colour"):
        settings_from_json(StoreSettings, {"colour": "red"})
    with pytest.raises(SettingsError, match="crop_windows: expected 2 values"):
        settings_from_json(ExtractSettings, {"crop_windows": [1, 2, 3]})
    with pytest.raises(SettingsError, match="missing"):
        settings_from_json(TrainSettings, {})
    with pytest.raises(SettingsError, match=r"\(--targets\)"):
        settings_from_json(TrainSettings, {"cache": "s.zarr", "targets": "foo"})


def test_the_schema_builds_through_the_codec():
    settings = TrainSettings(cache="s.zarr", crop=(32, 64, 64), pic=PicSettings(eta=0.5), crop_grid="voxel")
    assert dataclass_from_json(TrainSettings, json.dumps(settings_to_json(settings)), "settings.json") == settings
    with pytest.raises(UserError, match="settings.json: invalid setting targets"):
        data = {**settings_to_json(settings), "targets": "foo"}
        dataclass_from_json(TrainSettings, json.dumps(data), "settings.json")


def test_an_old_settings_json_still_loads_as_it_trained():
    # Runs saved before precision and memory_format were recorded trained with bf16 autocast on a GPU,
    # float32 on a CPU, contiguous tensors: they resume and evaluate that way, not as `auto` would choose.
    data = settings_to_json(TrainSettings(cache="s.zarr"))
    del data["precision"], data["memory_format"], data["crop_grid"], data["teacher_view"]
    old = train_settings_from_json(json.dumps(data), "settings.json")
    assert old.memory_format == "contiguous"
    assert old.precision == ("bfloat16" if torch.cuda.is_available() else "float32")
    assert old.teacher_view == "slice" and old.crop_grid is None
    recorded = settings_to_json(TrainSettings(cache="s.zarr", precision="bfloat16"))
    assert train_settings_from_json(json.dumps(recorded), "settings.json").precision == "bfloat16"
