"""The provenance file of a teacher folder that this project trained (``dinomix_teacher.json``).

``dinomix-cache train-teacher`` writes it beside ``config.json`` and ``model.safetensors``; loading
the folder (:func:`~dinomix_cache.teacher.pretrained.load_pretrained`) reads it, so that such a
teacher is named by what it is (e.g. "trained on phantom labels (labeled split), not pretrained")
in the store, in ``info`` and in evaluation outputs, never as "pretrained". A folder without the
file is an ordinary pretrained checkpoint.

Failure modes: :func:`read_provenance` raises :class:`~dinomix_cache.errors.UserError` for a file
that is not valid JSON, lacks a field, claims "not an oracle" in its label while recording oracle
labels, or was written for other weights than the folder holds (the label would then be a lie).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from dinomix_cache.errors import UserError

__all__ = ["LABEL_SOURCES", "ORACLE_MARK", "PROVENANCE_FILE", "PROVENANCE_KIND", "LabelSource", "files_sha256",
           "read_provenance", "store_record", "trained_label"]

PROVENANCE_FILE = "dinomix_teacher.json"
PROVENANCE_KIND = "dinomix-trained-teacher"
# Whose labels a trained teacher learnt from: the labeled split only (fair for semi-supervised
# comparisons), or every training case, the unlabeled ones too (an oracle for those cases).
LabelSource = Literal["labeled", "train"]
LABEL_SOURCES: tuple[str, ...] = get_args(LabelSource)
ORACLE_MARK = "ORACLE"


def trained_label(dataset: str, labels: str) -> str:
    """The teacher label of a teacher trained on ``dataset``'s labels of the ``labels`` cases, e.g.
    ``"trained on phantom labels (labeled split), not pretrained"``; ``labels="train"`` adds the
    oracle warning, which every place that names the teacher then shows."""
    if labels == "labeled":
        return f"trained on {dataset} labels (labeled split), not pretrained"
    return (f"trained on {dataset} labels (all training cases), not pretrained; {ORACLE_MARK}: trained on the "
            "labels of unlabeled cases")


def files_sha256(paths: Sequence[Path]) -> str:
    """SHA-256 of the files' bytes, concatenated in name order (the store's ``weights_sha256``)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 23), b""):
                digest.update(chunk)
    return digest.hexdigest()


def store_record(provenance: dict[str, Any]) -> dict[str, Any]:
    """What the store's ``teacher.training`` records of a provenance file: enough to tell a fair
    teacher from an oracle and to find the cases it learnt from (the rest stays in the folder)."""
    return {"dataset": provenance["dataset"], "labels": provenance["labels"], "oracle": provenance["oracle"],
            "cases": list(provenance["cases"]), "target_shape": list(provenance["target_shape"]),
            "seed": provenance["seed"]}


def read_provenance(folder: Path, weight_files: Sequence[Path]) -> dict[str, Any] | None:
    """The provenance record of a teacher folder, or None when it has no ``dinomix_teacher.json``.

    Args:
        folder: the teacher folder.
        weight_files: the safetensors files the model was loaded from; their hash must be the one
            the file records.

    Raises:
        UserError: unreadable or incomplete file, a label that hides an oracle, or other weights.
    """
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}); retrain the teacher with train-teacher --overwrite") from None
    fields = {"kind": str, "label": str, "labels": str, "oracle": bool, "dataset": str, "cases": list,
              "target_shape": list, "seed": int, "weights_sha256": str}
    bad = [k for k, kind in fields.items() if not isinstance(record, dict) or not isinstance(record.get(k), kind)]
    if bad or record["kind"] != PROVENANCE_KIND or record["labels"] not in LABEL_SOURCES:
        what = f"field {bad[0]!r} missing or mistyped" if bad else "not a train-teacher record"
        raise UserError(f"{path}: {what}; retrain the teacher with train-teacher --overwrite, or remove the file "
                        "to load the folder as an ordinary checkpoint")
    if record["oracle"] != (record["labels"] == "train") or record["oracle"] != (ORACLE_MARK in record["label"]):
        raise UserError(f"{path}: its label {record['label']!r} and its oracle flag ({record['oracle']}, labels "
                        f"{record['labels']!r}) disagree; retrain the teacher with train-teacher --overwrite")
    if files_sha256(weight_files) != record["weights_sha256"]:
        raise UserError(f"{path} was written for other weights than {folder} holds (sha256 differs), so its label "
                        "does not describe them; retrain with train-teacher --overwrite, or remove the file")
    return record
