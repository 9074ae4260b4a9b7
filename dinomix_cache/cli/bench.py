"""The ``bench`` verbs: ``bench extract``, ``targets``, ``step``, ``ablation`` and ``anatomy``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dinomix_cache.cli.common import err, out, parse_shape, setup_logging, user_errors
from dinomix_cache.cli.extract import (
    BatchOpt,
    DataOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    InputOpt,
    PhantomCasesOpt,
    PhantomMatrixOpt,
    ReadThreadsOpt,
    ShapeOpt,
    TeacherOpt,
    build_extract_settings,
)
from dinomix_cache.store.feature_store import FeatureStore
from stage1_extract.bench import bench_extract
from stage2_train.bench.ablation import ROWS, SEEDS, TABLE3_ROWS, AblationSettings, run_ablation
from stage2_train.bench.anatomy import anatomy_probe
from stage2_train.bench.step import VARIANTS, bench_step
from stage2_train.bench.targets import bench_targets
from stage2_train.train.settings import TrainSettings
from stage2_train.train.settings import preset as make_preset


@user_errors
def bench_extract_cmd(
    dataset: str = DatasetOpt,
    data: Path | None = DataOpt,
    teacher: str = typer.Option("random:vits16", "--teacher", help=TeacherOpt.help),
    input_size: str | None = InputOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    target_shape: str = ShapeOpt,
    batch_size: int = BatchOpt,
    read_threads: int = ReadThreadsOpt,
    max_cases: int = typer.Option(8, "--max-cases", help="Cases to run (the first ones)."),
    repeats: int = typer.Option(3, "--repeats", help="Measurement pairs; medians are reported."),
    phantom_cases: int | None = PhantomCasesOpt,
    phantom_matrix: int = PhantomMatrixOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the measurement as JSON."),
) -> None:
    """End-to-end extraction throughput (slices/s) against the teacher's forward alone.

    Same device, same slices, same run; ratio = end-to-end / teacher-only (1.0 = the teacher is
    the only cost).
    """
    setup_logging()

    settings = build_extract_settings(
        dataset=dataset, data=data, teacher=teacher, input_size=input_size, dtype=dtype, device=device,
        target_shape=target_shape, batch_size=batch_size, read_threads=read_threads, phantom_cases=phantom_cases,
        phantom_matrix=phantom_matrix, progress=not as_json)
    result = bench_extract(settings, max_cases=max_cases, repeats=repeats)
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            out.print(f"{key}: {value}", highlight=False)


@user_errors
def bench_targets_cmd(
    cache: str = typer.Option(..., "--cache", help="The feature store (folder, .zip or URL; its teacher must be "
                              "loadable)."),
    preset: str = typer.Option("cpu-small", "--preset", help="Training settings: cpu-small or paper."),
    crop: str | None = typer.Option(None, "--crop", help="Training crop D x H x W instead of the preset's (the crop "
                                    "view's in-plane size must be the store's --crop-windows)."),
    steps: int = typer.Option(20, "--steps", help="Timed iterations per policy, interleaved (after the warm-up)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed rounds of every policy first (the first fills the "
                               "feature memory)."),
    seed: int = typer.Option(TrainSettings.seed, "--seed", help="Seed of the sampled batches (the same for every "
                             "policy)."),
    teacher_view: str = typer.Option(TrainSettings.teacher_view, "--teacher-view", help="slice or crop (see train); "
                                     "crop needs a store made with --crop-windows for cache and hybrid."),
    crop_grid: str | None = typer.Option(None, "--crop-grid", help="In-plane crop offsets: voxel or token (see "
                                         "train; default: the view's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the measurement as JSON."),
) -> None:
    """Step time of no distillation and of each target policy, in one teacher view; cosine of each
    policy's targets to online's (the view's reference) on the same batches (student cells), the
    fraction of slices recomputed, the cross-view cosine (slice-view against crop-view references on
    the same batches: how much the definition matters for this teacher) and the teacher's context
    cosine (1.0 = blind to context: then every fidelity figure is 1.0 whatever the code does)."""
    setup_logging()
    settings = replace(make_preset(preset, cache), seed=seed, teacher_view=teacher_view, crop_grid=crop_grid,
                       **({"crop": parse_shape(crop, 3, "--crop")} if crop else {}))
    result = bench_targets(settings, steps=steps, warmup=warmup)
    if as_json:
        print(json.dumps(result))
    else:
        for mode, entry in result.items():
            text = "  ".join(f"{k} {v}" for k, v in entry.items()) if isinstance(entry, dict) else str(entry)
            out.print(f"{mode:<14}{text}", highlight=False)


@user_errors
def bench_step_cmd(
    cache: str = typer.Option(..., "--cache", help="The feature store (its volumes must hold the preset's crop)."),
    preset: str = typer.Option("cpu", "--preset", help="Training settings: paper, cpu or cpu-small."),
    steps: int = typer.Option(5, "--steps", help="Timed iterations per variant, interleaved (after the warm-up)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed rounds of both variants first."),
    seed: int = typer.Option(TrainSettings.seed, "--seed", help="Seed of the sampled batches (the same for both "
                             "variants)."),
    as_json: bool = typer.Option(False, "--json", help="Print the measurement as JSON."),
) -> None:
    """Step time of a preset in float32 with contiguous tensors against the precision and memory format
    train resolves on this machine (--precision auto, --memory-format auto), stepped alternately on the
    same batches: median, min and max of the timed steps, and the speed-up."""
    setup_logging()
    result = bench_step(replace(make_preset(preset, cache), seed=seed), steps=steps, warmup=warmup)
    if as_json:
        print(json.dumps(result))
        return
    out.print(f"preset {preset}: {result['preset']}", highlight=False)
    for variant in VARIANTS:
        r = result[variant]
        out.print(f"{variant:<8} {r['precision']} {r['memory_format']}: {r['step_s']:.3f} s/step "
                  f"(min {r['min_s']:.3f}, max {r['max_s']:.3f})", highlight=False)
    out.print(f"speed-up {result['speedup']:.2f}x", highlight=False)


@user_errors
def bench_ablation_cmd(
    cache: str = typer.Option(AblationSettings.cache, "--cache", help="The feature store (the demo's CPU-sized "
                              "phantom store by default)."),
    out_path: Path = typer.Option(AblationSettings.out, "--out", help="Benchmark folder: one run folder per row "
                                  "and seed, evaluation-ROW/, ablation.md, ablation.json."),
    preset: str = typer.Option(AblationSettings.preset, "--preset", help="Training preset of every row (cpu: the "
                               "demo's)."),
    rows: list[str] | None = typer.Option(None, "--row", help="These rows, in this order (repeat): "
                                          + ", ".join(ROWS) + ". Default the paper's Table 3: "
                                          + " ".join(TABLE3_ROWS) + "."),
    seeds: list[int] | None = typer.Option(None, "--seed", help="Seeds (repeat). Default 0 1 666."),
    epochs: int = typer.Option(AblationSettings.epochs, "--epochs", help="E_max of every run, the benchmark's "
                               "budget (80: where labeled-only stops improving on the CPU demo's store)."),
    width: int | None = typer.Option(None, "--width", help="VNet base width (default: the preset's)."),
    crop: str | None = typer.Option(None, "--crop", help="Training crop D x H x W (default: the preset's)."),
    targets: str = typer.Option(AblationSettings.targets, "--targets", help="Distillation targets of the rows "
                                "with FKD: hybrid, cache or online."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop every run after this many steps (smoke "
                                         "runs; the schedule still spans --epochs)."),
    figures: bool = typer.Option(AblationSettings.figures, "--figures/--no-figures", help="Draw each row's "
                                 "dice.png and qualitative.png."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars while training."),
) -> None:
    """The paper's Table 3 on a store: labeled only, consistency only, + FKD, + PIC, + PIC + FKD, all
    parts, each trained for seeds 0, 1 and 666 at one budget and evaluated on the test split.

    At one seed every row sees the same cases, crops and gamma draws, so the report gives paired
    differences per seed (against labeled-only and against the row each part is added to) beside per-class
    Dice mean ± std, and what the training logs show (EMA vs student, confident fraction, each term's
    share). Writes OUT/ablation.md and OUT/ablation.json. Rerun the same command after an interruption:
    finished runs are kept, an unfinished one resumes from its latest checkpoint.
    """
    setup_logging()
    settings = AblationSettings(cache=cache, out=out_path, preset=preset, rows=tuple(rows or TABLE3_ROWS),
                                seeds=tuple(seeds or SEEDS), epochs=epochs, width=width,
                                crop=parse_shape(crop, 3, "--crop") if crop else None, targets=targets,  # type: ignore[arg-type]
                                max_steps=max_steps,
                                figures=figures, progress=progress)
    summary = run_ablation(settings)
    table = Table(title=f"Dice (%), test split, mean ± std over seeds {' '.join(map(str, settings.seeds))}",
                  title_justify="left")
    for name in ("Row", "Avg. Dice", "Avg. ASD", *summary["class_labels"]):
        table.add_column(name, justify="left" if name == "Row" else "right", no_wrap=True)

    def f(v: float | None, d: int = 1) -> str:
        return "n/a" if v is None or v != v else f"{v:.{d}f}"

    for r in summary["rows"]:
        (md, sd), (ma, sa) = r["mean_dice"], r["mean_asd"]
        table.add_row(escape(r["label"]), f"{f(md, 2)}±{f(sd)}", f"{f(ma, 2)}±{f(sa)}",
                      *(f"{f(m)}±{f(d)}" for m, d in r["dice"]))
    Console(width=max(out.width, 60 + 13 * len(summary["class_labels"]))).print(table)
    err.print(f"{out_path}/ablation.md (training {summary['train_s'] / 60:.1f} min in all)", highlight=False,
              soft_wrap=True)


@user_errors
def bench_anatomy_cmd(
    cache: str = typer.Option(..., "--cache", help="The feature store (folder, .zip or URL); its train and test "
                              "cases need labels."),
    data: Path | None = typer.Option(None, "--data", help="The dataset folder, for a store made with --no-volumes."),
    as_json: bool = typer.Option(False, "--json", help="Print the measurement as JSON."),
) -> None:
    """How much anatomy the store's teacher tokens carry: a linear probe from each token to the majority
    class of its pixels, fitted on the train split's tokens and scored on the test split's.

    Prints the accuracy over foreground patches, the balanced accuracy (mean recall over the classes
    present), each class's recall and how often one kidney is called the other, beside the teacher's
    label. A random-init teacher's tokens only carry the patch's intensities; seconds on a CPU store.
    """
    setup_logging()
    with FeatureStore.open(cache) as store:
        result = anatomy_probe(store, data=data)
    if as_json:
        print(json.dumps(result))
        return

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    tokens, kidneys = result["tokens"], result["kidney_confusion"]
    rows = [
        ("teacher", f"{result['teacher']['source']} [{result['teacher']['label']}]"),
        ("tokens", f"train {tokens['train']} ({result['cases']['train']} cases), test {tokens['test']} "
                   f"({result['cases']['test']} cases, {tokens['test_foreground']} foreground)"),
        ("foreground accuracy", pct(result["foreground_accuracy"])),
        ("balanced accuracy", f"{pct(result['balanced_accuracy'])} over {len(result['recall'])} classes present"),
        ("recall", ", ".join(f"{name} {pct(v)}" for name, v in result["recall"].items())),
        ("kidney confusion", _kidneys(kidneys)),
    ]
    for key, value in rows:
        out.print(f"[bold]{key:<22}[/]{escape(value)}", highlight=False, soft_wrap=True)


def _kidneys(confusion: dict | None) -> str:
    """``right called left 4.0 %, left called right 2.1 %``, or why there is no figure."""
    if confusion is None:
        return "n/a (the store's classes have no right_kidney and left_kidney)"
    if confusion["right_as_left"] is None or confusion["left_as_right"] is None:
        return "n/a (no test token is mostly right or left kidney at this slice size)"
    return (f"right called left {100 * confusion['right_as_left']:.1f} %, "
            f"left called right {100 * confusion['left_as_right']:.1f} %")
