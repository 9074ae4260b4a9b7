"""The ``dinomix-cache`` command line: thin typer wrappers over the Python functions of each stage.

Every verb maps its options onto a settings dataclass and calls one function; a
:class:`~dinomix_cache.errors.UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from dinomix_cache.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])
err = Console(stderr=True)
out = Console()

app = typer.Typer(
    help="DINO-Mix 3D CT segmentation with a shareable DINOv3 feature store.\n\n"
    "Stage one: `extract` runs a frozen teacher once over every axial slice into a Zarr store. "
    "Inspect it with `info`, check it with `verify`. Stage two: `train` the student from the store, "
    "`evaluate` it on the test split, `predict` any CT. `bench` measures speed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal's width
)
bench_app = typer.Typer(help="Measured speed (see the README's performance section).", no_args_is_help=True,
                        rich_markup_mode="markdown")
app.add_typer(bench_app, name="bench")


def user_errors(fn: F) -> F:
    """Turn a UserError into one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            one_line = " ".join(str(exc).split())
            err.print(f"[red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="dinomix-cache: %(message)s", force=True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def parse_shape(text: str, dims: int, what: str) -> tuple[int, ...]:
    """``"80x160x160"`` → (80, 160, 160); a single number repeats (``"160"`` → (160, 160))."""
    try:
        values = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise UserError(f"{what} {text!r}: expected {dims} integers like {'x'.join(['160'] * dims)}") from None
    if len(values) == 1:
        values = values * dims
    if len(values) != dims or min(values) < 1:
        raise UserError(f"{what} {text!r}: expected {dims} positive integers like {'x'.join(['160'] * dims)}")
    return values


# ------------------------------------------------------------------------------------ extract
DatasetOpt = typer.Option("phantom", "--dataset", help="phantom (built-in, offline), synapse, amos or msd.")
DataOpt = typer.Option(None, "--data", help="Dataset root. Default data/DATASET; the phantom is generated "
                       "there on first use.")
TeacherOpt = typer.Option(
    "facebook/dinov3-vits16-pretrain-lvd1689m", "--teacher",
    help="Hugging Face hub id or local directory of a vision transformer (DINOv3, DINOv2, CLIP, SigLIP/SigLIP2, ViT, "
    "MAE ViT), "
    "or random:NAME for a random-init DINOv3 (labelled 'random, not pretrained'): tiny, vits16, vitb16, vitl16 "
    "(blind to context: for speed) or ctx-tiny, ctx-vits16 (context-sensitive like a trained ViT: for fidelity).")
LabeledOpt = typer.Option(None, "--labeled", help="Labeled share: synapse 10p|20p|40p (default 20p), "
                          "amos 2p|5p|10p (default 5p), msd/phantom any Np.")
SplitDirOpt = typer.Option(None, "--split-dir", help="Folder of split lists overriding the shipped ones.")
SeedOpt = typer.Option(0, "--split-seed", help="Seed of generated splits (msd, phantom with few cases).")
ShapeOpt = typer.Option("80x160x160", "--target-shape", help="Volume shape D x H x W after preprocessing.")
InputOpt = typer.Option(None, "--input-size", help="Teacher input per slice, H x W pixels (multiple of the "
                        "patch size). Default: the slice size.")
DtypeOpt = typer.Option("float32", "--dtype", help="Teacher dtype: float32, bfloat16 or float16.")
DeviceOpt = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
BatchOpt = typer.Option(32, "--batch-size", help="Slices per teacher forward (batches span cases).")
ReadThreadsOpt = typer.Option(2, "--read-threads", help="In-process: threads reading and preprocessing the next "
                              "cases while the teacher runs.")
PhantomCasesOpt = typer.Option(None, "--phantom-cases", help="Phantom: number of cases (default the 30 "
                               "Synapse ids, so the shipped Synapse splits apply).")
PhantomMatrixOpt = typer.Option(512, "--phantom-matrix", help="Phantom: in-plane voxels per side.")


def _given(**values: Any) -> dict[str, Any]:
    """The options that were given (not None), so the settings dataclasses keep their own defaults."""
    return {k: v for k, v in values.items() if v is not None}


def build_extract_settings(
    *, dataset: str, teacher: str, target_shape: str, data: Path | None = None, out_path: Path | None = None,
    revision: str | None = None, input_size: str | None = None, dtype: str | None = None,
    device: str | None = None, labeled: str | None = None, split_dir: Path | None = None,
    split_seed: int | None = None, batch_size: int | None = None, workers: int | None = None,
    scheduler: str | None = None, read_threads: int | None = None, cases: list[str] | None = None,
    overwrite: bool = False, volumes: bool | None = None,
    compression: str | None = None, keepbits: int | None = None, chunk_slices: int | None = None,
    phantom_cases: int | None = None, phantom_matrix: int | None = None, progress: bool = True,
    crop_windows: str | None = None,
) -> Any:
    """Map CLI options onto :class:`~stage1_extract.settings.ExtractSettings`; options left None
    take the dataclasses' defaults."""
    from dinomix_cache.classes import SYNAPSE_CASE_IDS
    from dinomix_cache.datasets import SplitSettings
    from dinomix_cache.phantom import PhantomSettings
    from dinomix_cache.preprocess import PreprocessSettings
    from dinomix_cache.store import StoreSettings
    from dinomix_cache.teacher import TeacherSettings
    from stage1_extract.settings import ExtractSettings

    phantom_ids = SYNAPSE_CASE_IDS if phantom_cases is None else tuple(f"{i:04d}" for i in range(1, phantom_cases + 1))
    return ExtractSettings(
        dataset=dataset, data=data, out=out_path,
        split=SplitSettings(**_given(labeled=labeled, split_dir=split_dir, seed=split_seed)),
        preprocess=PreprocessSettings(target_shape=parse_shape(target_shape, 3, "--target-shape")),
        teacher=TeacherSettings(source=teacher, **_given(revision=revision, dtype=dtype, device=device),
                                input_size=parse_shape(input_size, 2, "--input-size") if input_size else None),
        storage=StoreSettings(**_given(compression=compression, keepbits=keepbits, chunk_slices=chunk_slices,
                                       volumes=volumes)),
        phantom=PhantomSettings(case_ids=phantom_ids, **_given(matrix=phantom_matrix)),
        cases=tuple(cases) if cases else None, overwrite=overwrite, progress=progress,
        crop_windows=parse_shape(crop_windows, 2, "--crop-windows") if crop_windows else None,
        **_given(batch_size=batch_size, workers=workers, scheduler=scheduler, read_threads=read_threads),
    )


@app.command()
@user_errors
def extract(
    dataset: str = DatasetOpt,
    data: Path | None = DataOpt,
    out_path: Path | None = typer.Option(None, "--out", help="Store path. Default storage/DATASET.zarr."),
    teacher: str = TeacherOpt,
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    input_size: str | None = InputOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    labeled: str | None = LabeledOpt,
    split_dir: Path | None = SplitDirOpt,
    split_seed: int = SeedOpt,
    target_shape: str = ShapeOpt,
    batch_size: int = BatchOpt,
    workers: int = typer.Option(
        0, "--workers", help="0: extract in this process. N: start a local dask cluster of N worker processes, "
        "one case per task (each process gets 1/N of the cores; with a CUDA teacher, the GPUs). The store is "
        "the same, bit for bit (checked on CPU). On a CPU, one worker per core works best."),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Use a running dask cluster instead, e.g. tcp://head:8786. Its workers must "
        "see --data, --out and the teacher at the same paths; start them with --nthreads 1, and with "
        "--resources GPU=1 (one worker per GPU) for a CUDA teacher. Excludes --workers."),
    read_threads: int = ReadThreadsOpt,
    cases: list[str] | None = typer.Option(None, "--cases", help="Only these case ids (repeat the option)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete and rebuild an existing store."),
    volumes: bool = typer.Option(True, "--volumes/--no-volumes", help="Also store the preprocessed image and "
                                 "label volumes (training then needs nothing else)."),
    compression: str = typer.Option(
        "lossless", "--compression",
        help="lossless (Blosc, exact; float16 features barely compress, CT volumes ≈3.4×), "
        "lossy (features rounded to --keepbits mantissa bits, then zstd: relative error ≤ 2^-(keepbits+1), "
        "measured max 0.39 % at keepbits 7) or none."),
    keepbits: int = typer.Option(7, "--keepbits", help="Mantissa bits kept by --compression lossy (1..9)."),
    chunk_slices: int = typer.Option(16, "--chunk-slices", help="Slices per stored chunk (a 64-slice crop reads 4-5)."),
    crop_windows: str | None = typer.Option(
        None, "--crop-windows", help="Also store the teacher's tokens of every HxW window on the token grid "
        "(e.g. 128x128, the training crop's in-plane size: 3x3 windows a 160-pixel slice), for training in the "
        "crop teacher view (train --teacher-view crop), where the teacher sees the crop as in the paper. "
        "About 6x the feature bytes."),
    phantom_cases: int | None = PhantomCasesOpt,
    phantom_matrix: int = PhantomMatrixOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Run the frozen teacher once over every axial slice and write the feature store.

    Resumes by default: complete cases are skipped, so an interrupted run is simply rerun.
    Refuses to append to a store made with another teacher, input size or preprocessing
    (--overwrite rebuilds it). Works offline on --dataset phantom with --teacher random:tiny.
    Scale out with --workers N (local processes) or --scheduler ADDRESS (a dask cluster).
    """
    _setup_logging()
    from stage1_extract.runner import run_extraction

    settings = build_extract_settings(
        dataset=dataset, data=data, out_path=out_path, teacher=teacher, revision=revision, input_size=input_size,
        dtype=dtype, device=device, labeled=labeled, split_dir=split_dir, split_seed=split_seed,
        target_shape=target_shape, batch_size=batch_size, workers=workers, scheduler=scheduler,
        read_threads=read_threads, cases=cases, overwrite=overwrite, volumes=volumes, compression=compression,
        keepbits=keepbits, chunk_slices=chunk_slices, phantom_cases=phantom_cases, phantom_matrix=phantom_matrix,
        progress=progress, crop_windows=crop_windows)
    report = run_extraction(settings)
    state = "complete" if report.complete else "incomplete (some cases not extracted yet)"
    rate = f", {report.slices_per_s:.1f} slices/s" if report.slices else ""
    err.print(f"store {report.store}: {len(report.computed)} case(s) extracted, {len(report.skipped)} already "
              f"complete{rate}; store {state}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------ train
@app.command()
@user_errors
def train(
    cache: str | None = typer.Option(None, "--cache", help="The feature store to train from: a .zarr folder, a .zip "
                                     "made by pack, or a URL (https://, s3://, ...) (on --resume: only if it moved; "
                                     "it must be the same store)."),
    out_path: Path | None = typer.Option(None, "--out", help="Run folder. Default runs/STORE-TARGETS-seedSEED."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder, only for a store made with --no-volumes "
                                     "(volumes are rebuilt from the recorded source files)."),
    preset: str = typer.Option("paper", "--preset", help="paper (the paper's settings), cpu (width 8, 48x64x64 "
                               "crops, instance norm, lr 0.5, 30 epochs: the demo's, for a store made with "
                               "--target-shape 48x96x96) or cpu-small (width 4, 32x64x64 crops, 30 epochs)."),
    targets: str = typer.Option("hybrid", "--targets", help="Distillation targets: hybrid (cache, teacher only for "
                                "mixed or flipped slices), cache (no teacher at all) or online (teacher always)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw and of the initialisation."),
    epochs: int | None = typer.Option(None, "--epochs", help="E_max (an epoch = one pass over the unlabeled cases). "
                                      "On --resume, a larger value trains longer with the schedule stretched."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue a run folder from its latest checkpoint."),
    width: int | None = typer.Option(None, "--width", help="VNet base width (preset: 32 paper, 8 cpu, 4 cpu-small)."),
    crop: str | None = typer.Option(None, "--crop", help="Training crop D x H x W (multiples of 16)."),
    tau: float | None = typer.Option(None, "--tau", help="Pseudo-label confidence threshold (default 0.95)."),
    lr: float | None = typer.Option(None, "--lr", help="Initial SGD learning rate (preset: 0.1 paper, 0.5 cpu)."),
    normalization: str | None = typer.Option(None, "--normalization", help="VNet normalisation: batch (BatchNorm, "
                                             "DHC's; preset paper) or instance (InstanceNorm; preset cpu)."),
    teacher_view: str = typer.Option(
        "slice", "--teacher-view", help="What the teacher sees of each training crop. slice (default): the whole "
        "slice, as in extract, with the PIC box pasted into it; cached targets are then exactly the teacher's for "
        "any crop. crop: the crop itself, as the paper's training loop does; cached targets then need a store made "
        "with extract --crop-windows HxW (the crop's in-plane size). Recorded in the run's settings."),
    crop_grid: str | None = typer.Option(None, "--crop-grid", help="In-plane crop offsets: voxel (any offset, DHC's "
                                         "RandomCrop; the slice view's default) or token (on the store's token grid; "
                                         "the crop view's default, where its crop windows lie)."),
    no_fkd: bool = typer.Option(False, "--no-fkd", help="Ablation: no foundation-feature distillation."),
    no_pic: bool = typer.Option(False, "--no-pic", help="Ablation: no PIC mixing (unlabeled crops stay as they are)."),
    no_aux: bool = typer.Option(False, "--no-aux", help="Ablation: no auxiliary balanced head losses."),
    pic_eta: float | None = typer.Option(None, "--pic-eta", help="PIC eta (2/3; 0 = uniform, inf = balanced)."),
    pic_gamma: float | None = typer.Option(None, "--pic-gamma", help="PIC gamma of P_bal ∝ I_c^gamma (1.0)."),
    labeled_only: bool = typer.Option(False, "--labeled-only", help="Baseline: supervised on the labeled cases only."),
    flip: bool = typer.Option(False, "--flip", help="Random flips of the weak view (forces teacher recomputes)."),
    aux_mode: str = typer.Option("exclude", "--aux-mode", help="exclude (true masking) or skcdf (SKCDF's multiply)."),
    precision: str = typer.Option("auto", "--precision", help="Student forwards: auto (bf16 autocast on a GPU or "
                                  "a CPU with native bf16, AVX512-BF16 or AMX; float32 elsewhere), float32 or "
                                  "bfloat16. Recorded resolved in settings.json; losses stay float32."),
    memory_format: str = typer.Option("auto", "--memory-format", help="auto (channels-last on a CPU, except bf16 on "
                                      "an AMX CPU), contiguous or channels_last. Recorded resolved."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many iterations in total."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train the DINO-Mix student from a feature store (the teacher only where targets need it).

    N GPUs (or CPU processes): torchrun --standalone --nproc-per-node N -m dinomix_cache train ...

    Each process trains on its own 2 labeled + 2 unlabeled crops a step:
    the effective batch is N x (2 + 2), an epoch has 1/N as many steps,
    and the learning rate is not scaled. Rank 0 writes the run folder;
    resume with the same N (--resume RUN under the same torchrun command).
    """
    _setup_logging()
    from dataclasses import replace

    from stage2_train.settings import preset as make_preset
    from stage2_train.train import train as run_training

    def done(run: Path) -> None:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once (rank 0 wrote the folder)
            err.print(f"run {run}: progress.png, log.jsonl, latest.pt and best.pt", highlight=False, soft_wrap=True)

    if resume is not None:
        done(run_training(None, resume=resume, max_steps=max_steps, epochs=epochs, cache=cache, progress=progress))
        return
    if cache is None:
        raise UserError("pass --cache STORE (a store made by extract), or --resume RUN")
    try:
        settings = make_preset(preset, cache)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    pic = replace(settings.pic, enabled=not no_pic, **({"eta": pic_eta} if pic_eta is not None else {}),
                  **({"gamma": pic_gamma} if pic_gamma is not None else {}))
    changes: dict = {"out": out_path, "data": data, "targets": targets, "seed": seed, "fkd": not no_fkd,
                     "aux": not no_aux, "labeled_only": labeled_only, "flip": flip, "aux_mode": aux_mode,
                     "pic": pic, "teacher_view": teacher_view, "crop_grid": crop_grid, "precision": precision,
                     "memory_format": memory_format}
    for key, value in (("epochs", epochs), ("width", width), ("tau", tau), ("lr", lr),
                       ("normalization", normalization)):
        if value is not None:
            changes[key] = value
    if crop:
        changes["crop"] = parse_shape(crop, 3, "--crop")
    if targets not in ("online", "cache", "hybrid"):
        raise UserError(f"--targets {targets}: choose online, cache or hybrid")
    done(run_training(replace(settings, **changes), max_steps=max_steps, progress=progress))


# ------------------------------------------------------------------------------------ info / verify
@app.command()
@user_errors
def info(
    store: str = typer.Argument(..., help="A feature store: a .zarr folder, a .zip made by pack, or a URL "
                                "(https://, s3://, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show a store's teacher, preprocessing, dataset, cases by role, shapes and sizes."""
    from dinomix_cache.inspection import store_info

    summary = store_info(store)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    t, p, d, b = summary["teacher"], summary["preprocessing"], summary["dataset"], summary["bytes"]
    per_slice = summary["feature_bytes_per_slice"]
    windows = f"crop windows {b['windows'] / 1e6:.2f} MB, " if b.get("windows") else ""
    rows = [
        ("store", f"{summary['path']} ({summary['format']})"),
        ("teacher", f"{t['source']} [{t['label']}] {t['family']}, hidden {t['hidden_size']}, patch "
                    f"{t['patch_size']}, input {t['input_size'][0]}x{t['input_size'][1]}, {t['dtype']}"),
        ("weights sha256", str(t.get("weights_sha256"))),
        ("preprocessing", f"orientation {p.get('orientation')}, HU {p.get('hu_window')}, {p.get('normalisation')}, "
                          f"resized to {'x'.join(str(v) for v in p['target_shape'])}"),
        ("dataset", f"{d['name']}, {len(d['class_names'])} classes, split {_split_summary(d.get('split', {}))}"),
        ("cases complete/all", ", ".join(f"{r} {v['complete']}/{v['cases']}"
                                         for r, v in summary["cases_by_role"].items())),
        ("feature shape", "; ".join("x".join(str(v) for v in s) for s in summary["feature_shapes"]) or "-"),
        ("bytes on disk", summary["bytes_note"] or f"{b['total'] / 1e6:.2f} MB (features {b['features'] / 1e6:.2f} "
                          f"MB, {windows}volumes {b['volumes'] / 1e6:.2f} MB)"),
        ("feature bytes per slice", f"{per_slice / 1e3:.1f} kB" if per_slice else "-"),
        ("teacher views", _views_summary(summary)),
        ("compression", summary["storage"]["compression"]),
        ("incomplete cases", " ".join(summary["incomplete_cases"]) or "none"),
        ("extraction", "complete" if summary["extraction_complete"] else "not finished: rerun extract"),
    ]
    for key, value in rows:
        out.print(f"[bold]{key:<24}[/]{escape(value)}", highlight=False, soft_wrap=True)


def _views_summary(summary: dict) -> str:
    """``slice`` or ``slice, crop (windows 128x128, 3x3 a slice, 57.3 kB a slice)``."""
    windows = summary.get("crop_windows")
    if not windows:
        return "slice (no crop windows: the crop view needs --targets online)"
    per_slice = summary.get("window_bytes_per_slice")
    size = f", {per_slice / 1e3:.1f} kB a slice" if per_slice else ""
    return (f"slice, crop (windows {windows['size'][0]}x{windows['size'][1]}, "
            f"{windows['positions'][0]}x{windows['positions'][1]} a slice{size})")


def _split_summary(split: dict) -> str:
    """``shipped:synapse 20p`` or ``seeded (seed 0) 20p``; hashes and counts stay in ``info --json``."""
    source = split.get("source", "?")
    if source == "seeded":
        source = f"seeded (seed {split.get('seed')})"
    return f"{source} {split.get('labeled') or ''}".strip()


@app.command()
@user_errors
def verify(
    store: str = typer.Argument(..., help="A feature store: a .zarr folder, a .zip made by pack, or a URL "
                                "(https://, s3://, ...)."),
    data: Path | None = typer.Option(None, "--data", help="The dataset root the store was made from: "
                                     "re-hash every source file against the recorded sha256."),
) -> None:
    """Re-read every chunk; check shapes, completeness, statistics and (with --data) source hashes.

    Exit code 0 when sound, 1 with a list of problems.
    """
    from dinomix_cache.inspection import verify_store

    problems = verify_store(store, data)
    if problems:
        for line in problems:
            err.print(f"[red]✗[/] {escape(line)}", highlight=False, soft_wrap=True)
        err.print(f"{store}: {len(problems)} problem(s)", highlight=False)
        raise typer.Exit(1)
    out.print(f"{store}: OK (every chunk read, shapes and statistics consistent"
              f"{', sources match' if data else ''})", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def pack(
    store: str = typer.Argument(..., help="A complete feature store: a .zarr folder, a .zip or a URL."),
    out_path: Path = typer.Argument(..., help="The zip file to write (OUT.zip)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT.zip."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Write a complete store into one .zip file, to hand over or serve as a single file.

    Chunks are stored as they are (no second compression); metadata is consolidated into the root
    zarr.json, so readers open any case without further requests. train, evaluate, info and verify
    take the zip wherever they take a store; zarr reads it with zarr.storage.ZipStore. Refuses an
    incomplete store; written to a temporary file, then renamed.
    """
    from dinomix_cache.pack import pack_store

    written = pack_store(store, out_path, overwrite=overwrite, progress=progress)
    out.print(f"{written}: {written.stat().st_size / 1e6:.2f} MB", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------ bench
@bench_app.command("extract")
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
    _setup_logging()
    from stage1_extract.bench import bench_extract

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


@bench_app.command("targets")
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
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled batches (the same for every policy)."),
    teacher_view: str = typer.Option("slice", "--teacher-view", help="slice or crop (see train); crop needs a "
                                     "store made with --crop-windows for cache and hybrid."),
    crop_grid: str | None = typer.Option(None, "--crop-grid", help="In-plane crop offsets: voxel or token (see "
                                         "train; default: the view's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the measurement as JSON."),
) -> None:
    """Step time of no distillation and of each target policy, in one teacher view; cosine of each
    policy's targets to online's (the view's reference) on the same batches (student cells), the
    fraction of slices recomputed, the cross-view cosine (slice-view against crop-view references on
    the same batches: how much the definition matters for this teacher) and the teacher's context
    cosine (1.0 = blind to context: then every fidelity figure is 1.0 whatever the code does)."""
    _setup_logging()
    from dataclasses import replace

    from stage2_train.bench import bench_targets
    from stage2_train.settings import preset as make_preset

    try:
        settings = replace(make_preset(preset, cache), seed=seed, teacher_view=teacher_view, crop_grid=crop_grid,
                           **({"crop": parse_shape(crop, 3, "--crop")} if crop else {}))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result = bench_targets(settings, steps=steps, warmup=warmup)
    if as_json:
        print(json.dumps(result))
    else:
        for mode, entry in result.items():
            text = "  ".join(f"{k} {v}" for k, v in entry.items()) if isinstance(entry, dict) else str(entry)
            out.print(f"{mode:<14}{text}", highlight=False)


@bench_app.command("step")
@user_errors
def bench_step_cmd(
    cache: str = typer.Option(..., "--cache", help="The feature store (its volumes must hold the preset's crop)."),
    preset: str = typer.Option("cpu", "--preset", help="Training settings: paper, cpu or cpu-small."),
    steps: int = typer.Option(5, "--steps", help="Timed iterations per variant, interleaved (after the warm-up)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed rounds of both variants first."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled batches (the same for both variants)."),
    as_json: bool = typer.Option(False, "--json", help="Print the measurement as JSON."),
) -> None:
    """Step time of a preset in float32 with contiguous tensors against the precision and memory format
    train resolves on this machine (--precision auto, --memory-format auto), stepped alternately on the
    same batches: median, min and max of the timed steps, and the speed-up."""
    _setup_logging()
    from stage2_train.bench_step import bench_step
    from stage2_train.settings import preset as make_preset

    try:
        settings = replace(make_preset(preset, cache), seed=seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result = bench_step(settings, steps=steps, warmup=warmup)
    if as_json:
        print(json.dumps(result))
        return
    out.print(f"preset {preset}: {result['preset']}", highlight=False)
    for variant in ("float32", "auto"):
        r = result[variant]
        out.print(f"{variant:<8} {r['precision']} {r['memory_format']}: {r['step_s']:.3f} s/step "
                  f"(min {r['min_s']:.3f}, max {r['max_s']:.3f})", highlight=False)
    out.print(f"speed-up {result['speedup']:.2f}x", highlight=False)


@bench_app.command("ablation")
@user_errors
def bench_ablation_cmd(
    cache: str = typer.Option("storage/phantom-cpu.zarr", "--cache", help="The feature store (the demo's CPU-sized "
                              "phantom store by default)."),
    out_path: Path = typer.Option(Path("runs/ablation"), "--out", help="Benchmark folder: one run folder per row "
                                  "and seed, evaluation-ROW/, ablation.md, ablation.json."),
    preset: str = typer.Option("cpu", "--preset", help="Training preset of every row (cpu: the demo's)."),
    rows: list[str] | None = typer.Option(None, "--row", help="Only these rows (repeat): labeled-only, consistency, "
                                          "pic, pic-fkd, dino-mix. Default all five."),
    seeds: list[int] | None = typer.Option(None, "--seed", help="Seeds (repeat). Default 0 1 666."),
    epochs: int | None = typer.Option(None, "--epochs", help="E_max of every run (default: the preset's)."),
    width: int | None = typer.Option(None, "--width", help="VNet base width (default: the preset's)."),
    crop: str | None = typer.Option(None, "--crop", help="Training crop D x H x W (default: the preset's)."),
    targets: str = typer.Option("hybrid", "--targets", help="Distillation targets of the rows with FKD: hybrid, "
                                "cache or online."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop every run after this many steps (smoke "
                                         "runs; the schedule still spans --epochs)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw each row's dice.png and qualitative.png."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars while training."),
) -> None:
    """The paper's Table 3 on a store: labeled only, consistency only, + PIC, + PIC + FKD, all parts,
    each trained for seeds 0, 1 and 666 at one budget and evaluated on the test split.

    Prints per-class Dice mean ± std over the seeds and writes OUT/ablation.md. Rerun the same command
    after an interruption: finished runs are kept, an unfinished one resumes from its latest checkpoint.
    """
    _setup_logging()
    from rich.table import Table

    from stage2_train.ablation import ROWS, SEEDS, AblationSettings, run_ablation

    if targets not in ("online", "cache", "hybrid"):
        raise UserError(f"--targets {targets}: choose online, cache or hybrid")
    settings = AblationSettings(cache=cache, out=out_path, preset=preset, rows=tuple(rows or ROWS),
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


def main() -> None:
    """Console-script entry point."""
    app()


# Registers `evaluate` and `predict` on the app; last, because that module imports the helpers above.
from dinomix_cache import cli_inference  # noqa: E402, F401
