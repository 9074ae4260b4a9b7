"""Dataset layouts on disk: which case files exist under a data folder, found from file names alone.

Four dataset kinds are understood:

- ``synapse``: ``imagesTr/img0001.nii.gz`` + ``labelsTr/label0001.nii.gz``, or the original
  ``RawData/Training/img|label`` layout, or the peers' preprocessed ``npy/0001_image.npy`` +
  ``npy/0001_label.npy``.
- ``amos``: ``imagesTr|labelsTr|imagesVa|labelsVa/amos_XXXX.nii.gz`` (or ``npy/amos_XXXX_image.npy``).
- ``msd``: any Medical Segmentation Decathlon / nnU-Net raw folder with a ``dataset.json`` (class
  names from its ``labels``; single-channel NIfTI only).
- ``phantom``: the synapse layout written by the phantom generator.

Reading and validating the volumes is :mod:`dinomix_cache.data.preprocess`'s job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from dinomix_cache.data.classes import AMOS_CLASSES, SYNAPSE_CLASSES
from dinomix_cache.errors import UserError

DATASETS = ("synapse", "amos", "msd", "phantom")

_NIFTI_ENDINGS = (".nii.gz", ".nii")
DATA_HINT = {
    "synapse": "the Synapse folder (imagesTr/ + labelsTr/, RawData/Training/, or npy/)",
    "amos": "the AMOS22 folder (imagesTr/, labelsTr/, imagesVa/, labelsVa/)",
    "msd": "a Decathlon / nnU-Net dataset folder (dataset.json, imagesTr/, labelsTr/)",
    "phantom": "the folder the phantom generator wrote (imagesTr/ + labelsTr/)",
}


def _strip_nifti(name: str) -> str | None:
    for ending in _NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def _visible_files(folder: Path) -> list[Path]:
    # MSD archives carry macOS "._name" resource forks next to every volume: skip hidden files.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _find_label(folder: Path, stem: str, endings: Sequence[str]) -> Path | None:
    for ending in endings:
        if (folder / f"{stem}{ending}").is_file():
            return folder / f"{stem}{ending}"
    return None


# case id -> (image, label or None, "nifti" | "npy")
FoundCases = dict[str, tuple[Path, Path | None, str]]


def _scan_prefixed(root: Path, pairs: Sequence[tuple[str, str]], img_prefix: str, lbl_prefix: str,
                   id_pattern: str) -> tuple[FoundCases, list[str]]:
    """Scan NIfTI folder pairs named ``<img_prefix><id>.nii[.gz]`` / ``<lbl_prefix><id>.nii[.gz]``."""
    found: FoundCases = {}
    searched = []
    for img_dir, lbl_dir in pairs:
        searched.append(f"{img_dir}/{img_prefix}*.nii.gz")
        folder = root / img_dir
        if not folder.is_dir():
            continue
        for path in _visible_files(folder):
            stem = _strip_nifti(path.name)
            if stem is None or not stem.startswith(img_prefix):
                continue
            cid = stem[len(img_prefix):]
            if not re.fullmatch(id_pattern, cid):
                continue
            if cid in found:
                raise UserError(f"case {cid} appears twice: {found[cid][0]} and {path}; remove one")
            found[cid] = (path, _find_label(root / lbl_dir, f"{lbl_prefix}{cid}", _NIFTI_ENDINGS), "nifti")
    return found, searched


def _scan_npy(root: Path, id_pattern: str) -> tuple[FoundCases, list[str]]:
    found: FoundCases = {}
    for folder in (root / "npy", root):
        if not folder.is_dir():
            continue
        for path in _visible_files(folder):
            m = re.fullmatch(rf"({id_pattern})_image\.npy", path.name)
            if m:
                label = folder / f"{m.group(1)}_label.npy"
                found[m.group(1)] = (path, label if label.is_file() else None, "npy")
        if found:
            break
    return found, ["npy/*_image.npy"]


def _scan_synapse(root: Path) -> tuple[FoundCases, list[str]]:
    searched: list[str] = []
    for pairs in ([("imagesTr", "labelsTr")],
                  [("RawData/Training/img", "RawData/Training/label")],
                  [("Training/img", "Training/label"), ("img", "label")]):
        found, s = _scan_prefixed(root, pairs, "img", "label", r"[A-Za-z0-9_\-]+")
        searched += s
        if found:
            return found, searched
    found, s = _scan_npy(root, r"[A-Za-z0-9\-]+")
    return found, searched + s


def _scan_amos(root: Path) -> tuple[FoundCases, list[str]]:
    found, searched = _scan_prefixed(root, [("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")],
                                     "amos_", "amos_", r"\d{4}")
    found = {f"amos_{k}": v for k, v in found.items()}
    if not found:
        found, s = _scan_npy(root, r"amos_\d{4}")
        searched += s
    return found, searched


def _msd_class_names(meta: dict, path: Path) -> tuple[str, ...]:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path} has no 'labels' mapping: add one, e.g. "
                        '"labels": {"background": 0, "liver": 1}')
    if "regions_class_order" in meta or any(isinstance(v, list | tuple) for v in labels.values()):
        raise UserError(f"{path} defines region-based labels (lists of values): only plain integer "
                        "labels are supported; export one integer label map instead")
    if all(isinstance(v, str) for v in labels.values()) and all(str(k).strip().isdigit() for k in labels):
        by_value = {int(k): str(v) for k, v in labels.items()}  # MSD / nnU-Net v1: {"0": "background"}
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        by_value = {int(v): str(k) for k, v in labels.items()}  # nnU-Net v2: {"background": 0}
        if len(by_value) != len(labels):
            raise UserError(f"{path}: two label names share one value in 'labels'; "
                            "give each class its own value")
    else:
        raise UserError(f"{path}: cannot read 'labels'; write them as "
                        '{"background": 0, "liver": 1} or {"0": "background", "1": "liver"}')
    if sorted(by_value) != list(range(len(by_value))):
        raise UserError(f"{path}: label values {sorted(by_value)} are not 0..{len(by_value) - 1}; "
                        "renumber the classes contiguously")
    names = tuple(by_value[i] for i in range(len(by_value)))
    if "ignore" in names:
        raise UserError(f"{path} declares an 'ignore' label: not supported; remove it or map it to a class")
    return names


def _scan_msd(root: Path) -> tuple[FoundCases, list[str], tuple[str, ...], dict]:
    path = root / "dataset.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: an MSD / nnU-Net folder needs dataset.json "
                        "(pass --data DIR pointing at the task folder)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}); fix or re-download it") from exc
    names = _msd_class_names(meta, path)
    channels = meta.get("channel_names", meta.get("modality", {"0": "CT"}))
    if isinstance(channels, dict) and len(channels) > 1:
        raise UserError(f"{path} declares {len(channels)} input channels: "
                        "only single-channel CT is supported")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in _NIFTI_ENDINGS:
        raise UserError(f"{path} has file_ending {ending!r}: only NIfTI (.nii.gz, .nii) is supported; "
                        "convert the images first")
    found: FoundCases = {}
    styles: set[str] = set()  # "plain" (MSD: imagesTr/<case>.nii.gz) or "channel" (nnU-Net: <case>_0000)
    for img_dir, lbl_dir in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        folder = root / img_dir
        if not folder.is_dir():
            continue
        for p in _visible_files(folder):
            if not p.name.endswith(ending):
                continue
            stem = p.name[: -len(ending)]
            label = _find_label(root / lbl_dir, stem, (ending,)) if lbl_dir else None
            m = re.fullmatch(r"(.+)_(\d{4})", stem)
            # A label named after the whole stem means MSD style; imagesTs follows imagesTr's style.
            plain = label is not None or (lbl_dir is None and styles == {"plain"})
            if m is not None and not plain:
                stem, channel = m.group(1), int(m.group(2))
                if channel != 0:
                    raise UserError(f"{p} is input channel {channel}: "
                                    "only single-channel CT (_0000) is supported")
                label = _find_label(root / lbl_dir, stem, (ending,)) if lbl_dir else None
            if lbl_dir:
                styles.add("plain" if plain else "channel")
            if stem in found:
                raise UserError(f"case {stem} appears twice: {found[stem][0]} and {p}; remove one")
            if lbl_dir and label is None:
                raise UserError(f"{p} has no label {root / lbl_dir / (stem + ending)}: "
                                "add it or remove the image")
            found[stem] = (p, label, "nifti")
    searched = [f"imagesTr/*_0000{ending}", f"imagesTr/*{ending}", f"imagesTs/*{ending}"]
    channel = next(iter(channels.values()), None) if isinstance(channels, dict) else None
    return found, searched, names, {"channel": channel, "file_ending": ending}


def scan_layout(name: str, root: Path) -> tuple[str, Path, FoundCases, list[str], tuple[str, ...], dict]:
    """(dataset key, absolute root, cases found, patterns searched, class names, extra split record).

    Raises:
        UserError: unknown dataset name, missing folder, or (MSD) an unsupported ``dataset.json``.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"{root} does not exist; pass --data DIR pointing at {DATA_HINT[key]}")
    if key == "msd":
        found, searched, class_names, extra = _scan_msd(root)
        return key, root, found, searched, class_names, extra
    if key == "amos":
        return key, root, *_scan_amos(root), AMOS_CLASSES, {}
    return key, root, *_scan_synapse(root), SYNAPSE_CLASSES, {}
