"""``dinomix-cache bench ablation``: the rows of the paper's Table 3, over paired seeds, trained and evaluated.

Each row is a set of training switches on top of one preset (``cpu`` by default, the CPU demo's
settings), trained once per seed at the same number of steps, then evaluated on the test split
(sliding window, the peers' metrics). At one seed every row draws the same cases, crops and gamma
values (one generator per purpose, :mod:`stage2_train.train.state`), so a row's difference from another
at the same seed is the effect of its switch, not of other crops: the report gives these paired
differences per seed, against labeled-only and against the row the switch is added to.

=================  ==============================  ================  ===========================================
row                switches                        compared with     what it adds
=================  ==============================  ================  ===========================================
``labeled-only``   ``--labeled-only``              (none)            supervised baseline, same steps
``consistency``    ``--no-fkd --no-pic --no-aux``  labeled-only      EMA pseudo-labels on a strong view
``fkd``            ``--no-pic --no-aux``           consistency       + foundation-feature distillation
``pic``            ``--no-fkd --no-aux``           consistency       + Progressive Imbalance-aware CutMix
``pic-fkd``        ``--no-aux``                    pic               + both
``dino-mix``       (none)                          pic-fkd           + auxiliary balanced head: all parts
=================  ==============================  ================  ===========================================

Layout of the output folder (default ``runs/ablation``)::

    runs/ablation/
      ROW-seedSEED/            one run folder per row and seed (settings.json, log.jsonl, best.pt, ...)
      ROW-seedSEED/done.json   written when that run has finished: its wall time
      evaluation-ROW/          evaluate's folder for the row's seeds (results.md, results.json, ...)
      ablation.md              the table, the paired differences and what the training logs show
      ablation.json            the same, with per-run numbers and times

An interrupted benchmark is rerun with the same command: finished runs are kept, an unfinished run is
resumed from its ``latest`` checkpoint (bit for bit as if it had not stopped), the rest are trained.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dinomix_cache.atomic import write_atomic
from dinomix_cache.errors import UserError, check_choice
from dinomix_cache.settings_codec import settings_to_json
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.locations import as_location
from stage2_train.bench.ablation_report import ablation_markdown, paired_differences, row_summary
from stage2_train.bench.anatomy import anatomy_probe
from stage2_train.evaluate.evaluation import SPLITS, EvaluateSettings, Split, evaluate
from stage2_train.targets.policies import POLICIES, Targets
from stage2_train.train.loop import train
from stage2_train.train.run_folder import RunFolder
from stage2_train.train.settings import PRESETS, Preset, TrainSettings, preset

__all__ = ["DEFAULT_CACHE", "ROWS", "SEEDS", "TABLE3_ROWS", "AblationSettings", "row_settings", "run_ablation"]

log = logging.getLogger("dinomix_cache.ablation")

# Row name → (label in the table, TrainSettings changes, the row it adds a part to). PIC off is applied
# in row_settings.
ROWS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "labeled-only": ("labeled only", {"labeled_only": True}, None),
    "consistency": ("consistency only", {"fkd": False, "pic": False, "aux": False}, "labeled-only"),
    "fkd": ("+ FKD", {"pic": False, "aux": False}, "consistency"),
    "pic": ("+ PIC", {"fkd": False, "aux": False}, "consistency"),
    "pic-fkd": ("+ PIC + FKD", {"aux": False}, "pic"),
    "dino-mix": ("+ PIC + FKD + aux (DINO-Mix)", {}, "pic-fkd"),
    # Variants of a choice the paper leaves open, run on request (--row NAME), each paired with its row.
    "fkd-mean": ("+ FKD, Eq. 1 / C (--fkd-reduction mean)", {"pic": False, "aux": False, "fkd_reduction": "mean"},
                 "fkd"),
    "dino-mix-tau075": ("DINO-Mix, τ 0.75", {"tau": 0.75}, "dino-mix"),
}
TABLE3_ROWS = ("labeled-only", "consistency", "fkd", "pic", "pic-fkd", "dino-mix")  # the default rows
SEEDS = (0, 1, 666)  # the seeds DHC reports
DEFAULT_CACHE = "storage/phantom-cpu.zarr"  # the CPU demo's phantom store


@dataclass(frozen=True)
class AblationSettings:
    """What ``bench ablation`` trains and evaluates.

    Attributes:
        cache: the feature store (the CPU-sized phantom store, ``storage/phantom-cpu.zarr``, by default).
        out: the benchmark folder.
        preset: the training preset every row starts from (``cpu``: the demo's settings).
        rows: the rows to run, names of :data:`ROWS`, in table order (default :data:`TABLE3_ROWS`; the
            variants ``fkd-mean`` and ``dino-mix-tau075`` on request).
        seeds: one run per seed and row.
        epochs: E_max of every run (None: the preset's), the one fixed budget of the benchmark. 80 by
            default: on the CPU demo's store, labeled-only's validation Dice stops improving there (its last
            epoch at E_max 60, 80, 100, 120: 0.755, 0.80, 0.82, 0.795; ``docs/measurements.md``).
        width, crop: the VNet width and training crop (None: the preset's).
        targets: distillation targets of the rows with FKD (``hybrid``, ``cache`` or ``online``).
        max_steps: stop every run after this many steps (tests and smoke runs only: the schedule
            still spans ``epochs``).
        split: evaluated split (``test``).
        figures: draw each row's ``dice.png`` and ``qualitative.png``.
        progress: progress bars while training.

    Raises:
        UserError: an unknown row, no seed or the same seed twice. SettingsError (a UserError): an unknown
            preset, targets or split (naming the CLI option).
    """

    cache: Path | str = DEFAULT_CACHE
    out: Path = Path("runs/ablation")
    preset: Preset = "cpu"
    rows: tuple[str, ...] = TABLE3_ROWS
    seeds: tuple[int, ...] = SEEDS
    epochs: int | None = 80
    width: int | None = None
    crop: tuple[int, int, int] | None = None
    targets: Targets = "hybrid"
    max_steps: int | None = None
    split: Split = "test"
    figures: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache", as_location(self.cache))
        check_choice(self.preset, PRESETS, "--preset", "preset")
        check_choice(self.targets, POLICIES, "--targets", "targets")
        check_choice(self.split, SPLITS, "split", "split")
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown or not self.rows:
            raise UserError(f"unknown ablation row(s) {' '.join(unknown) or '(none given)'}: choose from "
                            f"{', '.join(ROWS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds {self.seeds}: give one or more distinct seeds")


def row_settings(settings: AblationSettings, row: str, seed: int) -> TrainSettings:
    """The TrainSettings of one row and seed (run folder ``OUT/ROW-seedSEED``)."""
    base = preset(settings.preset, settings.cache)
    changes = dict(ROWS[row][1])
    pic = replace(base.pic, enabled=changes.pop("pic", True))
    extra = {k: v for k, v in (("epochs", settings.epochs), ("width", settings.width), ("crop", settings.crop))
             if v is not None}
    return replace(base, out=Path(settings.out) / f"{row}-seed{seed}", seed=seed, targets=settings.targets, pic=pic,
                   **changes, **extra)


def _train_one(train_settings: TrainSettings, max_steps: int | None, progress: bool) -> float:
    """Train, resume or skip one run; its training wall time in seconds, summed over interruptions."""
    run = Path(train_settings.out)  # type: ignore[arg-type]
    done, partial = run / "done.json", run / "partial.json"
    if done.exists():
        return float(json.loads(done.read_text())["train_s"])
    earlier = float(json.loads(partial.read_text())["train_s"]) if partial.exists() else 0.0
    start = time.perf_counter()
    try:
        if (run / "latest.pt").exists():
            log.info("%s: resuming from its latest checkpoint", run)
            train(None, resume=run, max_steps=max_steps, progress=progress)
        else:
            if run.exists():  # started, but no checkpoint yet: nothing worth keeping
                shutil.rmtree(run)
            log.info("%s: training", run)
            train(train_settings, max_steps=max_steps, progress=progress)
    except BaseException:
        if run.exists():
            write_atomic(partial, json.dumps({"train_s": round(earlier + time.perf_counter() - start, 1)}))
        raise
    seconds = earlier + time.perf_counter() - start
    write_atomic(done, json.dumps({"train_s": round(seconds, 1)}))
    partial.unlink(missing_ok=True)
    return seconds


def run_ablation(settings: AblationSettings) -> dict[str, Any]:
    """Train every row × seed (skipping finished runs), evaluate each row over its seeds, write
    ``ablation.md`` and ``ablation.json``; return the latter's content.

    Raises:
        UserError: an unknown row or preset, a bad store (see ``train``), a run folder of another
            benchmark (its settings differ from this command's).
    """
    out = Path(settings.out)
    runs: dict[str, list[Path]] = {}
    train_s: dict[str, list[float]] = {}
    for row in settings.rows:
        for seed in settings.seeds:
            wanted = row_settings(settings, row, seed)
            _check_same_run(wanted)
            runs.setdefault(row, []).append(Path(wanted.out))  # type: ignore[arg-type]
            train_s.setdefault(row, []).append(_train_one(wanted, settings.max_steps, settings.progress))
    table: list[dict[str, Any]] = []
    for row in settings.rows:
        start = time.perf_counter()
        result = evaluate(EvaluateSettings(runs=tuple(runs[row]), split=settings.split, out=out / f"evaluation-{row}",
                                           mm=False, figures=settings.figures))
        table.append(row_summary(row, ROWS[row][0], result, train_s[row], time.perf_counter() - start))
    summary = {"settings": settings_to_json(settings), "teacher": teacher_report(settings.cache),
               "class_labels": result["class_labels"], "rows": table,
               "paired": paired_differences(table, {name: base for name, (_, _, base) in ROWS.items()}),
               "train_s": round(sum(sum(v) for v in train_s.values()), 1)}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "ablation.json", json.dumps(summary, indent=1))
    write_atomic(out / "ablation.md", ablation_markdown(summary))
    return summary


def teacher_report(cache: Path | str) -> dict[str, Any]:
    """The store's teacher and how much anatomy its tokens carry (:func:`anatomy_probe`), printed beside
    the FKD rows: what distillation can transfer is bounded by what the targets know. The probe is left
    out, with the reason, where the store cannot be probed (no labelled train or test case)."""
    store = FeatureStore.open(cache)
    try:
        teacher = store.attrs.teacher
        report: dict[str, Any] = {"source": teacher.source, "label": teacher.label,
                                  "description": f"`{teacher.source}` ({teacher.label})"}
        try:
            probe = anatomy_probe(store)
        except UserError as exc:
            report["probe_summary"] = f"not measured ({exc})"
            return report
    finally:
        store.close()
    report["probe"] = probe
    report["probe_summary"] = (f"balanced accuracy {100 * probe['balanced_accuracy']:.1f} %, organ patches "
                               f"{100 * (probe['foreground_accuracy'] or 0.0):.1f} %")
    return report


def _check_same_run(wanted: TrainSettings) -> None:
    """A run folder left by an earlier command must hold this row's settings (else say so, not mix them)."""
    path = Path(wanted.out)  # type: ignore[arg-type]
    if not (path / "settings.json").exists():
        return
    saved = settings_to_json(RunFolder(path).train_settings())
    mine = settings_to_json(wanted.resolved())  # the crop grid as a run resolves and saves it
    # precision and memory format are saved resolved; the store's identity is checked by the resume itself
    differ = [k for k, v in mine.items() if k not in ("precision", "memory_format", "cache", "out")
              and saved.get(k) != v]
    if differ:
        raise UserError(f"{path} holds a run with other settings ({', '.join(differ)}); use another --out or "
                        "remove it")
