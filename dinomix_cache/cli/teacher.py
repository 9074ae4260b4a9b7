"""The ``train-teacher`` verb: CLI options mapped onto
:class:`~dinomix_cache.teacher.anatomy_settings.AnatomyTeacherSettings`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from dinomix_cache.cli.common import err, given, parse_shape, setup_logging, user_errors
from dinomix_cache.cli.extract import (
    DataOpt,
    DatasetOpt,
    LabeledOpt,
    PhantomCasesOpt,
    PhantomMatrixOpt,
    SeedOpt,
    ShapeOpt,
    SplitDirOpt,
)
from dinomix_cache.data.classes import SYNAPSE_CASE_IDS
from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.data.roles import SplitSettings
from dinomix_cache.phantom.generate import PhantomSettings
from dinomix_cache.teacher.anatomy_settings import AnatomyTeacherSettings
from dinomix_cache.teacher.anatomy_training import train_anatomy_teacher

_DEFAULTS = AnatomyTeacherSettings()


@user_errors
def train_teacher(
    dataset: str = DatasetOpt,
    data: Path | None = DataOpt,
    out_path: Path | None = typer.Option(None, "--out", help="Teacher folder to write. Default "
                                         "storage/teachers/DATASET-vit."),
    labels: str = typer.Option(_DEFAULTS.labels, "--labels", help="labeled: the labeled split's labels only (a fair "
                               "teacher for semi-supervised comparisons). train: every training case's labels, the "
                               "unlabeled cases' too: an ORACLE for them, labelled so in the store, info and "
                               "evaluations. Eval and test cases are never used."),
    target_shape: str = ShapeOpt,
    input_size: str | None = typer.Option(None, "--input-size", help="Teacher input per slice, H x W pixels "
                                          "(multiple of 16). Default: the slice size, as extract's default."),
    labeled: str | None = LabeledOpt,
    split_dir: Path | None = SplitDirOpt,
    split_seed: int = SeedOpt,
    steps: int = typer.Option(_DEFAULTS.steps, "--steps", help="Training steps."),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, "--batch-size", help="Slices per step."),
    lr: float = typer.Option(_DEFAULTS.lr, "--lr", help="Peak AdamW learning rate."),
    seed: int = typer.Option(_DEFAULTS.seed, "--seed", help="Seed of the weights, batches and augmentation."),
    threads: int = typer.Option(_DEFAULTS.threads, "--threads", help="CPU threads; the same seed and threads give "
                                "the same weights on one machine."),
    phantom_cases: int | None = PhantomCasesOpt,
    phantom_matrix: int = PhantomMatrixOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a teacher folder made by train-teacher."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a small DINOv3 ViT on the dataset's labels so that its patch tokens carry anatomy, and write
    it as a teacher folder for `extract --teacher FOLDER`.

    What it is for: on the phantom no offline teacher knows anatomy (random:NAME teachers are random
    weights), so the distillation term of DINO-Mix has nothing to distil; this teacher gives it something.
    Each patch token learns the class histogram of its 16x16 pixels from slices preprocessed and fed as
    extract feeds them, with random gamma, contrast and shifts. A few minutes on 2 CPU cores at 48x96x96.

    What it is not: a pretrained DINOv3, nor a stand-in for one in reported results. It learnt from the
    labels it was given, and says so: its folder's dinomix_teacher.json names the cases, the label
    source and whether it is an oracle (--labels train), and that label follows it into the store,
    `info` and evaluations. Run `bench anatomy` on a store to see how much anatomy its tokens carry.
    """
    setup_logging()
    phantom_ids = SYNAPSE_CASE_IDS if phantom_cases is None else tuple(f"{i:04d}" for i in range(1, phantom_cases + 1))
    settings = AnatomyTeacherSettings(
        dataset=dataset, data=data, out=out_path, labels=labels,  # type: ignore[arg-type]
        split=SplitSettings(**given(labeled=labeled, split_dir=split_dir, seed=split_seed)),
        preprocess=PreprocessSettings(target_shape=parse_shape(target_shape, 3, "--target-shape")),
        phantom=PhantomSettings(case_ids=phantom_ids, matrix=phantom_matrix),
        input_size=parse_shape(input_size, 2, "--input-size") if input_size else None,  # type: ignore[arg-type]
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads, overwrite=overwrite,
        progress=progress)
    report = train_anatomy_teacher(settings)
    err.print(escape(report.summary()), highlight=False, soft_wrap=True)
