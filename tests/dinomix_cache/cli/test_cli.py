"""The command line: bad input gives one clear line, exit code 2, and leaves stores untouched."""

from __future__ import annotations

import errno
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from dinomix_cache.cli.app import app
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.lock import StoreLock

runner = CliRunner()
BASE = ["--teacher", "random:tiny", "--target-shape", "16x32x32", "--no-progress", "--batch-size", "8"]


def write_msd(root: Path, n: int = 5, shape=(24, 20, 10)) -> Path:
    """A tiny MSD-style dataset: dataset.json, imagesTr/case_00i_0000.nii.gz, labelsTr/case_00i.nii.gz."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "organ": 1, "lesion": 2}, "file_ending": ".nii.gz"}))
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(-200, 300, shape).astype(np.int16)
        label = np.zeros(shape, np.uint8)
        label[5:15, 5:15, 2:8] = 1
        label[8:10, 8:10, 4:6] = 2
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    return root


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result, result.stderr if hasattr(result, "stderr") else result.output


def extract_msd(data: Path, out: Path, *extra: str):
    return invoke("extract", "--dataset", "msd", "--data", str(data), "--out", str(out), *BASE, *extra)


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr  # one line, the last one
    return errors[0]


def test_extract_msd_then_info_and_verify(tmp_path):
    data = write_msd(tmp_path / "msd")
    result, _ = extract_msd(data, tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    info, _ = invoke("info", str(tmp_path / "s.zarr"))
    assert info.exit_code == 0 and "random, not pretrained" in info.stdout and "16x2x2x128" in info.stdout
    assert "bytes per slice" in info.stdout
    ok, _ = invoke("verify", str(tmp_path / "s.zarr"), "--data", str(data))
    assert ok.exit_code == 0 and "OK" in ok.stdout


def test_missing_data_folder(tmp_path):
    result, _ = invoke("extract", "--dataset", "synapse", "--data", str(tmp_path / "nope"),
                       "--out", str(tmp_path / "s.zarr"), *BASE)
    assert "nope" in one_line_error(result)
    assert not (tmp_path / "s.zarr").exists()


def test_no_cases_found(tmp_path):
    (tmp_path / "empty" / "imagesTr").mkdir(parents=True)
    result, _ = invoke("extract", "--dataset", "synapse", "--data", str(tmp_path / "empty"),
                       "--out", str(tmp_path / "s.zarr"), *BASE)
    assert "empty" in one_line_error(result)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_corrupt_or_truncated_nifti(tmp_path, damage):
    data = write_msd(tmp_path / "msd")
    bad = data / "imagesTr" / "case_002_0000.nii.gz"
    raw = bad.read_bytes()
    bad.write_bytes(b"not a nifti at all" * 10 if damage == "corrupt" else raw[: len(raw) // 2])
    result, _ = extract_msd(data, tmp_path / "s.zarr")
    message = one_line_error(result)
    assert "case_002_0000.nii.gz" in message
    if (tmp_path / "s.zarr").exists():  # cases finished before the bad one are kept, the bad one is not there
        assert "case_002" not in zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["features"]


def test_image_label_shape_mismatch(tmp_path):
    data = write_msd(tmp_path / "msd")
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 11), np.uint8), np.diag([0.8, 0.8, 3.0, 1.0])),
             data / "labelsTr" / "case_001.nii.gz")
    assert "case_001" in one_line_error(extract_msd(data, tmp_path / "s.zarr")[0])


def test_image_label_geometry_mismatch(tmp_path):
    data = write_msd(tmp_path / "msd")
    label = nib.load(data / "labelsTr" / "case_001.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), np.diag([0.8, 0.8, 2.0, 1.0])),
             data / "labelsTr" / "case_001.nii.gz")
    assert "case_001" in one_line_error(extract_msd(data, tmp_path / "s.zarr")[0])


def test_label_values_outside_classes(tmp_path):
    data = write_msd(tmp_path / "msd")
    path = data / "labelsTr" / "case_003.nii.gz"
    label = np.asarray(nib.load(path).dataobj).copy()
    label[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(label, np.diag([0.8, 0.8, 3.0, 1.0])), path)
    message = one_line_error(extract_msd(data, tmp_path / "s.zarr")[0])
    assert "case_003.nii.gz" in message and "7" in message


def test_input_size_not_multiple_of_patch(tmp_path):
    data = write_msd(tmp_path / "msd")
    result, _ = extract_msd(data, tmp_path / "s.zarr", "--input-size", "40")
    assert "16" in one_line_error(result)
    assert not (tmp_path / "s.zarr").exists()


def test_store_made_with_another_teacher_is_untouched(tmp_path):
    data = write_msd(tmp_path / "msd")
    assert extract_msd(data, tmp_path / "s.zarr")[0].exit_code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    result, _ = extract_msd(data, tmp_path / "s.zarr", "--input-size", "64")
    assert "teacher.input_size" in one_line_error(result) and "--overwrite" in result.stderr
    after = {p: p.read_bytes() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    assert after == before


def test_out_path_that_is_not_a_store(tmp_path):
    data = write_msd(tmp_path / "msd")
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):
        result, _ = extract_msd(data, tmp_path / "thesis", *extra)
        assert "not a dinomix feature store" in one_line_error(result)
    assert (tmp_path / "thesis" / "chapter1.tex").read_text() == "precious"
    assert "not a feature store" in one_line_error(invoke("info", str(tmp_path / "thesis"))[0])


def test_second_extract_into_a_locked_store(tmp_path):
    data = write_msd(tmp_path / "msd")
    with StoreLock(tmp_path / "s.zarr"):
        result, _ = extract_msd(data, tmp_path / "s.zarr")
    assert "being written by another extraction" in one_line_error(result)
    assert not (tmp_path / "s.zarr").exists()


def test_disk_full_mid_case_then_rerun_resumes(tmp_path, monkeypatch):
    data = write_msd(tmp_path / "msd")
    real_setitem = zarr.Array.__setitem__
    calls = {"n": 0}

    def fail_on_third_case(self, key, value):
        calls["n"] += 1
        if calls["n"] == 7:  # 3 arrays per case (image, label, features): mid-way through the third case
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", fail_on_third_case)
    result, _ = extract_msd(data, tmp_path / "s.zarr", "--read-threads", "1")
    message = one_line_error(result)
    assert "no space left on device" in message and "incomplete" in message and "rerun" in message
    monkeypatch.undo()
    from dinomix_cache.store.feature_store import FeatureStore

    store = FeatureStore.open(tmp_path / "s.zarr")
    assert "case_002" in store.incomplete_cases() and "case_000" in store.complete_cases()
    missing = store.incomplete_cases()
    rerun, _ = extract_msd(data, tmp_path / "s.zarr")
    assert rerun.exit_code == 0
    assert f"extracting {len(missing)}: {' '.join(missing)}" in rerun.stderr
    assert len(FeatureStore.open(tmp_path / "s.zarr").complete_cases()) == 5


def test_offline_pretrained_teacher_gives_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_msd(tmp_path / "msd")
    result = runner.invoke(app, ["extract", "--dataset", "msd", "--data", str(data), "--out", str(tmp_path / "s.zarr"),
                                 "--teacher", "facebook/dinov3-vits16-pretrain-lvd1689m", "--no-progress"])
    message = one_line_error(result)
    assert "gated" in message and "--teacher" in message
    assert not (tmp_path / "s.zarr").exists()


def test_verify_reports_a_damaged_store(tmp_path):
    data = write_msd(tmp_path / "msd")
    extract_msd(data, tmp_path / "s.zarr")
    chunk = next((tmp_path / "s.zarr" / "features" / "case_000" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(gzip.compress(b"garbage"))
    (data / "labelsTr" / "case_004.nii.gz").write_bytes(b"changed")
    result, _ = invoke("verify", str(tmp_path / "s.zarr"), "--data", str(data))
    assert result.exit_code == 1
    assert "case case_000 features: unreadable" in result.stderr
    assert "case_004.nii.gz changed since extraction" in result.stderr


def test_lossy_compression_options_reach_the_store(tmp_path):
    result = runner.invoke(app, ["extract", "--help"])
    assert result.exit_code == 0 and "--keepbits" in result.output and "lossy" in result.output
    data = write_msd(tmp_path / "msd")
    result, _ = extract_msd(data, tmp_path / "s.zarr", "--compression", "lossy", "--keepbits", "5")
    assert result.exit_code == 0, result.output
    storage = FeatureStore.open(tmp_path / "s.zarr").attrs.storage
    assert (storage.compression, storage.keepbits) == ("lossy", 5)
