"""Dataset discovery: which cases exist on disk, where their files are, and which role each plays.

Four dataset kinds are understood:

- ``synapse``: ``imagesTr/img0001.nii.gz`` + ``labelsTr/label0001.nii.gz``, or the original
  ``RawData/Training/img|label`` layout, or the peers' preprocessed ``npy/0001_image.npy`` +
  ``npy/0001_label.npy``. Roles come from the shipped SKCDF lists (``splits/synapse``).
- ``amos``: ``imagesTr|labelsTr|imagesVa|labelsVa/amos_XXXX.nii.gz`` (or ``npy/amos_XXXX_image.npy``);
  roles from the shipped DHC lists (``splits/amos``).
- ``msd``: any Medical Segmentation Decathlon / nnU-Net raw folder with a ``dataset.json``; roles
  from ``--split-dir`` files or a recorded seeded split.
- ``phantom``: the synapse layout written by the phantom generator; the shipped Synapse lists when
  its ids are the 30 Synapse ids, otherwise a recorded seeded split.

Discovery only looks at file names; reading and validating the volumes is
:mod:`dinomix_cache.data.preprocess`'s job.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from dinomix_cache.data.classes import AMOS_CLASSES, SYNAPSE_CASE_IDS, SYNAPSE_CLASSES
from dinomix_cache.errors import UserError

ROLES = ("labeled", "unlabeled", "eval", "test")
DATASETS = ("synapse", "amos", "msd", "phantom")

_NIFTI_ENDINGS = (".nii.gz", ".nii")
_DATA_HINT = {
    "synapse": "the Synapse folder (imagesTr/ + labelsTr/, RawData/Training/, or npy/)",
    "amos": "the AMOS22 folder (imagesTr/, labelsTr/, imagesVa/, labelsVa/)",
    "msd": "a Decathlon / nnU-Net dataset folder (dataset.json, imagesTr/, labelsTr/)",
    "phantom": "the folder the phantom generator wrote (imagesTr/ + labelsTr/)",
}
_AMOS_20P = (
    "AMOS --labeled 20p is not supported: the upstream DHC/SKCDF labeled_20p/unlabeled_20p lists are "
    "inconsistent (192 ids, 20 of them not in train.txt, 44 train ids missing); use 2p, 5p or 10p, or "
    "pass --split-dir with your own lists"
)


@dataclass(frozen=True)
class CaseSource:
    """One case on disk.

    Attributes:
        case_id: the dataset's case id (``"0001"`` for Synapse, ``"amos_0001"`` for AMOS).
        role: one of :data:`ROLES`.
        image: path of the image file.
        label: path of the label file; ``None`` only for unlabeled-only data (e.g. MSD ``imagesTs``).
        fmt: ``"nifti"`` or ``"npy"`` (already (D, H, W) in SimpleITK order, no geometry).
    """

    case_id: str
    role: str
    image: Path
    label: Path | None
    fmt: str


@dataclass(frozen=True)
class SplitSettings:
    """How cases are assigned to roles.

    Attributes:
        labeled: labeled share of the training pool as ``"<N>p"``. Shipped lists: ``10p|20p|40p``
            for Synapse (default ``20p``), ``2p|5p|10p`` for AMOS (default ``5p``; ``20p`` is refused,
            its upstream lists are inconsistent). Seeded splits take any ``N`` in (0, 100) (default 20p).
        split_dir: a folder of split lists replacing the shipped ones, either
            ``train.txt, eval.txt, test.txt, labeled_<x>.txt, unlabeled_<x>.txt`` or
            ``labeled.txt, unlabeled.txt, eval.txt, test.txt``; one case id a line, ``#`` comments.
        eval_fraction: share of all cases used for ``eval`` by a seeded split.
        test_fraction: share of all cases used for ``test`` by a seeded split.
        seed: seed of a seeded split (recorded in :attr:`DatasetSpec.split`).
    """

    labeled: str | None = None
    split_dir: Path | None = None
    eval_fraction: float = 0.134
    test_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    """A discovered dataset.

    Attributes:
        name: ``"synapse" | "amos" | "msd" | "phantom"``.
        root: the data folder.
        class_names: index = label value, 0 = background.
        cases: the cases in use, sorted by case id.
        split: JSON-able record of how roles were assigned: ``source`` (``"shipped:synapse"``,
            ``"dir:PATH"`` or ``"seeded"``), ``labeled``, ``files`` (sha256 of each list used),
            seed and fractions for seeded splits, ``counts`` per role, ``unlisted`` (ids on disk
            in no list, left out), ``unlabeled_only`` (ids without a label file, e.g. MSD
            ``imagesTs``) and ``case_ids`` when discovery was restricted.
    """

    name: str
    root: Path
    class_names: tuple[str, ...]
    cases: tuple[CaseSource, ...]
    split: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """Return a JSON-able description; case paths are POSIX paths relative to ``root``."""

        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            try:
                return p.relative_to(self.root).as_posix()
            except ValueError:
                return str(p)

        return {
            "name": self.name,
            "root": str(self.root),
            "class_names": list(self.class_names),
            "split": self.split,
            "cases": [
                {"id": c.case_id, "role": c.role, "image": rel(c.image), "label": rel(c.label), "fmt": c.fmt}
                for c in self.cases
            ],
        }


# ---------------------------------------------------------------------------------------------
# Split lists


def parse_labeled(labeled: str) -> float:
    """Parse ``"<N>p"`` into a fraction.

    Args:
        labeled: e.g. ``"20p"`` or ``"2.5p"``.

    Returns:
        ``N / 100``.

    Raises:
        UserError: not of the form ``<N>p`` with 0 < N < 100.
    """
    m = re.fullmatch(r"(\d+(?:\.\d+)?)p", labeled.strip())
    if m is None or not 0 < float(m.group(1)) < 100:
        raise UserError(f"--labeled {labeled!r} is not valid: write the labeled share as <N>p, e.g. 20p")
    return float(m.group(1)) / 100.0


def _read_list(text: str) -> list[str]:
    ids = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [i for i in ids if i]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _lists_to_roles(lists: dict[str, list[str]], where: str) -> dict[str, str]:
    """Turn {role: ids} (+ optional "train") into {id: role}, checking the lists are consistent."""
    roles: dict[str, str] = {}
    for role in ROLES:
        for cid in lists[role]:
            if cid in roles:
                raise UserError(f"case {cid} is listed as both {roles[cid]} and {role} in {where}: "
                                "fix the lists")
            roles[cid] = role
    if "train" in lists:
        train, pool = set(lists["train"]), set(lists["labeled"]) | set(lists["unlabeled"])
        if train != pool:
            raise UserError(
                f"labeled + unlabeled lists do not equal train.txt in {where} ({len(pool - train)} ids "
                f"not in train, {len(train - pool)} train ids missing): fix the lists"
            )
    return roles


def _shipped_lists(dataset: str, labeled: str) -> tuple[dict[str, str], dict]:
    folder = resources.files("dinomix_cache.data") / "splits" / dataset
    available = sorted(
        p.name[len("labeled_") : -len(".txt")] for p in folder.iterdir() if p.name.startswith("labeled_")
    )
    if dataset == "amos" and labeled == "20p":
        raise UserError(_AMOS_20P)
    if labeled not in available:
        ok = ", ".join(x for x in available if not (dataset == "amos" and x == "20p"))
        raise UserError(
            f"no shipped {dataset} split for --labeled {labeled}: choose one of {ok}, or pass --split-dir "
            "with your own lists"
        )
    names = {"train": "train.txt", "eval": "eval.txt", "test": "test.txt",
             "labeled": f"labeled_{labeled}.txt", "unlabeled": f"unlabeled_{labeled}.txt"}
    texts = {k: (folder / n).read_text() for k, n in names.items()}
    roles = _lists_to_roles({k: _read_list(t) for k, t in texts.items()}, f"the shipped {dataset} lists")
    record = {"source": f"shipped:{dataset}", "labeled": labeled,
              "files": {names[k]: _sha256_text(t) for k, t in texts.items()}}
    return roles, record


def _dir_lists(split_dir: Path, labeled: str | None, default: str) -> tuple[dict[str, str], dict]:
    split_dir = Path(split_dir).expanduser().absolute()
    if not split_dir.is_dir():
        raise UserError(f"split folder {split_dir} does not exist; pass --split-dir DIR with the split lists")
    share = labeled or default
    if (split_dir / f"labeled_{share}.txt").is_file():
        names = {"train": "train.txt", "eval": "eval.txt", "test": "test.txt",
                 "labeled": f"labeled_{share}.txt", "unlabeled": f"unlabeled_{share}.txt"}
    elif labeled is None and (split_dir / "labeled.txt").is_file():
        names = {r: f"{r}.txt" for r in ROLES}
    else:
        want = f"labeled_{share}.txt" if labeled else f"labeled.txt or labeled_{share}.txt"
        raise UserError(
            f"{split_dir} has no {want}: a split folder holds labeled.txt, unlabeled.txt, eval.txt, test.txt "
            "(or train.txt, eval.txt, test.txt, labeled_<x>.txt, unlabeled_<x>.txt for --labeled <x>)"
        )
    missing = [n for n in names.values() if not (split_dir / n).is_file()]
    if missing:
        raise UserError(f"split folder {split_dir} lacks {', '.join(missing)}: add the missing lists")
    texts = {k: (split_dir / n).read_text() for k, n in names.items()}
    roles = _lists_to_roles({k: _read_list(t) for k, t in texts.items()}, str(split_dir))
    record = {"source": f"dir:{split_dir}", "labeled": share if "train" in names else None,
              "files": {names[k]: _sha256_text(t) for k, t in texts.items()}}
    return roles, record


def seeded_roles(
    case_ids: Sequence[str], labeled_fraction: float, eval_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Assign roles with a seeded permutation (reproducible, unlike DHC's unseeded one).

    Test cases are ``round(n * test_fraction)``, eval ``round(n * eval_fraction)`` (halves round up),
    the rest is the training pool, of which ``floor(n_train * labeled_fraction)`` are labeled (as DHC).
    Guarantees: at least one labeled case; with 4 or more cases at least one case of every role
    whose fraction is > 0; the training pool keeps at least 2 cases (so one is unlabeled) when n ≥ 2.

    Args:
        case_ids: the ids to split (order does not matter; they are sorted first).
        labeled_fraction: labeled share of the training pool, in (0, 1].
        eval_fraction: eval share of all cases, in [0, 1).
        test_fraction: test share of all cases, in [0, 1).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``{case_id: role}`` sorted by case id.

    Raises:
        UserError: no ids, duplicate ids, or fractions out of range.
    """
    ids = sorted(case_ids)
    if not ids:
        raise UserError("no cases to split")
    if len(set(ids)) != len(ids):
        raise UserError("duplicate case ids given to the seeded split")
    if not (0 < labeled_fraction <= 1 and 0 <= eval_fraction < 1 and 0 <= test_fraction < 1
            and eval_fraction + test_fraction < 1):
        raise UserError(
            f"split fractions labeled={labeled_fraction}, eval={eval_fraction}, test={test_fraction} are "
            "out of range: need 0 < labeled <= 1, eval >= 0, test >= 0, eval + test < 1"
        )
    n = len(ids)
    n_test = math.floor(n * test_fraction + 0.5)
    n_eval = math.floor(n * eval_fraction + 0.5)
    if n >= 4:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_eval = max(n_eval, 1 if eval_fraction > 0 else 0)
    while n - n_test - n_eval < min(n, 2):
        if n_eval >= n_test:
            n_eval -= 1
        else:
            n_test -= 1
    n_train = n - n_test - n_eval
    n_labeled = math.floor(n_train * labeled_fraction + 1e-9)
    n_labeled = min(max(n_labeled, 1), n_train if labeled_fraction >= 1 else max(1, n_train - 1))
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    plan = ["test"] * n_test + ["eval"] * n_eval + ["labeled"] * n_labeled
    plan += ["unlabeled"] * (n - len(plan))
    roles = dict(zip(order, plan, strict=True))
    return {cid: roles[cid] for cid in ids}


# ---------------------------------------------------------------------------------------------
# Layouts on disk


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


_Found = dict[str, tuple[Path, Path | None, str]]  # id -> (image, label or None, fmt)


def _scan_prefixed(root: Path, pairs: Sequence[tuple[str, str]], img_prefix: str, lbl_prefix: str,
                   id_pattern: str) -> tuple[_Found, list[str]]:
    """Scan NIfTI folder pairs named ``<img_prefix><id>.nii[.gz]`` / ``<lbl_prefix><id>.nii[.gz]``."""
    found: _Found = {}
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


def _scan_npy(root: Path, id_pattern: str) -> tuple[_Found, list[str]]:
    found: _Found = {}
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


def _scan_synapse(root: Path) -> tuple[_Found, list[str]]:
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


def _scan_amos(root: Path) -> tuple[_Found, list[str]]:
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


def _scan_msd(root: Path) -> tuple[_Found, list[str], tuple[str, ...], dict]:
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
    found: _Found = {}
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


# ---------------------------------------------------------------------------------------------
# Discovery


def _scan(name: str, root: Path) -> tuple[str, Path, _Found, list[str], tuple[str, ...], dict]:
    """(dataset key, absolute root, cases found, patterns searched, class names, extra split record)."""
    key = name.strip().lower()
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"{root} does not exist; pass --data DIR pointing at {_DATA_HINT[key]}")
    if key == "msd":
        found, searched, class_names, extra = _scan_msd(root)
        return key, root, found, searched, class_names, extra
    if key == "amos":
        return key, root, *_scan_amos(root), AMOS_CLASSES, {}
    return key, root, *_scan_synapse(root), SYNAPSE_CLASSES, {}


def scan_case_files(name: str, root: Path) -> dict[str, tuple[Path, Path | None, str]]:
    """Case id → (image path, label path or None, ``"nifti"``/``"npy"``) for every case under ``root``,
    whatever its role (no split is read). For finding a known case's files again, e.g. to evaluate
    against the original labels after the store has gone.

    Raises:
        UserError: unknown dataset name or missing folder.
    """
    return _scan(name, root)[2]


def discover_dataset(
    name: str, root: Path, split: SplitSettings = SplitSettings(), case_ids: Sequence[str] | None = None
) -> DatasetSpec:
    """Find a dataset's cases on disk and assign their roles.

    Roles are decided on every case on disk first and only then restricted to ``case_ids``, so a
    case keeps its role whatever subset is processed.

    Args:
        name: ``"synapse"``, ``"amos"``, ``"msd"`` or ``"phantom"``.
        root: the data folder (layouts in the module docstring).
        split: how to assign roles (:class:`SplitSettings`).
        case_ids: only these cases (each must exist and have a role).

    Returns:
        The :class:`DatasetSpec`, cases sorted by id.

    Raises:
        UserError: unknown dataset name, missing folder, no cases found (naming the patterns
            searched), image without label, listed cases missing on disk (naming files and folder),
            inconsistent split lists, unknown ``case_ids``, or an unsupported ``dataset.json``.
    """
    key, root, found, searched, class_names, extra = _scan(name, root)
    if not found:
        raise UserError(f"no {key} cases found under {root} (searched {', '.join(searched)}); "
                        f"pass --data DIR pointing at {_DATA_HINT[key]}")

    labeled = split.labeled
    if split.split_dir is not None:
        roles, record = _dir_lists(split.split_dir, labeled, "5p" if key == "amos" else "20p")
    elif key == "synapse" or (key == "phantom" and set(found) == set(SYNAPSE_CASE_IDS)):
        roles, record = _shipped_lists("synapse", labeled or "20p")
    elif key == "amos":
        roles, record = _shipped_lists("amos", labeled or "5p")
    else:
        labeled = labeled or "20p"
        pool = sorted(cid for cid, (_, lbl, _) in found.items() if lbl is not None)
        if not pool:
            raise UserError(f"no labelled cases under {root}: a seeded split needs labels (labelsTr/)")
        roles = seeded_roles(pool, parse_labeled(labeled), split.eval_fraction, split.test_fraction,
                             split.seed)
        roles |= {cid: "unlabeled" for cid, (_, lbl, _) in found.items() if lbl is None}
        record = {"source": "seeded", "labeled": labeled, "seed": split.seed,
                  "eval_fraction": split.eval_fraction, "test_fraction": split.test_fraction}

    wanted = sorted(roles) if case_ids is None else sorted(set(case_ids))
    unknown = [cid for cid in wanted if cid not in found and cid not in roles]
    if case_ids is not None and unknown:
        raise UserError(f"unknown case ids {_short(unknown)}: not under {root} and in no split list")
    unlisted_wanted = [cid for cid in wanted if cid not in roles]
    if unlisted_wanted:
        raise UserError(f"cases {_short(unlisted_wanted)} are in no split list ({record['source']}); "
                        "add them to the lists or drop them from --cases")
    missing = [cid for cid in wanted if cid not in found]
    if missing:
        some_id, (some_image, _, _) = next(iter(found.items()))
        names = [some_image.name.replace(some_id, cid, 1) for cid in missing]
        raise UserError(f"{len(missing)} listed {key} cases are missing in {some_image.parent}: "
                        f"{_short(names)} (split {record['source']}); add the files, or pass --cases "
                        "to use a subset")
    cases = []
    for cid in wanted:
        image, label, fmt = found[cid]
        if label is None and (roles[cid] != "unlabeled" or key != "msd"):
            raise UserError(f"{image} has no label file (role {roles[cid]}): add its label or fix the split")
        cases.append(CaseSource(cid, roles[cid], image, label, fmt))

    record = dict(record)
    record["counts"] = {r: sum(c.role == r for c in cases) for r in ROLES}
    record["unlisted"] = sorted(set(found) - set(roles))
    record["unlabeled_only"] = sorted(c.case_id for c in cases if c.label is None)
    if case_ids is not None:
        record["case_ids"] = wanted
    record |= extra
    return DatasetSpec(key, root, tuple(class_names), tuple(cases), record)


def _short(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
