"""The bad-input corpus, run folders: damaged, foreign or hostile settings.json, store.json and checkpoints
give exit 2 and one line naming the file, under ``train --resume``, ``evaluate`` and ``predict``, and change
nothing; a hostile pickle in any loadable place leaves no trace.

Every input is a copy of the session's one-step run (``good_run``) with one file damaged.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.corpus import TRAIN, cli, copy_store, edit_json, refused, unchanged

# A stopped resume: the run is at step 1 already, so nothing trains.
RESUME = ["--max-steps", "1", "--no-progress"]


@pytest.fixture
def run(good_run: Path, tmp_path: Path) -> Path:
    return copy_store(good_run, tmp_path / "run")


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    path = tmp_path / "scan.nii.gz"
    volume = np.random.default_rng(0).integers(-200, 300, (24, 20, 10)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 3.0, 1.0])), path)
    return path


def verbs(run: Path, scan: Path, checkpoint: str = "best") -> dict[str, list[object]]:
    """The three verbs that load a run folder; ``checkpoint`` for evaluate and predict."""
    return {"resume": ["train", "--resume", run, *RESUME],
            "evaluate": ["evaluate", "--run", run, "--checkpoint", checkpoint, "--out", run.parent / "ev",
                         "--no-figures", "--no-progress"],
            "predict": ["predict", "--run", run, "--checkpoint", checkpoint, "--input", scan,
                        "--output", run.parent / "labels.nii.gz", "--no-progress"]}


# ------------------------------------------------------------------------------------ checkpoints
def _truncated(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "not a readable checkpoint"


def _empty(path: Path) -> str:
    path.write_bytes(b"")
    return "is empty (0 bytes)"


def _foreign(path: Path) -> str:
    torch.save({"weights": torch.zeros(3)}, path)
    return "not a checkpoint of a dinomix-cache run (networks (missing"


def _foreign_shapes(path: Path) -> str:
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["networks"]["student"]))
    payload["networks"]["student"][key] = torch.zeros(7, 7)
    torch.save(payload, path)
    return "does not fit"


@pytest.mark.parametrize("damage", [_truncated, _empty, _foreign, _foreign_shapes],
                         ids=["truncated", "empty", "foreign", "other-shapes"])
@pytest.mark.parametrize("verb", ["resume", "evaluate", "predict"])
def test_a_damaged_checkpoint_is_one_line_naming_it(run, scan, tmp_path, verb, damage):
    name = "latest" if verb == "resume" else "best"
    says = damage(run / f"{name}.pt")
    with unchanged(tmp_path):
        refused(cli(*verbs(run, scan)[verb]), run / f"{name}.pt", says)


class Hostile:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _write_hostile(path: Path, marker: Path, fmt: str) -> None:
    payload = {"networks": Hostile(marker), "state": {"step": 1}}
    if fmt == "zip":
        torch.save(payload, path)
    elif fmt == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
@pytest.mark.parametrize(("verb", "name"), [("resume", "latest"), ("evaluate", "best"), ("predict", "best"),
                                            ("evaluate", "latest"), ("predict", "latest")])
def test_a_hostile_pickle_in_any_loadable_place_leaves_no_trace(run, scan, tmp_path, verb, name, fmt):
    marker = tmp_path / "PWNED"
    _write_hostile(run / f"{name}.pt", marker, fmt)
    with unchanged(tmp_path):
        refused(cli(*verbs(run, scan, name)[verb]), run / f"{name}.pt", "refused by the safe loader")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ settings.json
SETTINGS_EDITS = [
    ("extra-key", lambda s: {**s, "widht": 4}, "invalid setting widht (unknown key)"),
    ("wrong-type", lambda s: {**s, "width": "2"}, "invalid setting width (Input should be a valid integer)"),
    ("out-of-bounds", lambda s: {**s, "width": 100_000}, "invalid setting width"),
    ("a-list", lambda s: [s], "not a JSON object"),
]


@pytest.mark.parametrize(("edit", "says"), [e[1:] for e in SETTINGS_EDITS], ids=[e[0] for e in SETTINGS_EDITS])
@pytest.mark.parametrize("verb", ["resume", "evaluate", "predict"])
def test_a_bad_settings_json_is_one_line_naming_it(run, scan, tmp_path, verb, edit, says):
    edit_json(run / "settings.json", edit)
    with unchanged(tmp_path):
        refused(cli(*verbs(run, scan)[verb]), run / "settings.json", says)


@pytest.mark.parametrize("verb", ["resume", "evaluate", "predict"])
def test_settings_json_that_is_not_json(run, scan, tmp_path, verb):
    (run / "settings.json").write_text('{"cache": "s.zarr", ')
    with unchanged(tmp_path):
        refused(cli(*verbs(run, scan)[verb]), run / "settings.json", "Invalid JSON")


def test_settings_json_that_disagrees_with_the_checkpoint(run, scan, tmp_path):
    edit_json(run / "settings.json", lambda s: {**s, "width": 4})
    with unchanged(tmp_path):
        refused(cli(*verbs(run, scan)["resume"]), run / "latest.pt", "does not fit the run's student network")
        refused(cli(*verbs(run, scan)["predict"]), run / "best.pt", "does not fit the student")


# ------------------------------------------------------------------------------------ store.json
def _rehash(identity: dict) -> dict:
    canonical = json.dumps(identity["meta"], sort_keys=True, separators=(",", ":"))
    return {**identity, "attrs_sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def _fewer_classes(identity: dict) -> dict:
    identity["meta"]["dataset"]["class_names"] = identity["meta"]["dataset"]["class_names"][:3]
    return _rehash(identity)


STORE_JSON_EDITS = [
    ("no-attrs-sha256", lambda i: {k: v for k, v in i.items() if k != "attrs_sha256"}, "attrs_sha256 (missing)"),
    ("meta-edited", lambda i: i["meta"]["teacher"].update(hidden_size=64), "do not hash to its attrs_sha256"),
    ("meta-invalid", lambda i: _rehash({**i, "meta": {**i["meta"], "storage": {"volumes": "yes"}}}),
     "dinomix.storage"),
    ("a-string", lambda i: "store", "invalid store identity"),
]


@pytest.mark.parametrize(("edit", "says"), [e[1:] for e in STORE_JSON_EDITS], ids=[e[0] for e in STORE_JSON_EDITS])
@pytest.mark.parametrize("verb", ["resume", "evaluate", "predict"])
def test_a_bad_store_json_is_one_line_naming_it(run, scan, tmp_path, verb, edit, says):
    edit_json(run / "store.json", edit)
    with unchanged(tmp_path):
        refused(cli(*verbs(run, scan)[verb]), run / "store.json", says)


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_store_json_that_disagrees_with_the_checkpoint(run, scan, tmp_path, verb):
    edit_json(run / "store.json", _fewer_classes)  # consistent in itself, but not the checkpoint's classes
    with unchanged(tmp_path):
        refused(cli(*verbs(run, scan)[verb]), run / "best.pt", "does not fit the student")


# ------------------------------------------------------------------------------------ new runs, temporaries
def test_training_options_out_of_bounds_create_nothing(good_store, tmp_path):
    with unchanged(tmp_path):
        refused(cli("train", "--cache", good_store, "--out", tmp_path / "run", *TRAIN, "--width", "100000"),
                "invalid setting width")


def test_a_killed_checkpoint_write_is_cleaned_on_the_next_start(run):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    stale = run / f".latest.pt.{dead.pid}.0123abcd.tmp"
    live = run / ".latest.pt.1.89abcdef.tmp"  # pid 1 is alive: a writer still at work keeps its file
    stale.write_bytes(b"")
    live.write_bytes(b"")
    result = cli("train", "--resume", run, *RESUME)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists()
