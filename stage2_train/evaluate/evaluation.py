"""``dinomix-cache evaluate``: per-class Dice and ASD of one or more runs, in the paper's layout.

For each run, every case of the split (``test`` by default) is segmented by sliding-window inference
(:mod:`stage2_train.evaluate.inference`) in the store's preprocessed grid (80×160×160 for Synapse), and scored
there with DHC's rules (:func:`stage2_train.evaluate.metrics.case_metrics`): Dice in %, ASD in voxels of that
grid, so numbers compare with the paper's Tables 1-2. ASD is DHC's (medpy ``asd(pred, label)``): the
mean distance from the prediction's surface to the label's, directed. The symmetric distance is
reported apart as ASSD (medpy ``assd``: both directed distance sets pooled); it is not in the paper.
Where the original label files are reachable, the prediction is also mapped back to each case's
original grid and ASD and ASSD are given in millimetres there, labelled as such. Several runs (seeds)
give mean ± std over runs, as the paper reports.

Outputs in the evaluation folder (default ``RUN/evaluation-<split>`` for one run, ``PARENT/
evaluation-<split>`` for several): ``results.json`` (everything), ``cases.csv`` (run × case ×
class), ``results.md`` (the tables), ``dice.png`` (per-class Dice, seeds' spread) and
``qualitative.png`` (axial slices: CT, ground truth, prediction).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import nibabel as nib
import numpy as np
from rich.progress import Progress

from dinomix_cache.atomic import atomic_path, remove_stale_temporaries, write_atomic
from dinomix_cache.data.classes import class_abbreviations
from dinomix_cache.data.datasets import CaseSource, scan_case_files
from dinomix_cache.data.source_volumes import load_source_case, resolve_recorded
from dinomix_cache.errors import UserError, check_choice, writing
from dinomix_cache.settings_codec import settings_to_json
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.locations import as_location
from dinomix_cache.teacher.model import PRETRAINED_LABEL
from dinomix_cache.teacher.provenance import ORACLE_MARK
from stage2_train.evaluate.dice_chart import dice_bar_chart
from stage2_train.evaluate.inference import (
    CHECKPOINTS,
    DEFAULT_STRIDE,
    Checkpoint,
    InferenceSettings,
    RunModel,
    check_stride,
    load_run_model,
)
from stage2_train.evaluate.metrics import (
    CONVENTIONS,
    CaseMetrics,
    Convention,
    case_metrics,
    mean_std_over_runs,
    summarize,
)
from stage2_train.evaluate.predict import labels_to_source_grid
from stage2_train.evaluate.slice_figure import qualitative_figure
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.train.run_folder import store_identity

__all__ = ["SPLITS", "EvalCase", "EvaluateSettings", "Split", "evaluate", "evaluation_cases"]

log = logging.getLogger("dinomix_cache.evaluate")

# What the keys of results.json and the columns of cases.csv hold (saved in results.json as "metrics").
METRIC_DEFINITIONS = {
    "dice": "Dice in percent: 100 x medpy dc(pred == c, label == c)",
    "asd": "average surface distance, directed: medpy asd(pred == c, label == c), the mean distance from "
           "the prediction's surface voxels to the label's surface (DHC's ASD, the paper's)",
    "assd": "average symmetric surface distance: medpy 0.5.2 assd, both directed distance sets pooled "
            "(not in the paper)",
    "absent classes": "convention dhc: in one of pred / label only -> Dice 0, ASD and ASSD 128 (voxels; "
                      "NaN in mm); in neither -> Dice 1, ASD and ASSD 0; convention strict: NaN, left out",
    "units": "voxel: the store's preprocessed grid; mm: each case's original geometry",
}


Split = Literal["test", "eval"]
SPLITS: tuple[Split, ...] = get_args(Split)


@dataclass(frozen=True)
class EvaluateSettings:
    """What ``evaluate`` does (saved resolved in ``results.json``).

    Attributes:
        runs: run folders (several = seeds of one setting: mean ± std over them).
        split: ``test`` (default) or ``eval``.
        out: the evaluation folder (default: see the module docstring).
        cache: the store (folder, ``.zip`` or URL), if it moved since training (it must be the same store).
        data: the dataset folder: rebuilds the volumes when the store is gone or holds none, and
            finds the original labels for ASD / ASSD in mm (default: the folder the store was extracted from).
        checkpoint: ``best`` (best validation Dice, as the peers) or ``latest``.
        stride: sliding-window stride (D, H, W) in voxels.
        sw_batch_size: windows per forward pass.
        convention: ``dhc`` (the paper's absent-class rules) or ``strict`` (absent → NaN, left out).
        mm: also ASD and ASSD in mm in the original geometry (needs the original label files).
        figures: draw ``dice.png`` and ``qualitative.png``.
        progress: show a progress bar.

    Raises:
        UserError: no run, or the same run twice. SettingsError (a UserError): an unknown split,
            checkpoint or convention, a bad stride or ``sw_batch_size`` (naming the CLI option).
    """

    runs: tuple[Path, ...]
    split: Split = "test"
    out: Path | None = None
    cache: Path | str | None = None
    data: Path | None = None
    checkpoint: Checkpoint = "best"
    stride: tuple[int, int, int] = DEFAULT_STRIDE
    sw_batch_size: int = 4
    convention: Convention = "dhc"
    mm: bool = True
    figures: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache", None if self.cache is None else as_location(self.cache))
        if not self.runs:
            raise UserError("pass at least one --run RUN")
        check_choice(self.split, SPLITS, "--split", "split")
        check_choice(self.checkpoint, CHECKPOINTS, "--checkpoint", "checkpoint")
        check_choice(self.convention, CONVENTIONS, "--convention", "convention")
        check_stride(self.stride, self.sw_batch_size)
        if len({Path(r).resolve() for r in self.runs}) != len(self.runs):
            raise UserError("the same run is given twice")

    def resolved(self) -> EvaluateSettings:
        """A copy with the evaluation folder filled in (``RUN/evaluation-SPLIT``, or for several runs
        their parent's ``evaluation-SPLIT``)."""
        if self.out is not None:
            return self
        first = Path(self.runs[0])
        out = first / f"evaluation-{self.split}" if len(self.runs) == 1 else first.parent / f"evaluation-{self.split}"
        return replace(self, runs=tuple(Path(r) for r in self.runs), out=out)


@dataclass
class EvalCase:
    """One case to score: preprocessed image and label, and where its original label lies.

    Attributes:
        case_id: the case.
        image: (D, H, W) preprocessed image in [0, 1].
        label: (D, H, W) uint8 preprocessed label (the grid the paper scores in).
        source_label: the original label file, or None if it cannot be found.
        source: the recorded source geometry (``shape``, ``affine``, ``orientation``), or None.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    source_label: Path | None = None
    source: dict[str, Any] | None = field(default=None, repr=False)


def _open_store(model: RunModel, cache: Path | str | None) -> FeatureStore | None:
    """The run's store (folder, zip or URL), checked to be the one it was trained from; None if it is gone.
    It holds a reader lock until closed (``extract --overwrite`` refuses to delete it meanwhile)."""
    path = as_location(cache if cache is not None else model.settings.cache)
    if isinstance(path, Path) and not path.exists():
        if cache is not None:
            raise UserError(f"--cache {path} does not exist")
        return None
    try:
        store = FeatureStore.open(path)
    except UserError as exc:
        if cache is not None or isinstance(path, Path):
            raise
        # The URL the run recorded no longer answers: as for a local store that is gone, the sources may do.
        log.warning("the run's store is unavailable (%s)", exc)
        return None
    if store_identity(store)["attrs_sha256"] != model.store_sha256:
        store.close()
        raise UserError(f"{path} is not the store {model.run} was trained from (attributes differ); "
                        "pass --cache with the run's store, or --data to rebuild the volumes from the sources")
    return store.hold_reader_lock()


def evaluation_cases(model: RunModel, split: str, cache: Path | str | None,
                     data: Path | None) -> Iterator[EvalCase]:
    """The split's cases one at a time (memory stays at one case), from the store or the sources.

    Raises:
        UserError: the split is empty; the store is gone and no ``data`` is given; files missing.
    """
    attrs = model.store_attrs
    ids = attrs.case_ids(split)
    if not ids:
        raise UserError(f"the store of {model.run} has no {split} cases; use --split eval or test")
    store = _open_store(model, cache)
    recorded_root = attrs.extraction.data
    root = Path(data) if data is not None else (Path(recorded_root) if recorded_root else None)
    if store is None:
        if data is None:
            raise UserError(f"the store {model.settings.cache} of {model.run} is gone and evaluate needs the "
                            f"{split} volumes: pass --cache STORE if it moved, or --data DIR (the dataset folder) "
                            "to rebuild them from the source files")
        files = scan_case_files(attrs.dataset.name, Path(data))
        missing = [cid for cid in ids if cid not in files or files[cid][1] is None]
        if missing:
            raise UserError(f"{data} lacks the {split} cases {' '.join(missing[:5])} (image and label)")
        for cid in ids:
            image_path, label_path, fmt = files[cid]
            loaded = load_source_case(CaseSource(cid, split, image_path, label_path, fmt), model.preprocess,
                                      model.num_classes)
            assert loaded.label is not None
            yield EvalCase(cid, loaded.image, loaded.label, label_path, loaded.source)
        return
    with store:
        for cid in ids:
            volumes = VolumeCache(store, [cid], with_labels=True, data=data)
            if not volumes.has_label(cid):
                raise UserError(f"{store.path} holds no label for {split} case {cid}")
            source = store.case_source(cid)
            label_path = None
            if source.get("label") and root is not None:
                candidate = resolve_recorded(source["label"], root)
                label_path = candidate if candidate.exists() else None
            yield EvalCase(cid, volumes.image(cid), volumes.label(cid), label_path, source)


def _mm_metrics(pred: np.ndarray, case: EvalCase, model: RunModel, convention: str) -> CaseMetrics | None:
    """Metrics in the case's original grid (ASD and ASSD in mm), or None without geometry or label file."""
    source = case.source or {}
    if case.source_label is None or not source.get("affine") or not case.source_label.name.endswith((".nii", ".gz")):
        return None
    affine = np.asarray(source["affine"], dtype=np.float64)
    original = np.asarray(nib.load(case.source_label).dataobj).astype(np.int64)
    pred_file = labels_to_source_grid(pred, tuple(original.shape), affine, model.preprocess)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return case_metrics(pred_file, original, model.num_classes, convention=convention, spacing=spacing)


def evaluate(settings: EvaluateSettings) -> dict[str, Any]:
    """Score every run on the split; write the evaluation folder; return ``results.json``'s content.

    Raises:
        UserError: a run without checkpoint, a missing store without ``data``, runs whose classes
            differ, an empty split.
    """
    settings = settings.resolved()
    inference = InferenceSettings(stride=settings.stride, sw_batch_size=settings.sw_batch_size,
                                  checkpoint=settings.checkpoint)
    models = [load_run_model(run, settings.checkpoint) for run in settings.runs]
    class_names = models[0].class_names
    for model in models[1:]:
        if model.class_names != class_names:
            raise UserError(f"{model.run} has classes {model.class_names}, {models[0].run} has {class_names}: "
                            "evaluate runs of one dataset together")
    labels = class_abbreviations(class_names)

    runs: list[dict[str, Any]] = []
    shown: tuple[str, np.ndarray, np.ndarray, np.ndarray] | None = None
    with Progress(disable=not settings.progress, transient=True) as bar:
        for model in models:
            task = bar.add_task(f"evaluate {model.run.name}", total=None)
            voxel, mm, cases = [], [], []
            for case in evaluation_cases(model, settings.split, settings.cache, settings.data):
                pred = model.segment(case.image, inference)
                metrics = case_metrics(pred, case.label, model.num_classes, convention=settings.convention)
                in_mm = _mm_metrics(pred, case, model, settings.convention) if settings.mm else None
                voxel.append(metrics)
                if in_mm is not None:
                    mm.append(in_mm)
                cases.append({"case": case.case_id, "voxel": metrics.to_json(),
                              "mm": None if in_mm is None else in_mm.to_json()})
                classes_present = len(np.unique(case.label))
                if model is models[0] and (shown is None or classes_present > len(np.unique(shown[2]))):
                    shown = (case.case_id, case.image, case.label, pred)
                bar.advance(task)
            runs.append({"run": str(model.run), "checkpoint": model.checkpoint, "step": model.step,
                         "teacher": model.store_attrs.teacher.label,
                         "summary": summarize(voxel),
                         "summary_mm": summarize(mm) if mm and len(mm) == len(voxel) else None, "cases": cases})
    over = mean_std_over_runs([r["summary"] for r in runs]) if len(runs) > 1 else None
    result = {"settings": settings_to_json(settings),
              "metrics": METRIC_DEFINITIONS, "class_names": class_names[1:], "class_labels": labels, "runs": runs,
              "over_runs": over}
    _write_outputs(settings, result, shown)
    return result


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _teacher_note(label: str) -> str | None:
    """What the teacher's label means for the numbers, or None for a pretrained teacher."""
    if ORACLE_MARK in label:
        return (f"Teacher: **{label}**: it learnt from the labels of the unlabeled cases, so these numbers are not "
                "a semi-supervised result.")
    if "random" in label:
        return f"Teacher: **{label}**: these numbers test the pipeline, not the method."
    if label != PRETRAINED_LABEL:
        return f"Teacher: **{label}**: not a pretrained DINOv3; it learnt from the labeled cases' labels only."
    return None


def results_markdown(result: dict[str, Any]) -> str:
    """The tables of ``results.md``: Avg. Dice, Avg. ASD and per-class Dice per run (paper layout),
    then mean ± std over runs, then per-class ASD, per-class ASSD, and both in mm where available."""
    labels, runs, over = result["class_labels"], result["runs"], result["over_runs"]
    s = result["settings"]
    teacher = runs[0]["teacher"]
    lines = [f"# Evaluation on the {s['split']} split", "",
             f"Dice in %, ASD in voxels of the preprocessed grid; absent-class convention `{s['convention']}`; "
             f"checkpoint `{s['checkpoint']}`; sliding window stride {'x'.join(map(str, s['stride']))}.", "",
             "ASD is the paper's (DHC's, medpy `asd(pred, label)`): the mean distance from the prediction's "
             "surface to the label's, directed. ASSD, the average symmetric surface distance (medpy `assd`, "
             "both directions pooled), is given apart below; it is not in the paper.", ""]
    note = _teacher_note(teacher)
    if note:
        lines += [note, ""]
    head = "| Run | Avg. Dice | Avg. ASD | " + " | ".join(labels) + " |"
    lines += [head, "|" + " --- |" * (3 + len(labels))]
    for r in runs:
        sm = r["summary"]
        lines.append(f"| {Path(r['run']).name} | {_fmt(sm['mean_dice'], 2)} | {_fmt(sm['mean_asd'], 2)} | "
                     + " | ".join(_fmt(v) for v in sm["dice"]) + " |")
    if over is not None:
        (md, sd), (ma, sa) = over["mean_dice"], over["mean_asd"]
        lines.append(f"| mean ± std ({len(runs)} runs) | {_fmt(md, 2)}±{_fmt(sd, 1)} | {_fmt(ma, 2)}±{_fmt(sa, 1)} | "
                     + " | ".join(f"{_fmt(m)}±{_fmt(d)}" for m, d in zip(over["dice_mean"], over["dice_std"],
                                                                         strict=True)) + " |")
    lines += ["", "ASD per class (voxels; directed, prediction to label):", "", "| Run | " + " | ".join(labels) + " |",
              "|" + " --- |" * (1 + len(labels))]
    for r in runs:
        lines.append(f"| {Path(r['run']).name} | " + " | ".join(_fmt(v, 2) for v in r["summary"]["asd"]) + " |")
    if all("assd" in r["summary"] for r in runs):
        lines += ["", "ASSD, average symmetric surface distance (voxels; not in the paper):", "",
                  "| Run | Avg. ASSD | " + " | ".join(labels) + " |", "|" + " --- |" * (2 + len(labels))]
        for r in runs:
            sm = r["summary"]
            lines.append(f"| {Path(r['run']).name} | {_fmt(sm['mean_assd'], 2)} | "
                         + " | ".join(_fmt(v, 2) for v in sm["assd"]) + " |")
        if over is not None and "mean_assd" in over:
            ma, sa = over["mean_assd"]
            lines.append(f"| mean ± std ({len(runs)} runs) | {_fmt(ma, 2)}±{_fmt(sa, 1)} | "
                         + " | ".join(f"{_fmt(m, 2)}±{_fmt(d, 2)}" for m, d in zip(over["assd_mean"], over["assd_std"],
                                                                                 strict=True)) + " |")
    if all(r["summary_mm"] is not None for r in runs):
        lines += ["", "ASD (directed, prediction to label) and ASSD (symmetric) in millimetres, in each case's "
                  "original geometry (prediction mapped back by nearest neighbour; a class in only one of "
                  "prediction and label has no distance and is left out); per class: ASD (mm):", "",
                  "| Run | Avg. ASD (mm) | Avg. ASSD (mm) | " + " | ".join(labels) + " |",
                  "|" + " --- |" * (3 + len(labels))]
        for r in runs:
            sm = r["summary_mm"]
            lines.append(f"| {Path(r['run']).name} | {_fmt(sm['mean_asd'], 2)} | {_fmt(sm.get('mean_assd'), 2)} | "
                         + " | ".join(_fmt(v, 2) for v in sm["asd"]) + " |")
    return "\n".join(lines) + "\n"


def _write_outputs(settings: EvaluateSettings, result: dict[str, Any],
                   shown: tuple[str, np.ndarray, np.ndarray, np.ndarray] | None) -> None:
    out = Path(settings.out)  # type: ignore[arg-type]
    with writing(out):
        _write_files(out, settings, result, shown)


def _write_files(out: Path, settings: EvaluateSettings, result: dict[str, Any],
                 shown: tuple[str, np.ndarray, np.ndarray, np.ndarray] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # left by an evaluation killed while writing
    write_atomic(out / "results.json", json.dumps(result, indent=1))
    write_atomic(out / "results.md", results_markdown(result))
    with atomic_path(out / "cases.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        # asd_*: directed (medpy asd(pred, label), the paper's ASD); assd_*: symmetric (medpy assd).
        writer.writerow(["run", "case", "class", "label", "dice_percent", "asd_voxels", "asd_mm", "assd_voxels",
                         "assd_mm"])
        for r in result["runs"]:
            for case in r["cases"]:
                voxel, mm = case["voxel"], case["mm"]
                for k, (name, label) in enumerate(zip(result["class_names"], result["class_labels"], strict=True)):
                    writer.writerow([Path(r["run"]).name, case["case"], name, label, voxel["dice"][k], voxel["asd"][k],
                                     "" if mm is None else mm["asd"][k], voxel["assd"][k],
                                     "" if mm is None else mm["assd"][k]])
    if not settings.figures:
        return
    dice = np.array([[np.nan if v is None else v for v in r["summary"]["dice"]] for r in result["runs"]], float)
    over = result["over_runs"]
    dice_bar_chart(out / "dice.png", result["class_labels"], np.nanmean(dice, 0) if over else dice[0],
                   np.array(over["dice_std"], float) if over else None,
                   run_labels=[Path(r["run"]).name for r in result["runs"]], per_run=dice if over else None,
                   title=f"Dice per class, {settings.split} split, {_runs_word(len(result['runs']))}",
                   class_names=result["class_names"])
    if shown is not None:
        case_id, image, label, pred = shown
        qualitative_figure(out / "qualitative.png", image, label, pred, ["background", *result["class_names"]],
                           ["BG", *result["class_labels"]],
                           title=f"case {case_id}, {Path(result['runs'][0]['run']).name}")


def _runs_word(n: int) -> str:
    return "1 run" if n == 1 else f"mean of {n} runs (dots: each run; bars: ± std)"
