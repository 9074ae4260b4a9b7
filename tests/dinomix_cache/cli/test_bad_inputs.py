"""The bad-input corpus, stores and files: each crafted input gives exit 2, one line naming the file, and
changes nothing.

Run folders and checkpoints are in ``test_bad_run_folders.py``. Every input is built in a temporary
folder from the session's tiny store (``good_store``, six phantom cases at 16 x 32 x 32).
"""

from __future__ import annotations

import errno
import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr

from dinomix_cache.store.lock import StoreLock
from tests.corpus import TRAIN, cli, copy_store, edit_attrs, feature_chunks, read_only, refused, unchanged, write_msd
from tests.tiny import TINY_PHANTOM

ROOT = Path(__file__).resolve().parents[3]
UNLABELED = ("0001", "0002", "0005")  # the tiny split's unlabeled cases (0006 labeled, 0003 eval, 0004 test)
EXTRACT = ["--dataset", "phantom", "--teacher", "random:tiny", "--target-shape", "16x32x32", "--chunk-slices", "4",
           "--batch-size", "12", "--phantom-cases", len(TINY_PHANTOM.case_ids), "--phantom-matrix",
           TINY_PHANTOM.matrix, "--no-progress"]


def _dup(m: dict) -> None:
    m["dataset"]["cases"].append(dict(m["dataset"]["cases"][0]))


# (name, edit of the dinomix attribute, what the message must name)
ATTRIBUTE_EDITS = [
    ("role-missing", lambda m: m["dataset"]["cases"][0].pop("role"), "dinomix.dataset.cases[0].role"),
    ("storage-unknown-key", lambda m: m["storage"].update(level=3), "dinomix.storage.level"),
    ("hidden-size-text", lambda m: m["teacher"].update(hidden_size="abc"), "dinomix.teacher.hidden_size"),
    ("target-shape-text", lambda m: m["preprocessing"].update(target_shape="big"),
     "dinomix.preprocessing.target_shape"),
    ("patch-size-zero", lambda m: m["teacher"].update(patch_size=0), "dinomix.teacher.patch_size"),
    ("hidden-size-missing", lambda m: m["teacher"].pop("hidden_size"), "dinomix.teacher.hidden_size"),
    ("200000-classes", lambda m: m["dataset"].update(class_names=[f"c{i}" for i in range(200_000)]),
     "dinomix.dataset.class_names"),
    ("role-unknown", lambda m: m["dataset"]["cases"][1].update(role="weird"), "dinomix.dataset.cases[1].role"),
    ("volumes-text", lambda m: m["storage"].update(volumes="yes"), "dinomix.storage.volumes"),
    ("case-twice", _dup, "listed twice"),
    ("case-id-a-path", lambda m: m["dataset"]["cases"][2].update(id="../x"), "dinomix.dataset.cases[2].id"),
]


@pytest.mark.parametrize("verb", ["info", "verify", "train", "pack"])
@pytest.mark.parametrize(("edit", "field"), [e[1:] for e in ATTRIBUTE_EDITS], ids=[e[0] for e in ATTRIBUTE_EDITS])
def test_edited_store_attributes_are_refused_by_every_verb(good_store, tmp_path, verb, edit, field):
    store = edit_attrs(copy_store(good_store, tmp_path / "s.zarr"), edit)
    args = {"info": ["info", store], "verify": ["verify", store], "pack": ["pack", store, tmp_path / "s.zip"],
            "train": ["train", "--cache", store, "--out", tmp_path / "run", *TRAIN]}[verb]
    with unchanged(tmp_path):
        refused(cli(*args), store, field, "extract --overwrite")


def test_edited_store_attributes_are_refused_by_extract_and_evaluate(good_store, good_run, phantom_dir, tmp_path):
    store = edit_attrs(copy_store(good_store, tmp_path / "s.zarr"), ATTRIBUTE_EDITS[0][1])
    with unchanged(tmp_path):
        refused(cli("extract", "--data", phantom_dir, "--out", store, *EXTRACT), store, "cases[0].role")
        refused(cli("evaluate", "--run", good_run, "--cache", store, "--out", tmp_path / "ev", "--no-figures",
                    "--no-progress"), store, "cases[0].role")


@pytest.mark.parametrize(("edit", "says"), [
    (lambda m: m["teacher"].update(hidden_size=64), "16x2x2x128 float16 but the store's attributes say 16x2x2x64"),
    (lambda m: m["preprocessing"].update(target_shape=[32, 32, 32]), "attributes say 32x2x2x128"),
], ids=["hidden-size-64-over-128", "target-shape-against-arrays"])
def test_attributes_that_contradict_the_arrays(good_store, tmp_path, edit, says):
    store = edit_attrs(copy_store(good_store, tmp_path / "s.zarr"), edit)
    with unchanged(tmp_path):
        refused(cli("info", store), store, says, "dinomix-cache verify")
        refused(cli("train", "--cache", store, "--out", tmp_path / "run", *TRAIN), store, says)
        listed = cli("verify", store)
    assert listed.exit_code == 1 and "expected" in listed.stderr  # verify lists the problems instead


# ------------------------------------------------------------------------------------ damaged data
def _delete_unlabeled_features(store: Path) -> str:
    for case in UNLABELED:
        for chunk in feature_chunks(store, case):
            chunk.unlink()
    return "features holds the fill value"


def _chunk(store: Path, case: str, name: str) -> Path:
    return store / "volumes" / case / name / "c" / "1" / "0" / "0"


def _truncate_image_chunk(store: Path) -> str:
    chunk = _chunk(store, "0001", "image")
    chunk.write_bytes(chunk.read_bytes()[:-40])
    return "case 0001 image cannot be read"


def _flip_image_byte(store: Path) -> str:
    chunk = _chunk(store, "0001", "image")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    return "case 0001 image cannot be read"


def _delete_label_chunk(store: Path) -> str:
    _chunk(store, "0006", "label").unlink()
    return "case 0006 label holds the fill value"


@pytest.mark.parametrize("damage", [_delete_unlabeled_features, _truncate_image_chunk, _flip_image_byte,
                                    _delete_label_chunk],
                         ids=["features-deleted", "chunk-truncated", "chunk-bit-flipped", "label-chunk-deleted"])
def test_no_training_on_damaged_or_missing_data(good_store, tmp_path, damage):
    store = copy_store(good_store, tmp_path / "s.zarr")
    says = damage(store)
    with unchanged(tmp_path):  # a refused train leaves no run folder, even one refused mid-step
        message = refused(cli("train", "--cache", store, "--out", tmp_path / "run", *TRAIN), says)
    assert f"dinomix-cache verify {store}" in message


# ------------------------------------------------------------------------------------ NIfTI inputs
def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 3.0, 1.0])), path)
    return path


def _header_only(path: Path, shape: tuple[int, ...], dtype: type = np.int16) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    raw = header.binaryblock + b"\0" * 4 + b"\1" * 100  # the header, its extension flag, 100 data bytes
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _ct(**change: object) -> np.ndarray:
    volume = np.random.default_rng(0).integers(-200, 300, (24, 20, 10)).astype(np.float32)
    for index, value in change.items():
        volume.flat[int(index.removeprefix("v"))] = value
    return volume


NIFTI_INPUTS = [
    ("rgb24", lambda p: _nifti(p, np.zeros((24, 20, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])), "RGB"),
    ("complex64", lambda p: _nifti(p, _ct().astype(np.complex64)), "complex64"),
    ("plus-inf", lambda p: _nifti(p, _ct(v7=np.inf)), "NaN or infinite"),
    ("minus-inf", lambda p: _nifti(p, _ct(v7=-np.inf)), "NaN or infinite"),
    ("nan", lambda p: _nifti(p, _ct(v7=np.nan)), "NaN or infinite"),
    ("declares-2000x2000x1000", lambda p: _header_only(p, (2000, 2000, 1000)), "declares 2000x2000x1000"),
    ("declares-30000-cubed", lambda p: _header_only(p, (30000, 30000, 30000), np.uint8), "declares 30000x30000x30000"),
]


@pytest.mark.parametrize(("make", "says"), [n[1:] for n in NIFTI_INPUTS], ids=[n[0] for n in NIFTI_INPUTS])
def test_bad_nifti_is_refused_before_anything_is_allocated(good_run, tmp_path, make, says):
    scan = make(tmp_path / "scan.nii.gz")
    with unchanged(tmp_path):
        refused(cli("predict", "--run", good_run, "--input", scan, "--output", tmp_path / "labels.nii.gz",
                    "--no-progress"), scan, says)


def test_a_label_header_declaring_more_than_its_file_in_extract(tmp_path):
    data = write_msd(tmp_path / "msd", n=5)
    label = _header_only(data / "labelsTr" / "case_001.nii.gz", (30000, 30000, 30000), np.uint8)
    assert label.stat().st_size < 600
    result = cli("extract", "--dataset", "msd", "--data", data, "--out", tmp_path / "s.zarr", "--teacher",
                 "random:tiny", "--target-shape", "16x32x32", "--no-progress")
    refused(result, label, "declares 30000x30000x30000")
    # cases before the bad one are kept for a rerun (extract resumes); the bad one is not in the store
    assert "case_001" not in zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["features"]


# ------------------------------------------------------------------------------------ files and locks
def test_a_second_extract_through_a_symlink_meets_the_same_lock(good_store, phantom_dir, tmp_path):
    store = copy_store(good_store, tmp_path / "s.zarr")
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    with StoreLock(store), unchanged(tmp_path):
        refused(cli("extract", "--data", phantom_dir, "--out", link, *EXTRACT), "being written by another extraction",
                f"pid {os.getpid()}")


def test_overwrite_through_a_symlinked_out_is_refused(good_store, phantom_dir, tmp_path):
    store = copy_store(good_store, tmp_path / "s.zarr")
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    with unchanged(tmp_path):
        refused(cli("extract", "--data", phantom_dir, "--out", link, "--overwrite", *EXTRACT), link,
                "symbolic link", "pass the store's own path")


def test_overwrite_refuses_a_store_that_is_being_read(good_store, phantom_dir, tmp_path):
    store = copy_store(good_store, tmp_path / "s.zarr")
    code = ("import sys, time; from dinomix_cache.store.lock import ReaderLock\n"
            f"with ReaderLock({str(store)!r}):\n    print('reading', flush=True); time.sleep(60)\n")
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert reader.stdout.readline().strip() == "reading"
        with unchanged(tmp_path):
            refused(cli("extract", "--data", phantom_dir, "--out", store, "--overwrite", *EXTRACT),
                    f"refusing to delete {store}", f"being read by pid {reader.pid}")
    finally:
        reader.kill()
        reader.wait(timeout=10)
        reader.stdout.close()


def test_pack_refuses_a_destination_inside_the_store(good_store, tmp_path):
    store = copy_store(good_store, tmp_path / "s.zarr")
    with unchanged(tmp_path):
        refused(cli("pack", store, store / "s.zip", "--no-progress"), store / "s.zip", "inside the store")
        refused(cli("pack", store, store / "features" / "x.zip", "--no-progress"), "inside the store")


@pytest.mark.parametrize("verb", ["extract", "train", "pack", "evaluate"])
def test_a_read_only_output_folder_is_one_line_naming_it(good_store, good_run, phantom_dir, tmp_path, monkeypatch,
                                                         verb):
    store = copy_store(good_store, tmp_path / "s.zarr")
    run = copy_store(good_run, tmp_path / "run")
    ro = tmp_path / "ro"
    ro.mkdir()
    args = {"extract": ["extract", "--data", phantom_dir, "--out", ro / "s.zarr", *EXTRACT],
            "train": ["train", "--cache", store, "--out", ro / "run", *TRAIN],
            "pack": ["pack", store, ro / "s.zip", "--no-progress"],
            "evaluate": ["evaluate", "--run", run, "--out", ro / "ev", "--no-figures", "--no-progress"]}[verb]
    with unchanged(tmp_path), read_only(monkeypatch, ro):
        refused(cli(*args), ro, "read-only file system")


def test_a_full_disk_at_the_first_checkpoint_leaves_no_run_folder(good_store, tmp_path, monkeypatch):
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with unchanged(tmp_path):
        refused(cli("train", "--cache", good_store, "--out", tmp_path / "run", *TRAIN), tmp_path / "run",
                ".pt", "no space left on device")
