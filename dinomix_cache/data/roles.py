"""Split lists and roles: which of ``labeled``, ``unlabeled``, ``eval`` and ``test`` each case plays.

Roles come from the shipped lists (``splits/synapse``: the SKCDF lists; ``splits/amos``: the DHC lists),
from the lists of a ``--split-dir`` folder, or from a seeded split (:func:`seeded_roles`) recorded in the
store. Each source returns ``{case id: role}`` and a JSON-able record of where the roles came from.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from dinomix_cache.errors import UserError

ROLES = ("labeled", "unlabeled", "eval", "test")

_AMOS_20P = (
    "AMOS --labeled 20p is not supported: the upstream DHC/SKCDF labeled_20p/unlabeled_20p lists are "
    "inconsistent (192 ids, 20 of them not in train.txt, 44 train ids missing); use 2p, 5p or 10p, or "
    "pass --split-dir with your own lists"
)


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


def shipped_lists(dataset: str, labeled: str) -> tuple[dict[str, str], dict]:
    """Roles from the lists shipped for ``dataset`` (``synapse`` or ``amos``) at the share ``labeled``
    (``"<N>p"``), and their record (``source``, ``labeled``, sha256 of each list).

    Raises:
        UserError: no shipped lists for that share (AMOS 20p is refused), or inconsistent lists.
    """
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


def dir_lists(split_dir: Path, labeled: str | None, default: str) -> tuple[dict[str, str], dict]:
    """Roles from the lists in ``split_dir`` (``labeled_<share>.txt`` and companions for ``labeled`` or, when
    it is None, ``default``; else ``labeled.txt, unlabeled.txt, eval.txt, test.txt``), and their record.

    Raises:
        UserError: no such folder, missing lists, or inconsistent lists.
    """
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
