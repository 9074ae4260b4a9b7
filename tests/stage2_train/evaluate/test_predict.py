"""Prediction writes labels that overlay the input scan: its grid, orientation and header, atomically."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinomix_cache.data.datasets import CaseSource
from dinomix_cache.data.preprocess import PreprocessSettings, load_case
from dinomix_cache.errors import UserError
from dinomix_cache.phantom.generate import PhantomSettings, generate_phantom
from stage2_train.evaluate.predict import predict_paths, segment_file, write_label
from tests.tiny import TINY_SHAPE

NUM_CLASSES = 14
# Matrix 96 with 7.5 mm slices: in-plane 3.7 mm, so organs exceed 1000 voxels and spacing is anisotropic.
ANISO_PHANTOM = PhantomSettings(case_ids=("0001", "0002"), matrix=96, spacing_mm=(0.7, 0.7),
                                thickness_mm=(5.0, 5.0), max_thickness_scale=1.5)
# Mixed grid: D and W are upsampled, H (96 → 80) downsampled.
MIXED_SHAPE = (40, 80, 112)


def _threshold(image: np.ndarray) -> np.ndarray:
    return (image > 0.5).astype(np.uint8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def permuted_case(tmp_path_factory) -> tuple[Path, Path]:
    """A phantom scan and label re-stored with slices along the first file axis ("ILA" axcodes)."""
    root = generate_phantom(tmp_path_factory.mktemp("aniso"), ANISO_PHANTOM, progress=False)
    out = tmp_path_factory.mktemp("permuted")
    paths = []
    for src, name in ((root / "imagesTr/img0002.nii.gz", "scan.nii.gz"),
                      (root / "labelsTr/label0002.nii.gz", "truth.nii.gz")):
        img = nib.load(src)
        # file x → axis 1, file y → axis 2 flipped, file z (slices) → axis 0 flipped; the affine follows,
        # so every voxel keeps its world position.
        moved = img.as_reoriented(np.array([[1, 1], [2, -1], [0, -1]]))
        nib.save(moved, out / name)
        paths.append(out / name)
    return paths[0], paths[1]


def _oracle(scan: Path, truth: Path, settings: PreprocessSettings):
    """A segmenter returning the preprocessed ground truth, after checking it got the training image."""
    case = load_case(CaseSource("p", "test", scan, truth, "nifti"), settings, NUM_CLASSES)

    def segment(image: np.ndarray) -> np.ndarray:
        assert image.dtype == case.image.dtype and np.array_equal(image, case.image)
        return case.label

    return segment


def test_permuted_anisotropic_scan_round_trips(permuted_case, tmp_path):
    scan, truth = permuted_case
    src = nib.load(scan)
    spacing = np.linalg.norm(src.affine[:3, :3], axis=0)
    assert nib.aff2axcodes(src.affine) == ("I", "L", "A") and spacing[0] > 1.5 * spacing[1]
    settings = PreprocessSettings(target_shape=MIXED_SHAPE)

    [out] = predict_paths(scan, tmp_path / "pred.nii.gz", settings, NUM_CLASSES, _oracle(scan, truth, settings))

    written = nib.load(out)
    assert written.shape == src.shape and np.allclose(written.affine, src.affine)
    assert written.get_data_dtype() == np.uint8
    assert int(written.header["sform_code"]) == int(src.header["sform_code"])
    assert int(written.header["qform_code"]) == int(src.header["qform_code"])
    with nib.openers.ImageOpener(out) as fh:  # the loaded image's header no longer holds the scaling
        raw = nib.Nifti1Header.from_fileobj(fh)
    assert float(raw["scl_slope"]) == 1.0 and float(raw["scl_inter"]) == 0.0
    pred, ref = np.asanyarray(written.dataobj), np.asanyarray(nib.load(truth).dataobj)
    organs = [c for c in range(1, NUM_CLASSES) if (ref == c).sum() > 1000]
    assert len(organs) >= 3
    dice = {c: _dice(pred == c, ref == c) for c in organs}
    assert min(dice.values()) >= 0.9, dice


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_upsampled_labels_map_back_voxel_exact(permuted_case, tmp_path, mode):
    """On a grid finer than the scan, each scan voxel gets back exactly the label it was sampled into."""
    scan, truth = permuted_case
    settings = PreprocessSettings(target_shape=(48, 112, 112), label_interpolation=mode)
    labels, reference = segment_file(scan, settings, NUM_CLASSES, _oracle(scan, truth, settings))
    assert labels.dtype == np.uint8 and reference.shape == labels.shape
    assert np.array_equal(labels, np.asanyarray(nib.load(truth).dataobj))


def test_existing_output_refused_then_overwritten(phantom_dir, tmp_path):
    scan = phantom_dir / "imagesTr/img0001.nii.gz"
    settings = PreprocessSettings(target_shape=TINY_SHAPE)
    out = tmp_path / "label.nii.gz"
    predict_paths(scan, out, settings, NUM_CLASSES, _threshold)
    before = out.read_bytes()

    def zeros(image: np.ndarray) -> np.ndarray:
        return np.zeros(image.shape, np.uint8)

    with pytest.raises(UserError) as exc:
        predict_paths(scan, out, settings, NUM_CLASSES, zeros)
    assert str(out) in _one_line(exc) and "--overwrite" in str(exc.value)
    assert out.read_bytes() == before

    predict_paths(scan, out, settings, NUM_CLASSES, zeros, overwrite=True)
    assert not np.asanyarray(nib.load(out).dataobj).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label.nii.gz"]  # no temporary left behind


def test_missing_parent_folders_created_and_plain_nii_written(phantom_dir, tmp_path):
    scan = phantom_dir / "imagesTr/img0002.nii.gz"
    out = tmp_path / "a" / "b" / "label.nii"
    [written] = predict_paths(scan, out, PreprocessSettings(target_shape=TINY_SHAPE), NUM_CLASSES, _threshold)
    assert written == out and out.read_bytes()[:2] != b"\x1f\x8b"  # .nii is not gzipped
    assert nib.load(out).shape == nib.load(scan).shape


def test_folder_input_writes_one_label_per_scan(phantom_dir, tmp_path):
    scans = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))
    written = predict_paths(phantom_dir / "imagesTr", tmp_path / "pred", PreprocessSettings(target_shape=TINY_SHAPE),
                            NUM_CLASSES, _threshold, progress=True)
    assert [p.name for p in written] == [s.name for s in scans] and len(scans) == 6
    for scan, out in zip(scans, written, strict=True):
        src, lab = nib.load(scan), nib.load(out)
        assert lab.shape == src.shape and np.allclose(lab.affine, src.affine)
        assert lab.get_data_dtype() == np.uint8


def test_folder_collision_refused_before_anything_is_written(phantom_dir, tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    third = out / sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[2].name
    third.write_bytes(b"keep")
    with pytest.raises(UserError) as exc:
        predict_paths(phantom_dir / "imagesTr", out, PreprocessSettings(target_shape=TINY_SHAPE),
                      NUM_CLASSES, _threshold)
    assert str(third) in _one_line(exc)
    assert list(out.iterdir()) == [third] and third.read_bytes() == b"keep"


@pytest.mark.parametrize("shape", [(64, 64, 1), (1, 64, 64), (64, 64)])
def test_2d_image_refused(tmp_path, shape):
    scan = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(-100, 200, shape).astype(np.int16), np.eye(4)), scan)
    with pytest.raises(UserError) as exc:
        predict_paths(scan, tmp_path / "out.nii.gz", PreprocessSettings(target_shape=TINY_SHAPE), NUM_CLASSES,
                      _threshold)
    assert str(scan) in _one_line(exc) and "is 2D" in str(exc.value) and "3D CT volume is needed" in str(exc.value)
    assert not (tmp_path / "out.nii.gz").exists()


def test_npy_refused(tmp_path):
    scan = tmp_path / "0001_image.npy"
    np.save(scan, np.zeros(TINY_SHAPE, np.float32))
    with pytest.raises(UserError) as exc:
        predict_paths(scan, tmp_path / "out.nii.gz", PreprocessSettings(target_shape=TINY_SHAPE), NUM_CLASSES,
                      _threshold)
    assert str(scan) in _one_line(exc) and ".npy" in str(exc.value) and "NIfTI" in str(exc.value)


def test_bad_inputs_and_outputs_refused_in_one_line(phantom_dir, tmp_path):
    settings = PreprocessSettings(target_shape=TINY_SHAPE)
    scan = phantom_dir / "imagesTr/img0001.nii.gz"
    cases = {
        "does not exist": (tmp_path / "missing.nii.gz", tmp_path / "out.nii.gz"),
        "holds no .nii": (tmp_path, tmp_path / "out"),
        "must end in .nii.gz": (scan, tmp_path / "out.mha"),
        "is the input scan itself": (scan, scan.parent),
    }
    for needle, (src, dst) in cases.items():
        with pytest.raises(UserError) as exc:
            predict_paths(src, dst, settings, NUM_CLASSES, _threshold)
        assert needle in _one_line(exc)

    degenerate = tmp_path / "flat.nii.gz"
    volume = np.random.default_rng(0).integers(-100, 200, (8, 8, 8)).astype(np.int16)
    header = nib.Nifti1Header()
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(volume, None, header=header), degenerate)
    with pytest.raises(UserError) as exc:
        predict_paths(degenerate, tmp_path / "out.nii.gz", settings, NUM_CLASSES, _threshold)
    assert str(degenerate) in _one_line(exc) and "degenerate affine" in str(exc.value)


def test_segmenter_contract_and_label_grid_checked(phantom_dir, tmp_path):
    scan = phantom_dir / "imagesTr/img0001.nii.gz"
    settings = PreprocessSettings(target_shape=TINY_SHAPE)
    with pytest.raises(ValueError, match="preprocessed grid"):
        segment_file(scan, settings, NUM_CLASSES, lambda image: np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="class ids in 0..13"):
        segment_file(scan, settings, NUM_CLASSES, lambda image: np.full(image.shape, 14, np.int64))
    labels, reference = segment_file(scan, settings, NUM_CLASSES, _threshold)
    with pytest.raises(ValueError, match="reference grid"):
        write_label(labels[:-1], reference, tmp_path / "x.nii.gz")
