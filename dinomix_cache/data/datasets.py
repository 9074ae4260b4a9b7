"""Dataset discovery: which cases exist on disk, where their files are, and which role each plays.

The layouts of the four dataset kinds (``synapse``, ``amos``, ``msd``, ``phantom``) are read by
:mod:`dinomix_cache.data.layouts`; roles come from :mod:`dinomix_cache.data.roles`: the shipped SKCDF
lists for Synapse (and a phantom whose ids are the 30 Synapse ids), the shipped DHC lists for AMOS,
``--split-dir`` files, or a recorded seeded split (MSD and other phantoms).

Discovery only looks at file names; reading and validating the volumes is
:mod:`dinomix_cache.data.preprocess`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dinomix_cache.data.classes import SYNAPSE_CASE_IDS
from dinomix_cache.data.layouts import DATA_HINT, scan_layout
from dinomix_cache.data.roles import ROLES, SplitSettings, dir_lists, parse_labeled, seeded_roles, shipped_lists
from dinomix_cache.errors import UserError


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


def scan_case_files(name: str, root: Path) -> dict[str, tuple[Path, Path | None, str]]:
    """Case id → (image path, label path or None, ``"nifti"``/``"npy"``) for every case under ``root``,
    whatever its role (no split is read). For finding a known case's files again, e.g. to evaluate
    against the original labels after the store has gone.

    Raises:
        UserError: unknown dataset name or missing folder.
    """
    return scan_layout(name, root)[2]


def discover_dataset(
    name: str, root: Path, split: SplitSettings = SplitSettings(), case_ids: Sequence[str] | None = None
) -> DatasetSpec:
    """Find a dataset's cases on disk and assign their roles.

    Roles are decided on every case on disk first and only then restricted to ``case_ids``, so a
    case keeps its role whatever subset is processed.

    Args:
        name: ``"synapse"``, ``"amos"``, ``"msd"`` or ``"phantom"``.
        root: the data folder (layouts in :mod:`dinomix_cache.data.layouts`).
        split: how to assign roles (:class:`SplitSettings`).
        case_ids: only these cases (each must exist and have a role).

    Returns:
        The :class:`DatasetSpec`, cases sorted by id.

    Raises:
        UserError: unknown dataset name, missing folder, no cases found (naming the patterns
            searched), image without label, listed cases missing on disk (naming files and folder),
            inconsistent split lists, unknown ``case_ids``, or an unsupported ``dataset.json``.
    """
    key, root, found, searched, class_names, extra = scan_layout(name, root)
    if not found:
        raise UserError(f"no {key} cases found under {root} (searched {', '.join(searched)}); "
                        f"pass --data DIR pointing at {DATA_HINT[key]}")

    labeled = split.labeled
    if split.split_dir is not None:
        roles, record = dir_lists(split.split_dir, labeled, "5p" if key == "amos" else "20p")
    elif key == "synapse" or (key == "phantom" and set(found) == set(SYNAPSE_CASE_IDS)):
        roles, record = shipped_lists("synapse", labeled or "20p")
    elif key == "amos":
        roles, record = shipped_lists("amos", labeled or "5p")
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
