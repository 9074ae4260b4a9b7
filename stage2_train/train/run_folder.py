"""A run folder: resolved settings, the store's identity, a JSONL log, checkpoints, ``progress.png``.

Layout::

    runs/NAME/
      settings.json        the fully resolved TrainSettings
      store.json           the store's path, the sha256 of its attributes (its identity) and the attributes
      log.jsonl            one line per iteration (every loss term, lr, recompute fraction)
                           and one per epoch (validation Dice)
      latest.pt            written atomically every N iterations and at the end
      best.pt              the best validation mean Dice so far
      progress.png         loss terms and validation Dice over epochs

Checkpoints hold tensors, numbers and strings only and load with ``weights_only=True``. Every
file is validated before use (:mod:`stage2_train.train.run_schema`): a damaged, foreign or hostile file
is one :class:`~dinomix_cache.errors.UserError` naming it, and so is a failed write (read-only
folder, full disk).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dinomix_cache.atomic import atomic_path, remove_stale_temporaries, write_atomic
from dinomix_cache.errors import UserError, writing
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.schema import StoreAttrs
from stage2_train.train.run_schema import check_checkpoint, check_identity, train_settings_from_json
from stage2_train.train.settings import TrainSettings

# What a run writes besides checkpoints; a run refused before its first checkpoint removes them.
_RUN_FILES = ("settings.json", "store.json", "log.jsonl", "progress.png")


def store_identity(store: FeatureStore) -> dict[str, Any]:
    """``{"path", "attrs_sha256", "meta"}``: the store's attributes hashed as canonical JSON, and the
    attributes themselves (teacher, preprocessing, classes, split), so that evaluation and prediction
    still know how the run's data was made when the store has moved or is gone."""
    canonical = json.dumps(store.meta, sort_keys=True, separators=(",", ":"), default=str)
    return {"path": str(store.path), "attrs_sha256": hashlib.sha256(canonical.encode()).hexdigest(),
            "meta": json.loads(canonical)}


class RunFolder:
    """Files of one training run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._made: list[Path] = []  # folders create() made, innermost first

    def create(self, settings_json: dict[str, Any], identity: dict[str, Any]) -> None:
        """Start a new run.

        Raises:
            UserError: the folder already holds a run (use --resume), or cannot be written.
        """
        if (self.path / "settings.json").exists():
            raise UserError(f"{self.path} already holds a run; resume it with --resume {self.path} or choose --out")
        self._made = [p for p in (self.path, *self.path.parents) if not p.exists()]
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        self._write_json("settings.json", settings_json)
        self._write_json("store.json", identity)

    def discard(self) -> None:
        """Undo :meth:`create` for a run refused before its first checkpoint: its files and the folders
        it made go (a refused command leaves nothing). A run with a checkpoint is kept, to resume."""
        if any((self.path / f"{n}.pt").exists() for n in ("latest", "best")):
            return
        for name in _RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete half-written files a killed run left (``.latest.pt.<pid>.<token>.tmp``)."""
        return remove_stale_temporaries(self.path)

    def settings(self) -> dict[str, Any]:
        """``settings.json``, validated (:meth:`train_settings`), as a dict."""
        self.train_settings()
        return json.loads(self._read_text("settings.json"))

    def train_settings(self) -> TrainSettings:
        """The run's settings from ``settings.json``, validated against :class:`TrainSettings`.

        Raises:
            UserError: missing, unreadable, not a JSON object, an unknown key, a wrong type or a
                value out of bounds (naming the file and the field).
        """
        return train_settings_from_json(self._read_text("settings.json"), str(self.path / "settings.json"))

    def identity(self) -> dict[str, Any]:
        """``store.json`` (``path``, ``attrs_sha256``, ``meta``), validated (see :meth:`store_attrs`)."""
        return check_identity(self._read_text("store.json"), str(self.path / "store.json"))[0]

    def store_attrs(self) -> StoreAttrs | None:
        """The store attributes ``store.json`` records, validated by the store's schema and hashed
        against ``attrs_sha256``; None for a run recorded before store.json held them.

        Raises:
            UserError: missing, unreadable or invalid ``store.json``.
        """
        return check_identity(self._read_text("store.json"), str(self.path / "store.json"))[1]

    def _read_text(self, name: str) -> str:
        path = self.path / name
        try:
            return path.read_text()
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a run folder ({name} missing)") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise UserError(f"cannot read {path} ({reason}); restore it, or start a new run") from None

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        with writing(self.path / name):
            write_atomic(self.path / name, json.dumps(data, indent=2, default=str))

    def log(self, record: dict[str, Any]) -> None:
        with writing(self.path / "log.jsonl"), open(self.path / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """The log's records; a torn last line (a run killed while appending) is skipped."""
        path = self.path / "log.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> None:
        """Write ``name.pt`` atomically (temp file, then rename): a crash never leaves half a file.

        Raises:
            UserError: the write failed (read-only folder, full disk); the old file stays.
        """
        with writing(self.path / f"{name}.pt"), atomic_path(self.path / f"{name}.pt") as tmp:
            torch.save(payload, tmp)

    def load_checkpoint(self, name: str = "latest") -> dict[str, Any]:
        """Load ``name.pt`` with ``weights_only=True`` and check it is one of this code's checkpoints.

        Raises:
            UserError: missing, empty, truncated, foreign, or refused by the safe loader (a pickle
                that would build other objects than tensors, numbers and strings); naming the file.
        """
        path = self.path / f"{name}.pt"
        if not path.exists():
            raise UserError(f"{path} not found: the run has no checkpoint yet")
        fix = "restore it, copy the run's other checkpoint (best.pt / latest.pt) over it, or start a new run"
        if path.is_file() and path.stat().st_size == 0:
            raise UserError(f"{path} is empty (0 bytes): not a checkpoint; {fix}")
        try:
            with warnings.catch_warnings():  # torch warns about unusual pickle protocols, on several lines
                warnings.simplefilter("ignore")
                payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"{path} was refused by the safe loader: it holds objects other than tensors, numbers "
                            f"and strings, so it is not a checkpoint of this tool and loading it could run code; "
                            f"never load it otherwise: {fix}") from None
        except Exception as exc:  # truncated zip, bad magic, EOF, a folder
            reason = " ".join(str(exc).split())[:120] or type(exc).__name__
            raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {reason}): truncated, "
                            f"damaged or foreign; {fix}") from None
        return check_checkpoint(payload, path)

    def truncate_log(self, step: int) -> None:
        """Drop iteration records after ``step`` (written after the checkpoint a resume starts from)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        with writing(self.path / "log.jsonl"):
            write_atomic(self.path / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def plot(self) -> Path:
        """Draw ``progress.png``: per-epoch mean of each loss term; validation mean Dice of the student and
        the EMA teacher; each term's share of the total loss and the distillation gradient's share at x5;
        the unsupervised branch (λ_unsup, confident fraction, confident voxels that are background, and
        the pseudo-labels' mean Dice where the truth of unlabeled cases is known)."""
        records = self.records()
        steps = [r for r in records if r.get("kind") == "step"]
        epochs = [r for r in records if r.get("kind") == "epoch"]
        # A bare Figure on an Agg canvas: no pyplot state or global backend is touched.
        fig = Figure(figsize=(12, 8))
        FigureCanvasAgg(fig)
        (ax_loss, ax_dice), (ax_share, ax_unsup) = fig.subplots(2, 2)
        terms = sorted({k for r in steps for k in r if k in ("sup", "sup_aux", "unsup", "unsup_aux", "distill",
                                                                 "total")})
        for term in terms:
            by_epoch: dict[int, list[float]] = {}
            for r in steps:
                if term in r:
                    by_epoch.setdefault(r["epoch"], []).append(r[term])
            xs = sorted(by_epoch)
            ax_loss.plot(xs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in xs], label=term)
        ax_loss.set(xlabel="epoch", ylabel="loss (epoch mean, log scale)", title="training losses (unweighted)",
                    yscale="log")
        ax_loss.legend(fontsize=8)
        xs = [r["epoch"] for r in epochs]

        def series(ax, key: str, label: str, scale: float = 1.0, **style) -> None:
            points = [(r["epoch"], scale * r[key]) for r in epochs if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=label, **style)

        series(ax_dice, "val_dice", "student", 100, marker="o")
        series(ax_dice, "ema_val_dice", "EMA teacher", 100, marker=".")
        ax_dice.set(xlabel="epoch", ylabel="mean Dice (%)", title="validation (eval split, centre crop)")
        ax_dice.legend(fontsize=8)
        for term in ("sup", "sup_aux", "unsup", "unsup_aux", "distill"):
            points = [(r["epoch"], r["shares"][term]) for r in epochs if term in (r.get("shares") or {})]
            if points:
                ax_share.plot(*zip(*points, strict=True), label=f"{term} (loss share)")
        series(ax_share, "distill_grad", "distill gradient / total at x5", linestyle="--")
        ax_share.set(xlabel="epoch", ylabel="fraction", title="what each term weighs (Eq. 5 weights)")
        ax_share.legend(fontsize=8)
        series(ax_unsup, "lambda_unsup", "λ_unsup")
        series(ax_unsup, "confident", "confident fraction")
        series(ax_unsup, "confident_background", "confident voxels: background")
        pseudo = [(r["epoch"], float(np.mean([v for v in r["pseudo_dice"] if v is not None])))
                  for r in epochs if any(v is not None for v in r.get("pseudo_dice") or [])]
        if pseudo:
            ax_unsup.plot(*zip(*pseudo, strict=True), label="pseudo-label mean Dice (vs truth)")
        ax_unsup.set(xlabel="epoch", ylabel="fraction", title="unsupervised branch", ylim=(0, 1.02))
        ax_unsup.legend(fontsize=8)
        if not xs:
            ax_dice.set_xlim(0, 1)
        fig.tight_layout()
        out = self.path / "progress.png"
        with writing(out):
            fig.savefig(out, dpi=100)
        return out
