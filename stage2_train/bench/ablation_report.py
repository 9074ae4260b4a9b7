"""What ``bench ablation`` reports: each row's Dice over seeds, the paired differences between rows at
the same seed, and what the rows' training logs show (EMA against student, confident fraction, the
share each loss term weighs), as JSON and as ``ablation.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stage2_train.train.run_folder import RunFolder

__all__ = ["ablation_markdown", "paired_differences", "row_summary", "run_log_summary"]


def row_summary(row: str, label: str, result: dict[str, Any], train_s: list[float], eval_s: float) -> dict[str, Any]:
    """One row of the table from ``evaluate``'s result over the row's seeds (in seed order)."""
    runs = result["runs"]
    if result["over_runs"] is not None:
        over = result["over_runs"]
        dice, asd = over["mean_dice"], over["mean_asd"]
        per_class = [list(pair) for pair in zip(over["dice_mean"], over["dice_std"], strict=True)]
    else:  # one seed: no spread
        s = runs[0]["summary"]
        dice, asd = (s["mean_dice"], 0.0), (s["mean_asd"], 0.0)
        per_class = [[v, 0.0] for v in s["dice"]]
    return {"row": row, "label": label, "runs": [r["run"] for r in runs],
            "steps": [r["step"] for r in runs], "mean_dice": list(dice), "mean_asd": list(asd),
            "dice": per_class, "per_run_mean_dice": [r["summary"]["mean_dice"] for r in runs],
            "per_run_dice": [r["summary"]["dice"] for r in runs],
            "logs": [run_log_summary(Path(r["run"])) for r in runs],
            "train_s": [round(t, 1) for t in train_s], "eval_s": round(eval_s, 1)}


def run_log_summary(run: Path) -> dict[str, Any]:
    """What a run's ``log.jsonl`` says about its training: the last epoch's validation Dice of the student
    and of the EMA teacher, their best, and over the run the mean confident fraction, the share of confident
    voxels that were background, the pseudo-labels' mean Dice (last epoch), and each term's mean share of
    the loss and the distillation gradient's share at x5 (None where a row has no such part)."""
    epochs = [r for r in RunFolder(run).records() if r.get("kind") == "epoch"]
    if not epochs:
        return {}

    def mean(key: str) -> float | None:
        values = [r[key] for r in epochs if r.get(key) is not None]
        return round(float(np.mean(values)), 4) if values else None

    last = epochs[-1]
    shares: dict[str, float] = {}
    for term in ("sup", "sup_aux", "unsup", "unsup_aux", "distill"):
        values = [r["shares"][term] for r in epochs if term in (r.get("shares") or {})]
        if values:
            shares[term] = round(float(np.mean(values)), 4)
    pseudo = [v for v in last.get("pseudo_dice") or [] if v is not None]
    return {"epochs": len(epochs), "val_dice": last.get("val_dice"), "ema_val_dice": last.get("ema_val_dice"),
            "best_val_dice": max(r["val_dice"] for r in epochs),
            "best_val_epoch": max(epochs, key=lambda r: r["val_dice"])["epoch"],
            "confident": mean("confident"), "confident_background": mean("confident_background"),
            "pseudo_dice": round(float(np.mean(pseudo)), 4) if pseudo else None,
            "distill_grad": mean("distill_grad"), "shares": shares}


def paired_differences(rows: list[dict[str, Any]], bases: dict[str, str | None]) -> list[dict[str, Any]]:
    """Per row, its mean Dice minus that of labeled-only and of the row it adds a part to, seed by seed
    (the same index in each row's ``per_run_mean_dice``), with their mean and standard deviation, and the
    per-class mean differences against that base. Rows whose reference is absent are skipped."""
    by_name = {r["row"]: r for r in rows}
    out = []
    for r in rows:
        entry: dict[str, Any] = {"row": r["row"]}
        for key, other in (("vs_labeled_only", "labeled-only"), ("vs_base", bases.get(r["row"]))):
            if other is None or other == r["row"] or other not in by_name:
                continue
            ref = by_name[other]
            diffs = [a - b for a, b in zip(r["per_run_mean_dice"], ref["per_run_mean_dice"], strict=True)]
            per_class = np.mean(np.asarray(r["per_run_dice"], float) - np.asarray(ref["per_run_dice"], float), axis=0)
            entry[key] = {"against": other, "per_seed": [round(d, 2) for d in diffs],
                          "mean": round(float(np.mean(diffs)), 2),
                          "std": round(float(np.std(diffs, ddof=1)), 2) if len(diffs) > 1 else 0.0,
                          "per_class": [round(float(v), 1) for v in per_class]}
        out.append(entry)
    return out


def _f(v: float | None, d: int = 1) -> str:
    return "n/a" if v is None or v != v else f"{v:.{d}f}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def ablation_markdown(summary: dict[str, Any]) -> str:
    """The benchmark's report: the table (mean ± std over seeds), the paired differences, and the logs."""
    s = summary["settings"]
    labels = summary["class_labels"]
    n = len(s["seeds"])
    teacher = summary.get("teacher") or {}
    lines = [f"# Ablation (seeds {', '.join(map(str, s['seeds']))}: mean ± std over {n})", "",
             f"Store `{s['cache']}`, preset `{s['preset']}`"
             + (f", {s['epochs']} epochs" if s["epochs"] else "") + f", targets `{s['targets']}`; {s['split']} split, "
             "sliding window, Dice in %, ASD in voxels (DHC's absent-class rules)."]
    if teacher:
        lines += ["", f"Teacher: {teacher.get('description', '?')}" + (
            f"; anatomy probe (linear, test split patches): {teacher['probe_summary']}"
            if teacher.get("probe_summary") else "")]
    lines += ["", "| Row | Avg. Dice | Avg. ASD | " + " | ".join(labels) + " |", "|" + " --- |" * (3 + len(labels))]
    for r in summary["rows"]:
        (md, sd), (ma, sa) = r["mean_dice"], r["mean_asd"]
        lines.append(f"| {r['label']} | {_f(md, 2)} ± {_f(sd)} | {_f(ma, 2)} ± {_f(sa)} | "
                     + " | ".join(f"{_f(m)} ± {_f(d)}" for m, d in r["dice"]) + " |")
    lines += ["", "## Paired differences of mean Dice (same seed, same crops)", "",
              "| Row | vs labeled only: per seed | mean ± std | vs the row it adds to | per seed | mean ± std |",
              "| --- | --- | --- | --- | --- | --- |"]
    for d in summary.get("paired", []):
        cells = []
        for key in ("vs_labeled_only", "vs_base"):
            p = d.get(key)
            if p is None:
                cells += (["–", "–"] if key == "vs_labeled_only" else ["–", "–", "–"])
                continue
            seeds = ", ".join(f"{v:+.2f}" for v in p["per_seed"])
            cells += ([seeds, f"{p['mean']:+.2f} ± {p['std']:.2f}"] if key == "vs_labeled_only"
                      else [p["against"], seeds, f"{p['mean']:+.2f} ± {p['std']:.2f}"])
        label = next(r["label"] for r in summary["rows"] if r["row"] == d["row"])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## What the training logs show (mean over seeds)", "",
              "Validation Dice on the eval split's centre crops at the last epoch (student, EMA teacher) and the "
              "best epoch; over the run: confident fraction of unlabeled voxels, share of the confident voxels "
              "that were background, pseudo-label mean Dice against the truth (last epoch), each term's share of "
              "the total loss (Eq. 5 weights, λ ramped), and the distillation gradient's norm at x5 over the "
              "whole loss's.", "",
              "| Row | val Dice student | val Dice EMA | best (epoch) | confident | of which bg | pseudo Dice | "
              "share sup | share unsup | share aux | share distill | distill grad |",
              "|" + " --- |" * 12]
    for r in summary["rows"]:
        logs = [x for x in r.get("logs", []) if x]
        if not logs:
            continue

        def m(key: str, logs=logs) -> float | None:
            values = [x[key] for x in logs if x.get(key) is not None]
            return float(np.mean(values)) if values else None

        def share(*terms: str, logs=logs) -> float | None:
            values = [sum(x["shares"].get(t, 0.0) for t in terms) for x in logs
                      if any(t in x["shares"] for t in terms)]
            return float(np.mean(values)) if values else None

        best_epochs = "/".join(str(x["best_val_epoch"]) for x in logs)
        lines.append(f"| {r['label']} | {_pct(m('val_dice'))} | {_pct(m('ema_val_dice'))} | "
                     f"{_pct(m('best_val_dice'))} ({best_epochs}) | {_pct(m('confident'))} | "
                     f"{_pct(m('confident_background'))} | {_pct(m('pseudo_dice'))} | {_pct(share('sup'))} | "
                     f"{_pct(share('unsup'))} | {_pct(share('sup_aux', 'unsup_aux'))} | {_pct(share('distill'))} | "
                     f"{_f(m('distill_grad'), 3)} |")
    total = summary["train_s"]
    lines += ["", f"Training wall time {total / 60:.1f} min in all ("
              + ", ".join(f"{r['row']} {sum(r['train_s']) / 60:.1f}" for r in summary["rows"]) + ")."]
    return "\n".join(lines) + "\n"
