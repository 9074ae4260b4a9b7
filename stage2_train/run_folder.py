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

Checkpoints hold tensors, numbers and strings only and load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from dinomix_cache.atomic import atomic_path, write_atomic
from dinomix_cache.errors import UserError
from dinomix_cache.store import FeatureStore


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

    def create(self, settings_json: dict[str, Any], identity: dict[str, Any]) -> None:
        """Start a new run. Raises UserError if the folder already holds a run (use --resume)."""
        if (self.path / "settings.json").exists():
            raise UserError(f"{self.path} already holds a run; resume it with --resume {self.path} or choose --out")
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_json("settings.json", settings_json)
        self._write_json("store.json", identity)

    def settings(self) -> dict[str, Any]:
        return self._read_json("settings.json")

    def identity(self) -> dict[str, Any]:
        return self._read_json("store.json")

    def _read_json(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a run folder ({name} missing)") from None

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        write_atomic(self.path / name, json.dumps(data, indent=2, default=str))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        path = self.path / "log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> None:
        """Write ``name.pt`` atomically (temp file, then rename): a crash never leaves half a file."""
        with atomic_path(self.path / f"{name}.pt") as tmp:
            torch.save(payload, tmp)

    def load_checkpoint(self, name: str = "latest") -> dict[str, Any]:
        path = self.path / f"{name}.pt"
        if not path.exists():
            raise UserError(f"{path} not found: the run has no checkpoint yet")
        return torch.load(path, map_location="cpu", weights_only=True)

    def truncate_log(self, step: int) -> None:
        """Drop iteration records after ``step`` (written after the checkpoint a resume starts from)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        write_atomic(self.path / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def plot(self) -> Path:
        """Draw ``progress.png``: per-epoch mean of each loss term, and validation mean Dice."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        steps = [r for r in records if r.get("kind") == "step"]
        epochs = [r for r in records if r.get("kind") == "epoch"]
        fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
        terms = sorted({k for r in steps for k in r if k in ("sup", "sup_aux", "unsup", "unsup_aux", "distill",
                                                                 "total")})
        for term in terms:
            by_epoch: dict[int, list[float]] = {}
            for r in steps:
                if term in r:
                    by_epoch.setdefault(r["epoch"], []).append(r[term])
            xs = sorted(by_epoch)
            ax_loss.plot(xs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in xs], label=term)
        # log scale: the distillation term (about 0.01) would otherwise sit flat on zero
        ax_loss.set(xlabel="epoch", ylabel="loss (epoch mean, log scale)", title="training losses", yscale="log")
        ax_loss.legend(fontsize=8)
        if epochs:
            ax_dice.plot([r["epoch"] for r in epochs], [100 * r["val_dice"] for r in epochs], marker="o")
        ax_dice.set(xlabel="epoch", ylabel="mean Dice (%)", title="validation (eval split, centre crop)")
        fig.tight_layout()
        out = self.path / "progress.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
