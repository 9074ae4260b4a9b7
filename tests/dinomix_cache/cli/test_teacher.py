"""The ``train-teacher`` verb: bad input gives exit 2, one line naming the option or folder, and writes nothing."""

from __future__ import annotations

import shutil

from tests.corpus import cli, refused, unchanged, write_msd
from tests.tiny import TINY_PHANTOM

TINY = ["--target-shape", "16x32x32", "--phantom-cases", len(TINY_PHANTOM.case_ids), "--phantom-matrix",
        TINY_PHANTOM.matrix, "--steps", "1", "--batch-size", "2", "--no-progress"]


def test_help_says_what_it_is_not():
    shown = " ".join(cli("train-teacher", "--help").stdout.split())
    assert "not: a pretrained DINOv3" in shown and "ORACLE" in shown


def test_unknown_labels_value_is_refused(phantom_dir, tmp_path):
    with unchanged(phantom_dir):
        refused(cli("train-teacher", "--data", phantom_dir, "--out", tmp_path / "t", "--labels", "all", *TINY),
                "--labels", "'all'")
    assert not (tmp_path / "t").exists()


def test_a_non_empty_out_is_refused_and_kept(phantom_dir, tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with unchanged(tmp_path):
        refused(cli("train-teacher", "--data", phantom_dir, "--out", out, *TINY), out, "--overwrite")
        # --overwrite replaces teacher folders only
        refused(cli("train-teacher", "--data", phantom_dir, "--out", out, "--overwrite", *TINY), out,
                "dinomix_teacher.json")


def test_a_dataset_without_labels_is_refused(tmp_path):
    data = write_msd(tmp_path / "msd", n=5)
    shutil.rmtree(data / "labelsTr")
    with unchanged(tmp_path):
        refused(cli("train-teacher", "--dataset", "msd", "--data", data, "--out", tmp_path / "t", *TINY),
                "has no label", data)
