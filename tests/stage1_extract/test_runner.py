"""Stage one end to end: extraction, fidelity to a direct teacher forward, resume, refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.inspection import store_info, verify_store
from dinomix_cache.teacher.model import RANDOM_LABEL, TeacherSettings
from stage1_extract.runner import run_extraction
from tests.tiny import TINY_SHAPE, tiny_settings

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def test_extract_info_verify(phantom_dir, tmp_path):
    report = run_extraction(tiny_settings(phantom_dir, tmp_path / "s.zarr"))
    assert report.complete and len(report.computed) == 6 and report.slices == 6 * TINY_SHAPE[0]
    assert verify_store(tmp_path / "s.zarr", data=phantom_dir) == []
    info = store_info(tmp_path / "s.zarr")
    assert info["teacher"]["label"] == RANDOM_LABEL
    assert info["feature_shapes"] == [[16, 2, 2, 128]]
    assert info["feature_bytes_per_slice"] > 0 and info["incomplete_cases"] == []
    roles = {r: v["cases"] for r, v in info["cases_by_role"].items()}
    assert sum(roles.values()) == 6 and roles.get("labeled", 0) >= 1
    store = FeatureStore.open(tmp_path / "s.zarr")
    labeled = [c for c, r in store.roles().items() if r == "labeled"]
    expected = sum(np.bincount(store.read_volume(c, "label").ravel(), minlength=14) for c in labeled)
    np.testing.assert_array_equal(store.class_voxels(), expected)
    assert store.attrs.extraction.settings["teacher"]["source"] == "random:tiny"


def _save_dinov3(path):
    torch.manual_seed(1)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=16, num_register_tokens=4)).save_pretrained(path)
    return 5


def _save_dinov2(path):
    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=16, image_size=32)).save_pretrained(path)
    return 1


@pytest.mark.parametrize("save", [_save_dinov3, _save_dinov2], ids=["dinov3", "dinov2"])
def test_stored_features_equal_direct_forward(phantom_dir, tmp_path, save):
    teacher_dir = tmp_path / "teacher"
    prefix = save(teacher_dir)
    settings = tiny_settings(phantom_dir, tmp_path / "s.zarr", cases=("0001", "0002"),
                             teacher=TeacherSettings(source=str(teacher_dir)))
    run_extraction(settings)
    store = FeatureStore.open(tmp_path / "s.zarr")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(teacher_dir, use_safetensors=True).eval()
    for case in ("0001", "0002"):
        image = torch.from_numpy(store.read_volume(case, "image")).float()  # (D, H, W) as the teacher saw it
        pixels = (image[:, None].expand(-1, 3, -1, -1) - IMAGENET_MEAN) / IMAGENET_STD
        with torch.no_grad():
            tokens = model(pixel_values=pixels).last_hidden_state[:, prefix:]
        direct = tokens.reshape(len(image), 2, 2, -1).half().float()
        stored = torch.from_numpy(store.read_features(case).astype(np.float32))
        # Equal up to float16 rounding: at most one float16 step apart.
        step = torch.finfo(torch.float16).eps * direct.abs().clamp(min=2.0**-14)
        assert ((stored - direct).abs() <= step).all()


def test_resume_computes_only_missing_cases(phantom_dir, tmp_path):
    out = tmp_path / "s.zarr"
    first = run_extraction(tiny_settings(phantom_dir, out, cases=("0001", "0003")))
    assert first.computed == ["0001", "0003"] and not first.complete
    assert "extraction not finished" in verify_store(out)[-1] or verify_store(out)
    second = run_extraction(tiny_settings(phantom_dir, out))
    assert second.skipped == ["0001", "0003"]
    assert second.computed == ["0002", "0004", "0005", "0006"] and second.complete
    assert verify_store(out) == []
    fresh = run_extraction(tiny_settings(phantom_dir, tmp_path / "fresh.zarr"))
    assert fresh.complete
    a, b = FeatureStore.open(out), FeatureStore.open(tmp_path / "fresh.zarr")
    for case in a.roles():
        np.testing.assert_array_equal(a.read_features(case), b.read_features(case))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"teacher": TeacherSettings(source="random:vits16")}, "teacher.config_sha256"),
        ({"teacher": TeacherSettings(source="random:tiny", input_size=(64, 64))}, "teacher.input_size"),
        ({"teacher": TeacherSettings(source="random:tiny", dtype="bfloat16")}, "teacher.dtype"),
        ({"preprocess": PreprocessSettings(target_shape=TINY_SHAPE, hu_window=(-100.0, 200.0))},
         "preprocessing.hu_window"),
    ],
)
def test_refuses_store_made_with_other_settings(phantom_dir, tmp_path, change, field):
    out = tmp_path / "s.zarr"
    run_extraction(tiny_settings(phantom_dir, out, cases=("0001",)))
    before = (out / "zarr.json").read_bytes()
    with pytest.raises(UserError, match=rf"{field}.*--overwrite"):
        run_extraction(tiny_settings(phantom_dir, out, **change))
    assert (out / "zarr.json").read_bytes() == before
    rebuilt = run_extraction(tiny_settings(phantom_dir, out, overwrite=True, cases=("0002",), **change))
    assert rebuilt.computed == ["0002"] and FeatureStore.open(out).complete_cases() == ["0002"]


def test_unknown_case_refused_before_anything_is_written(phantom_dir, tmp_path):
    with pytest.raises(UserError, match="--cases 9999"):
        run_extraction(tiny_settings(phantom_dir, tmp_path / "s.zarr", cases=("9999",)))
    assert not (tmp_path / "s.zarr").exists()


def test_lossy_store_is_smaller_and_close(phantom_dir, tmp_path):
    from dinomix_cache.store.feature_store import StoreSettings

    run_extraction(tiny_settings(phantom_dir, tmp_path / "a.zarr", cases=("0001",)))
    run_extraction(tiny_settings(phantom_dir, tmp_path / "b.zarr", cases=("0001",),
                                 storage=StoreSettings(chunk_slices=4, compression="lossy", keepbits=7)))
    a = FeatureStore.open(tmp_path / "a.zarr").read_features("0001").astype(np.float32)
    b = FeatureStore.open(tmp_path / "b.zarr").read_features("0001").astype(np.float32)
    assert np.abs(a - b).max() <= 2.0**-8 * np.abs(a).max()
    assert not np.array_equal(a, b)


def test_no_volumes_store_has_features_and_stats_only(phantom_dir, tmp_path):
    from dinomix_cache.store.feature_store import StoreSettings

    out = tmp_path / "s.zarr"
    report = run_extraction(tiny_settings(phantom_dir, out, storage=StoreSettings(chunk_slices=4, volumes=False)))
    assert report.complete and verify_store(out) == []
    store = FeatureStore.open(out)
    assert not store.has_volume("0001") and store.class_voxels().sum() > 0
    with pytest.raises(UserError, match="no-volumes"):
        store.read_volume("0001")


def test_settings_replace_keeps_defaults():
    s = replace(tiny_settings(None, None), dataset="synapse", data=None, out=None).resolved()
    assert str(s.data) == "data/synapse" and str(s.out) == "storage/synapse.zarr"


def test_bench_extract_reports_both_throughputs(phantom_dir):
    from stage1_extract.bench import bench_extract

    result = bench_extract(tiny_settings(phantom_dir, None), max_cases=2, repeats=1)
    assert result["slices"] == 2 * TINY_SHAPE[0]
    assert result["slices_per_s_end_to_end"] > 0 and result["slices_per_s_teacher_only"] > 0
    assert result["ratio"] == round(result["slices_per_s_end_to_end"] / result["slices_per_s_teacher_only"], 4)
    assert RANDOM_LABEL in result["teacher"]
