"""The ``dinomix-cache`` command line: thin typer wrappers over the Python functions of each stage.

Every verb maps its options onto a settings dataclass and calls one function; a
:class:`~dinomix_cache.errors.UserError` becomes one line on stderr and exit code 2. The verbs live
in one module per group (:mod:`~dinomix_cache.cli.extract`, :mod:`~dinomix_cache.cli.train`,
:mod:`~dinomix_cache.cli.store`, :mod:`~dinomix_cache.cli.inference`, :mod:`~dinomix_cache.cli.bench`
and :mod:`~dinomix_cache.cli.teacher`) and are registered here, in the order ``--help`` lists them.
"""

from __future__ import annotations

import typer

from dinomix_cache.cli import bench, extract, inference, store, teacher, train

__all__ = ["app", "bench_app", "main"]

app = typer.Typer(
    help="DINO-Mix 3D CT segmentation with a shareable DINOv3 feature store.\n\n"
    "Stage one: `extract` runs a frozen teacher once over every axial slice into a Zarr store. "
    "Inspect it with `info`, check it with `verify`; `train-teacher` trains a small anatomy-aware teacher on the "
    "dataset's labels where no pretrained one can be had. Stage two: `train` the student from the store, "
    "`evaluate` it on the test split, `predict` any CT. `bench` measures speed and what the teacher's tokens know.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal's width
)
bench_app = typer.Typer(help="Measured speed (see the README's performance section), and the anatomy a store's "
                        "teacher tokens carry.", no_args_is_help=True,
                        rich_markup_mode="markdown")
app.add_typer(bench_app, name="bench")


app.command()(extract.extract)
app.command("train-teacher")(teacher.train_teacher)
app.command()(train.train)
app.command()(store.info)
app.command()(store.verify)
app.command()(store.pack)
app.command()(inference.evaluate)
app.command()(inference.predict)
bench_app.command("extract")(bench.bench_extract_cmd)
bench_app.command("targets")(bench.bench_targets_cmd)
bench_app.command("step")(bench.bench_step_cmd)
bench_app.command("ablation")(bench.bench_ablation_cmd)
bench_app.command("anatomy")(bench.bench_anatomy_cmd)


def main() -> None:
    """Console-script entry point."""
    app()
