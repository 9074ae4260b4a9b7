"""Preprocessed volumes rebuilt from the source files a store records.

A store made with ``extract --no-volumes`` holds features only. Training and evaluation still need
the preprocessed images and labels; they rebuild them from the dataset folder (``--data DIR``) with
the store's own preprocessing settings, after checking each file's sha256 against the one the
store recorded, so the rebuilt arrays are exactly the ones the teacher saw.

Each case's ``dinomix_case`` attribute records ``source.image`` / ``source.label`` relative to the
dataset folder (absolute where the file lay outside it) and their sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinomix_cache.data.datasets import CaseSource
from dinomix_cache.data.preprocess import PreprocessedCase, PreprocessSettings, load_case
from dinomix_cache.errors import UserError

__all__ = ["load_source_case", "recorded_case_source", "resolve_recorded"]


def resolve_recorded(recorded: str, data: Path) -> Path:
    """A source path the store recorded, under the dataset folder ``data`` (relative paths), as
    recorded (absolute paths that exist), or ``data`` / its name (absolute paths that moved)."""
    path = Path(recorded)
    if not path.is_absolute():
        return data / path
    return path if path.exists() else data / path.name


def recorded_case_source(case_id: str, role: str, source: dict[str, Any], data: Path) -> CaseSource:
    """Where case ``case_id``'s files lie under ``data``, from the ``source`` record the store keeps.

    Raises:
        UserError: the record names no image, or a recorded file is missing under ``data``.
    """
    data = Path(data).expanduser()
    if not data.is_dir():
        raise UserError(f"--data {data} is not a folder; pass the dataset folder the store was extracted from")
    if not source.get("image"):
        raise UserError(f"case {case_id}: the store records no source image; rebuild the store with volumes")
    image = resolve_recorded(source["image"], data)
    label = resolve_recorded(source["label"], data) if source.get("label") else None
    for path in (image, label):
        if path is not None and not path.exists():
            raise UserError(f"{path} is missing: --data must be the folder case {case_id} was extracted from")
    fmt = "npy" if image.name.endswith(".npy") else "nifti"
    return CaseSource(case_id, role, image, label, fmt)


def load_source_case(
    case: CaseSource,
    preprocess: PreprocessSettings,
    num_classes: int,
    expected: dict[str, Any] | None = None,
    with_label: bool = True,
) -> PreprocessedCase:
    """Preprocess one case as the store did and check its files are the recorded ones.

    Args:
        case: the files (:func:`recorded_case_source`).
        preprocess: the store's preprocessing settings.
        num_classes: classes including background.
        expected: the recorded ``source`` (``image_sha256``, ``label_sha256``); None skips the check.
        with_label: also preprocess the label (if the case has one).

    Returns:
        The :class:`~dinomix_cache.data.preprocess.PreprocessedCase` ((D, H, W) image and uint8 label).

    Raises:
        UserError: unreadable files (see :func:`~dinomix_cache.data.preprocess.load_case`), or a file
            whose sha256 differs from the recorded one (it is not the file the features came from).
    """
    if not with_label and case.label is not None:
        case = CaseSource(case.case_id, case.role, case.image, None, case.fmt)
    loaded = load_case(case, preprocess, num_classes)
    for key in ("image", "label"):
        want = (expected or {}).get(f"{key}_sha256")
        have = loaded.source.get(f"{key}_sha256")
        if want and have and want != have:
            raise UserError(f"{loaded.source[key]} differs from the file the store was made from (sha256 "
                            f"{have[:12]}… vs {want[:12]}…); pass --data pointing at the original dataset")
    return loaded
