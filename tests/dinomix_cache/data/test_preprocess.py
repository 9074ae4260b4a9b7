"""Preprocessing: orientation, intensity, resize, npy handling, provenance and input validation."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinomix_cache.data.datasets import CaseSource
from dinomix_cache.data.orientation import reorient_to_array, reorient_to_file
from dinomix_cache.data.preprocess import PreprocessSettings, load_case
from dinomix_cache.data.volume_files import file_sha256
from dinomix_cache.errors import UserError

SHAPE = (20, 24, 12)  # file voxel order (i, j, k); k is the slice axis
LPS = np.diag([-0.8, -0.7, 2.5, 1.0])  # what ITK/SimpleITK writes for an identity-direction DICOM series
RAS = np.diag([0.8, 0.7, 2.5, 1.0])
LPS[:3, 3] = [100.0, 80.0, -50.0]
RAS[:3, 3] = [-100.0, -80.0, -50.0]
# Slices stored along i, rows along k: a permuted, partly flipped storage order.
PERMUTED = np.array([[0.0, 0.0, -0.8, 10.0], [0.0, 0.7, 0.0, -5.0], [2.5, 0.0, 0.0, 3.0], [0, 0, 0, 1]])


def world_coords(shape, affine) -> np.ndarray:
    """RAS+ world coordinates (x, y, z) of every voxel, shape (*shape, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def write_nifti(path: Path, data: np.ndarray, affine=LPS, dtype=None) -> Path:
    img = nib.Nifti1Image(data, affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def ct_volume(seed: int = 0, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.normal(40, 15, shape)
    vol[:3] = -1000  # air
    vol[-2:, :, :4] = 900  # bone
    return vol.astype(np.int16)


def label_volume(shape=SHAPE, values=(0, 1, 6, 13)) -> np.ndarray:
    lbl = np.zeros(shape, np.uint8)
    lbl[5:9, 6:12, 2:6] = values[1]
    lbl[10:15, 4:20, 5:10] = values[2]
    lbl[2:4, 2:4, 2:4] = values[3]
    return lbl


def nifti_case(tmp_path: Path, image=None, label=None, affine=LPS, label_affine=None,
               name="0001") -> CaseSource:
    img = write_nifti(tmp_path / f"img{name}.nii.gz", ct_volume() if image is None else image, affine)
    lbl = write_nifti(tmp_path / f"label{name}.nii.gz", label_volume() if label is None else label,
                      affine if label_affine is None else label_affine)
    return CaseSource(name, "labeled", img, lbl, "nifti")


CANON = (SHAPE[2], SHAPE[1], SHAPE[0])  # (D, H, W) of an axially stored volume, no resize
NO_RESIZE = PreprocessSettings(target_shape=CANON, image_dtype="float32")


# --- orientation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [RAS, LPS, PERMUTED], ids=["RAS", "LPS", "permuted"])
def test_canonical_axes_point_superior_posterior_left(affine):
    xyz = reorient_to_array(world_coords(SHAPE, affine), affine)  # reorients the voxels' own coordinates
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    assert np.all(np.diff(z, axis=0) > 0)  # axis 0: inferior -> superior
    assert np.all(np.diff(y, axis=1) < 0)  # axis 1: anterior -> posterior (RAS+ y points anterior)
    assert np.all(np.diff(x, axis=2) < 0)  # axis 2: patient right -> left (RAS+ x points right)
    # Each axis moves along one world axis only.
    assert np.allclose(np.diff(x, axis=0), 0) and np.allclose(np.diff(z, axis=2), 0)


def test_known_voxels_land_where_radiologists_expect():
    # A marker at the patient's right-anterior-inferior corner and one at left-posterior-superior.
    for affine in (RAS, LPS):
        coords = world_coords(SHAPE, affine)
        vol = np.zeros(SHAPE, np.int16)
        # max x (right), max y (anterior), min z (inferior)
        rai = np.unravel_index(np.argmin(coords @ [-1, -1, 1]), SHAPE)
        lps = np.unravel_index(np.argmax(coords @ [-1, -1, 1]), SHAPE)
        vol[rai], vol[lps] = 1, 2
        out = reorient_to_array(vol, affine)
        assert out.shape == CANON
        assert out[0, 0, 0] == 1  # first slice (feet), top row (anterior), left column (patient right)
        assert out[-1, -1, -1] == 2


def test_lps_file_matches_simpleitk_array_order():
    vol = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    # SimpleITK's GetArrayFromImage of an identity-direction (LPS) image is the (k, j, i) transpose.
    assert np.array_equal(reorient_to_array(vol, LPS), vol.transpose(2, 1, 0))
    assert np.array_equal(reorient_to_array(vol, RAS), vol.transpose(2, 1, 0)[:, ::-1, ::-1])
    for affine in (RAS, LPS, PERMUTED):
        assert np.array_equal(reorient_to_file(reorient_to_array(vol, affine), affine), vol)


# --- intensity, resize, dtypes ---------------------------------------------------------------------


def test_clip_and_minmax_exact(tmp_path):
    vol = ct_volume()
    res = load_case(nifti_case(tmp_path, image=vol), NO_RESIZE, num_classes=14)
    expected = (np.clip(vol.astype(np.float32), -75, 275) + 75) / (275 - (-75))  # bone hits 275, air -75
    assert res.image.dtype == np.float32 and res.image.shape == CANON
    assert res.image.min() == 0.0 and res.image.max() == 1.0
    np.testing.assert_allclose(res.image, reorient_to_array(expected, LPS), atol=1e-6)
    assert res.label.dtype == np.uint8
    np.testing.assert_array_equal(res.label, reorient_to_array(label_volume(), LPS))


def test_minmax_uses_clipped_range(tmp_path):
    vol = np.full(SHAPE, 0, np.int16)
    vol[0] = 100
    res = load_case(nifti_case(tmp_path, image=vol), NO_RESIZE, num_classes=14)
    assert set(np.unique(res.image).tolist()) == {0.0, 1.0}  # 0 HU -> 0, 100 HU -> 1 (min-max, not window)
    window = PreprocessSettings(target_shape=CANON, normalisation="window")
    res = load_case(nifti_case(tmp_path, image=vol), window, num_classes=14)
    assert np.isclose(res.image.min(), 75 / 350) and np.isclose(res.image.max(), 175 / 350)


def test_resize_shape_dtype_and_modes(tmp_path):
    settings = PreprocessSettings(target_shape=(8, 10, 14), image_dtype="float32")
    res = load_case(nifti_case(tmp_path), settings, num_classes=14)
    assert res.image.shape == (8, 10, 14) and res.image.dtype == np.float32
    assert res.label.shape == (8, 10, 14) and res.label.dtype == np.uint8
    assert res.image.min() >= 0.0 and res.image.max() <= 1.0
    assert set(np.unique(res.label)) <= {0, 1, 6, 13}
    # Same as torch's interpolate: trilinear without corner alignment, and legacy "nearest".
    ref = load_case(nifti_case(tmp_path), NO_RESIZE, num_classes=14)
    img_ref = F.interpolate(torch.from_numpy(ref.image)[None, None], size=(8, 10, 14), mode="trilinear",
                            align_corners=False)[0, 0].numpy()
    lbl_ref = F.interpolate(torch.from_numpy(ref.label.astype(np.float32))[None, None], size=(8, 10, 14),
                            mode="nearest")[0, 0].numpy().astype(np.uint8)
    np.testing.assert_allclose(res.image, img_ref, atol=1e-6)
    np.testing.assert_array_equal(res.label, lbl_ref)


def test_default_image_is_the_float32_result_rounded_to_float16(tmp_path):
    exact = load_case(nifti_case(tmp_path), PreprocessSettings(target_shape=(8, 10, 14), image_dtype="float32"), 14)
    default = load_case(nifti_case(tmp_path), PreprocessSettings(target_shape=(8, 10, 14)), 14)
    assert default.image.dtype == np.float16
    np.testing.assert_array_equal(default.image, exact.image.astype(np.float16))
    assert np.abs(default.image.astype(np.float32) - exact.image).max() <= 2.0**-12


def test_source_record_and_sha256(tmp_path):
    case = nifti_case(tmp_path)
    res = load_case(case, NO_RESIZE, num_classes=14)
    src = res.source
    assert src["image_sha256"] == hashlib.sha256(case.image.read_bytes()).hexdigest()
    assert file_sha256(case.image) == src["image_sha256"]
    assert src["label_sha256"] == hashlib.sha256(case.label.read_bytes()).hexdigest()
    assert src["image"] == str(case.image) and src["label"] == str(case.label)
    assert src["shape"] == list(SHAPE) and src["orientation"] == "LPS"
    np.testing.assert_allclose(src["spacing"], [0.8, 0.7, 2.5], atol=1e-6)
    np.testing.assert_allclose(np.array(src["affine"]), LPS, atol=1e-5)


def test_scaled_storage_and_singleton_4d(tmp_path):
    stored = ((ct_volume().astype(np.int32) + 1024) // 2).astype(np.int16)
    hu = stored.astype(np.float32) * 2 - 1024
    img = nib.Nifti1Image(stored[..., None], LPS)  # 4D with one volume
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "img0001.nii.gz"))
    lbl = write_nifti(tmp_path / "label0001.nii.gz", label_volume().astype(np.float32))  # float-typed labels
    res = load_case(CaseSource("0001", "labeled", tmp_path / "img0001.nii.gz", lbl, "nifti"), NO_RESIZE, 14)
    expected = (np.clip(hu, -75, 275) + 75) / 350
    np.testing.assert_allclose(res.image, reorient_to_array(expected, LPS), atol=1e-5)
    np.testing.assert_array_equal(res.label, reorient_to_array(label_volume(), LPS))


def test_npy_not_resized_at_target_and_resized_otherwise(tmp_path):
    hu = ct_volume().transpose(2, 1, 0).astype(np.float32)  # peers' npy: (D, H, W), raw HU
    np.save(tmp_path / "0001_image.npy", hu)
    np.save(tmp_path / "0001_label.npy", label_volume().transpose(2, 1, 0).astype(np.int8))
    case = CaseSource("0001", "labeled", tmp_path / "0001_image.npy", tmp_path / "0001_label.npy", "npy")
    res = load_case(case, PreprocessSettings(target_shape=hu.shape, image_dtype="float32"), num_classes=14)
    np.testing.assert_allclose(res.image, (np.clip(hu, -75, 275) + 75) / 350, atol=1e-6)
    np.testing.assert_array_equal(res.label, label_volume().transpose(2, 1, 0))
    assert res.source["orientation"] == "as stored (npy, no geometry)" and res.source["affine"] is None
    assert res.source["image_sha256"] == file_sha256(case.image)
    res = load_case(case, PreprocessSettings(target_shape=(6, 8, 8), image_dtype="float32"), num_classes=14)
    assert res.image.shape == res.label.shape == (6, 8, 8)
    assert res.image.dtype == np.float32 and res.label.dtype == np.uint8


def test_unlabeled_case_without_label(tmp_path):
    img = write_nifti(tmp_path / "c_0000.nii.gz", ct_volume())
    res = load_case(CaseSource("c", "unlabeled", img, None, "nifti"), NO_RESIZE, num_classes=3)
    assert res.label is None and res.source["label"] is None and res.source["label_sha256"] is None


# --- validation ------------------------------------------------------------------------------------


def test_corrupt_and_truncated_files(tmp_path):
    case = nifti_case(tmp_path)
    good = case.image.read_bytes()
    case.image.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    with pytest.raises(UserError, match=r"img0001\.nii\.gz.*corrupt or truncated"):
        load_case(case, NO_RESIZE, 14)
    raw = gzip.decompress(good)
    case.image.write_bytes(gzip.compress(raw[: len(raw) - 500]))  # complete gzip, short data
    with pytest.raises(UserError, match=r"img0001\.nii\.gz"):
        load_case(case, NO_RESIZE, 14)
    case.image.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(UserError, match=r"img0001\.nii\.gz"):
        load_case(case, NO_RESIZE, 14)
    case.image.unlink()
    with pytest.raises(UserError, match=r"img0001\.nii\.gz"):
        load_case(case, NO_RESIZE, 14)
    plain = write_nifti(tmp_path / "img0002.nii", ct_volume())  # uncompressed, cut short
    plain.write_bytes(plain.read_bytes()[:-300])
    with pytest.raises(UserError, match=r"img0002\.nii .*truncated"):
        load_case(CaseSource("0002", "unlabeled", plain, None, "nifti"), NO_RESIZE, 14)


def test_not_3d(tmp_path):
    case = nifti_case(tmp_path, image=ct_volume()[:, :, 0])
    with pytest.raises(UserError, match=r"img0001\.nii\.gz is 2D"):
        load_case(case, NO_RESIZE, 14)
    case = nifti_case(tmp_path, image=np.stack([ct_volume(), ct_volume(1)], axis=-1))
    with pytest.raises(UserError, match=r"img0001\.nii\.gz has shape \(20, 24, 12, 2\)"):
        load_case(case, NO_RESIZE, 14)


def test_image_label_grid_mismatch(tmp_path):
    case = nifti_case(tmp_path, label=label_volume()[:, :, :-1])
    with pytest.raises(UserError, match=r"label0001\.nii\.gz has \(20, 24, 11\)"):
        load_case(case, NO_RESIZE, 14)
    shifted = LPS.copy()
    shifted[0, 3] += 0.01
    case = nifti_case(tmp_path, label_affine=shifted)
    with pytest.raises(UserError, match=r"different affines") as err:
        load_case(case, NO_RESIZE, 14)
    assert "img0001.nii.gz" in str(err.value) and "label0001.nii.gz" in str(err.value)
    almost = LPS.copy()
    almost[0, 3] += 1e-4  # within the 1e-3 mm tolerance
    load_case(nifti_case(tmp_path, label_affine=almost), NO_RESIZE, 14)


def test_label_values_checked(tmp_path):
    with pytest.raises(UserError, match=r"label0003\.nii\.gz has values \[14, 15\] outside 0\.\.13"):
        load_case(nifti_case(tmp_path, label=label_volume(values=(0, 1, 14, 15)), name="0003"), NO_RESIZE, 14)
    neg = label_volume().astype(np.int16)
    neg[0, 0, 0] = -1
    with pytest.raises(UserError, match=r"\[-1\] outside 0\.\.13"):
        load_case(nifti_case(tmp_path, label=neg), NO_RESIZE, 14)
    frac = label_volume().astype(np.float32)
    frac[0, 0, 0] = 0.5
    with pytest.raises(UserError, match=r"label0001\.nii\.gz has non-integer label values \[0\.5\]"):
        load_case(nifti_case(tmp_path, label=frac), NO_RESIZE, 14)


def test_degenerate_affine(tmp_path):
    case = nifti_case(tmp_path)
    hdr = nib.load(str(case.image)).header.copy()
    hdr.set_sform(np.diag([0.8, 0.7, 0.0, 1.0]), code=1)
    hdr.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(ct_volume(), None, header=hdr), str(case.image))
    with pytest.raises(UserError, match=r"img0001\.nii\.gz has a degenerate affine"):
        load_case(case, NO_RESIZE, 14)


def test_constant_volume(tmp_path):
    case = nifti_case(tmp_path, image=np.full(SHAPE, -1000, np.int16))
    with pytest.raises(UserError, match=r"img0001\.nii\.gz is constant"):
        load_case(case, NO_RESIZE, 14)


def test_bad_npy(tmp_path):
    (tmp_path / "0001_image.npy").write_bytes(b"\x93NUMPY garbage")
    case = CaseSource("0001", "unlabeled", tmp_path / "0001_image.npy", None, "npy")
    with pytest.raises(UserError, match=r"0001_image\.npy"):
        load_case(case, NO_RESIZE, 14)
    np.save(tmp_path / "0001_image.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(UserError, match=r"0001_image\.npy has shape \(4, 4\)"):
        load_case(case, NO_RESIZE, 14)


def test_settings_validation_and_json():
    doc = PreprocessSettings().to_json()
    assert doc["target_shape"] == [80, 160, 160] and doc["hu_window"] == [-75.0, 275.0]
    assert doc["orientation"] == "SPL" and doc["label_interpolation"] == "nearest"
    assert PreprocessSettings(orientation="ras").orientation == "RAS"
    for bad in ({"orientation": "SLR"}, {"target_shape": (8, 8)}, {"hu_window": (5, -5)},
                {"normalisation": "zscore"}, {"label_interpolation": "trilinear"}):
        with pytest.raises(UserError):
            PreprocessSettings(**bad)


def test_settings_round_trip_through_the_store_record():
    settings = PreprocessSettings(target_shape=(16, 32, 48), hu_window=(-100, 200), normalisation="window",
                                  image_dtype="float32")
    assert PreprocessSettings.from_json(settings.to_json()) == settings
