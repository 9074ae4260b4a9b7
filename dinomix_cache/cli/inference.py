"""The ``evaluate`` and ``predict`` verbs: a run folder's student on a split, or on any CT."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dinomix_cache.cli.common import err, out, parse_shape, setup_logging, shape_text, user_errors
from dinomix_cache.errors import UserError
from stage2_train.evaluate.evaluation import EvaluateSettings
from stage2_train.evaluate.evaluation import evaluate as run_evaluation
from stage2_train.evaluate.inference import InferenceSettings, load_run_model
from stage2_train.evaluate.predict import predict_paths

StrideOpt = typer.Option(shape_text(InferenceSettings.stride), "--stride",
                         help="Sliding-window stride D x H x W in voxels (the peers' "
                         "16 slices x 32 x 32).")
CheckpointOpt = typer.Option(InferenceSettings.checkpoint, "--checkpoint",
                             help="best (best validation Dice, the peers' choice) or latest.")
BatchOpt = typer.Option(InferenceSettings.sw_batch_size, "--sw-batch-size",
                        help="Windows per forward pass (more is faster on a GPU).")


@user_errors
def evaluate(
    run: list[Path] = typer.Option(..., "--run", help="A run folder; repeat for several seeds (mean ± std)."),
    split: str = typer.Option(EvaluateSettings.split, "--split", help="test (default) or eval."),
    out_path: Path | None = typer.Option(None, "--out", help="Evaluation folder. Default RUN/evaluation-SPLIT "
                                         "(several runs: their parent folder/evaluation-SPLIT)."),
    cache: str | None = typer.Option(None, "--cache", help="The run's store (folder, .zip or URL), if it moved since "
                                     "training."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder: rebuilds the volumes if the store is "
                                     "gone, and finds the original labels for ASD in mm."),
    checkpoint: str = CheckpointOpt,
    stride: str = StrideOpt,
    sw_batch_size: int = BatchOpt,
    convention: str = typer.Option(EvaluateSettings.convention, "--convention",
                                   help="Absent classes: dhc (the paper's rules: Dice 0 / "
                                   "ASD 128 if in one only, Dice 1 / ASD 0 if in neither) or strict (left out)."),
    mm: bool = typer.Option(EvaluateSettings.mm, "--mm/--no-mm", help="Also ASD in mm in the original geometry."),
    figures: bool = typer.Option(EvaluateSettings.figures, "--figures/--no-figures",
                                 help="Draw dice.png and qualitative.png."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Per-class Dice (%) and ASD (voxels) on the test split, in the layout of the paper's Tables 1-2.

    Writes results.json, cases.csv, results.md, dice.png and qualitative.png, and prints the table.
    """
    setup_logging()

    settings = EvaluateSettings(runs=tuple(run), split=split, out=out_path, cache=cache, data=data,
                                checkpoint=checkpoint, stride=parse_shape(stride, 3, "--stride"),  # type: ignore[arg-type]
                                sw_batch_size=sw_batch_size, convention=convention, mm=mm, figures=figures,
                                progress=progress).resolved()
    result = run_evaluation(settings)
    table = results_table(result)
    # The paper's layout is 16 columns wide: never squeeze it into a narrow pipe's default 80.
    per_class = 13 if result["over_runs"] is not None else 8  # "62.4±7.1" cells vs "62.4"
    Console(width=max(out.width, 48 + per_class * len(result["class_labels"]))).print(table)
    err.print(f"results in {settings.out}: results.md, results.json, cases.csv"
              + (", dice.png, qualitative.png" if figures else ""), highlight=False, soft_wrap=True)


def results_table(result: dict) -> Table:
    """The paper's layout as a rich table: run rows (and mean ± std), Avg. Dice, Avg. ASD, per-class Dice."""
    table = Table(title=f"Dice (%) and ASD (voxels), {result['settings']['split']} split", title_justify="left")
    for name in ("Run", "Avg. Dice", "Avg. ASD", *result["class_labels"]):
        table.add_column(name, justify="left" if name == "Run" else "right", no_wrap=True)

    def f(v: float | None, d: int = 1) -> str:
        return "n/a" if v is None or v != v else f"{v:.{d}f}"

    for r in result["runs"]:
        s = r["summary"]
        table.add_row(escape(Path(r["run"]).name), f(s["mean_dice"], 2), f(s["mean_asd"], 2),
                      *(f(v) for v in s["dice"]))
    over = result["over_runs"]
    if over is not None:
        (md, sd), (ma, sa) = over["mean_dice"], over["mean_asd"]
        table.add_row(f"mean ± std ({len(result['runs'])})", f"{f(md, 2)}±{f(sd)}", f"{f(ma, 2)}±{f(sa)}",
                      *(f"{f(m)}±{f(s)}" for m, s in zip(over["dice_mean"], over["dice_std"], strict=True)))
    return table


@user_errors
def predict(
    run: Path = typer.Option(..., "--run", help="The run folder whose student segments."),
    input_path: Path = typer.Option(..., "--input", help="A CT as .nii/.nii.gz, or a folder of them."),
    output: Path = typer.Option(..., "--output", help="Label file (for one input) or folder (for a folder); "
                                "missing folders are created."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    checkpoint: str = CheckpointOpt,
    stride: str = StrideOpt,
    sw_batch_size: int = BatchOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar per case."),
) -> None:
    """Segment any CT with a trained run; the labels overlay the input in any viewer.

    The CT is preprocessed exactly as the run's store recorded; the labels are mapped back to the
    input's own grid and orientation and written as uint8 NIfTI with its affine and header.
    """
    setup_logging()

    if not input_path.exists():
        raise UserError(f"{input_path} does not exist: pass a .nii/.nii.gz file or a folder of them")
    inference = InferenceSettings(stride=parse_shape(stride, 3, "--stride"),  # type: ignore[arg-type]
                                  sw_batch_size=sw_batch_size, checkpoint=checkpoint)
    model = load_run_model(run, checkpoint)
    written = predict_paths(input_path, output, model.preprocess, model.num_classes,
                            lambda image: model.segment(image, inference), overwrite=overwrite, progress=progress)
    for path in written:
        out.print(escape(str(path)), highlight=False, soft_wrap=True)
