"""The synthetic abdominal CT phantom: layout, determinism, anatomy, HU and the skip logic."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import dinomix_cache.phantom.generate as phantom
from dinomix_cache.data.classes import SYNAPSE_CLASSES
from dinomix_cache.errors import UserError
from dinomix_cache.phantom.generate import (
    PHANTOM_VERSION,
    PhantomSettings,
    generate_phantom,
    phantom_case,
    voxel_fractions,
)

SMALL = PhantomSettings(case_ids=("0001", "0002", "0003"), matrix=48)
LIVER, SPLEEN, R_KIDNEY, L_KIDNEY, GALLBLADDER, AORTA, IVC = 6, 1, 2, 3, 4, 8, 9
R_ADRENAL, L_ADRENAL = 12, 13


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), SMALL, progress=False)


def _load(root: Path, case_id: str) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    return nib.load(root / "imagesTr" / f"img{case_id}.nii.gz"), nib.load(root / "labelsTr" / f"label{case_id}.nii.gz")


def _centroid(label: np.ndarray, affine: np.ndarray, cls: int) -> np.ndarray:
    """World (RAS+ mm) centroid of one class."""
    ijk = np.argwhere(label == cls).mean(axis=0)
    return (affine @ np.append(ijk, 1.0))[:3]


def test_layout_record_and_headers(small_root: Path) -> None:
    record = json.loads((small_root / "phantom.json").read_text())
    assert record["version"] == PHANTOM_VERSION
    assert record["settings"] == SMALL.to_json()
    assert sorted(record["cases"]) == list(SMALL.case_ids)
    for case_id, codes in (("0001", ("R", "A", "S")), ("0002", ("L", "P", "S"))):
        img, lab = _load(small_root, case_id)
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert img.shape == lab.shape and img.shape[:2] == (48, 48) and 7 <= img.shape[2] <= 18
        assert np.allclose(img.affine, lab.affine)
        assert nib.aff2axcodes(img.affine) == codes
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert np.abs(img.affine[:3, 3]).min() > 1.0  # a real, non-zero origin
        spacing = np.abs(np.diag(img.affine)[:3])
        assert 0.7 * 512 / 48 - 1e-6 <= spacing[0] <= 0.9 * 512 / 48 + 1e-6 and spacing[0] == spacing[1]
        assert 15.0 - 1e-6 <= spacing[2] <= 30.0 + 1e-6  # 2.5-5 mm x min(512 / 48, 6)
        assert np.asarray(img.dataobj).dtype == np.int16  # stored without scaling


def test_bytes_identical_across_runs(small_root: Path, tmp_path: Path) -> None:
    again = generate_phantom(tmp_path / "again", SMALL, progress=False)
    for case_id in SMALL.case_ids:
        for sub, name in (("imagesTr", f"img{case_id}.nii.gz"), ("labelsTr", f"label{case_id}.nii.gz")):
            assert (small_root / sub / name).read_bytes() == (again / sub / name).read_bytes()


def test_one_case_alone_equals_full_run(small_root: Path) -> None:
    image, label, affine = phantom_case("0002", PhantomSettings(case_ids=("0002",), matrix=48))
    img, lab = _load(small_root, "0002")
    assert np.array_equal(np.asarray(img.dataobj), image)
    assert np.array_equal(np.asarray(lab.dataobj), label)
    assert np.allclose(img.affine, affine)


def test_every_class_present(small_root: Path) -> None:
    for case_id in SMALL.case_ids:
        _, lab = _load(small_root, case_id)
        present = np.unique(np.asarray(lab.dataobj))
        assert present.tolist() == list(range(len(SYNAPSE_CLASSES))), case_id


@pytest.mark.parametrize("case_id", ["0001", "0002"])  # RAS- and LPS-ordered voxels
def test_anatomical_sides_in_world_coordinates(small_root: Path, case_id: str) -> None:
    _, lab = _load(small_root, case_id)
    label, affine = np.asarray(lab.dataobj), lab.affine
    c = {k: _centroid(label, affine, k) for k in (LIVER, SPLEEN, R_KIDNEY, L_KIDNEY, AORTA, IVC)}
    # NIfTI world is RAS+: +x is the patient's right, +y anterior, +z superior.
    assert c[LIVER][0] > c[SPLEEN][0] + 80.0  # liver on the right, spleen on the left
    assert c[R_KIDNEY][0] > c[L_KIDNEY][0] + 80.0
    assert c[R_KIDNEY][2] < c[L_KIDNEY][2]  # the right kidney sits lower
    assert c[AORTA][0] < c[IVC][0]  # aorta left of the inferior vena cava
    assert c[AORTA][1] > c[R_KIDNEY][1] and c[SPLEEN][1] < c[LIVER][1]  # kidneys and spleen posterior


def test_hounsfield_units_plausible(small_root: Path) -> None:
    for case_id in SMALL.case_ids:
        img, lab = _load(small_root, case_id)
        canon_img, canon_lab = nib.as_closest_canonical(img), nib.as_closest_canonical(lab)
        image, label = np.asarray(canon_img.dataobj), np.asarray(canon_lab.dataobj)
        assert 90.0 <= image[label == LIVER].mean() <= 130.0
        assert image[label == AORTA].mean() > image[label == LIVER].mean()
        assert image[label == GALLBLADDER].mean() < 40.0
        corner = image[:4, -4:, :]  # patient's left, anterior: air outside the body
        assert abs(float(np.median(corner)) + 1000.0) <= 5.0
        assert image.min() >= -1024 and image.max() > 300  # bone present


def test_class_imbalance_order(small_root: Path) -> None:
    fractions = np.mean([voxel_fractions(np.asarray(_load(small_root, c)[1].dataobj)) for c in SMALL.case_ids],
                        axis=0)
    assert fractions[LIVER] > fractions[SPLEEN] > fractions[GALLBLADDER] > max(fractions[R_ADRENAL],
                                                                                 fractions[L_ADRENAL])
    assert 0.02 < fractions[LIVER] < 0.08 and fractions[R_ADRENAL] < 0.001


def test_voxel_fractions() -> None:
    label = np.array([[0, 1], [1, 13]], dtype=np.uint8)
    fractions = voxel_fractions(label)
    assert fractions.shape == (14,) and fractions.dtype == np.float64
    assert fractions[0] == 0.25 and fractions[1] == 0.5 and fractions[13] == 0.25 and fractions.sum() == 1.0
    assert voxel_fractions(label, num_classes=20).shape == (20,)
    for bad in (np.array([14]), np.array([-1]), np.array([0.5]), np.zeros(0, dtype=np.uint8)):
        with pytest.raises(ValueError):
            voxel_fractions(bad)


def test_skip_regenerate_and_stale_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two = PhantomSettings(case_ids=("0001", "0002"), matrix=32)
    root = generate_phantom(tmp_path / "p", two, progress=False)
    calls: list[str] = []
    real = phantom.phantom_case

    def counting(case_id: str, settings: PhantomSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        calls.append(case_id)
        return real(case_id, settings)

    monkeypatch.setattr(phantom, "phantom_case", counting)
    generate_phantom(root, two, progress=False)
    assert calls == []  # identical settings and version: nothing to do
    (root / "labelsTr" / "label0002.nii.gz").unlink()
    generate_phantom(root, two, progress=False)
    assert calls == ["0001", "0002"]  # a missing file makes it redo the set
    one = PhantomSettings(case_ids=("0001",), matrix=32, seed=3)
    generate_phantom(root, one, progress=False)
    assert calls[2:] == ["0001"]
    assert not (root / "imagesTr" / "img0002.nii.gz").exists()  # stale case of the old record removed
    assert json.loads((root / "phantom.json").read_text())["settings"]["seed"] == 3


def test_interrupted_generation_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = PhantomSettings(case_ids=("0001", "0002"), matrix=32)
    real = phantom.phantom_case

    def failing(case_id: str, s: PhantomSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if case_id == "0002":
            raise KeyboardInterrupt
        return real(case_id, s)

    monkeypatch.setattr(phantom, "phantom_case", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_phantom(tmp_path, settings, progress=False)
    assert not (tmp_path / "phantom.json").exists()
    monkeypatch.setattr(phantom, "phantom_case", real)
    generate_phantom(tmp_path, settings, progress=False)
    assert json.loads((tmp_path / "phantom.json").read_text())["version"] == PHANTOM_VERSION
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("changes", [{"matrix": 8}, {"seed": -1}, {"case_ids": ("0001", "0001")},
                                     {"case_ids": ("../x",)}, {"case_ids": ()}, {"spacing_mm": (0.9, 0.7)},
                                     {"scan_length_mm": (100.0, 120.0)}])
def test_bad_settings_refused(changes: dict) -> None:
    with pytest.raises(UserError):
        PhantomSettings(**changes)
