"""The ``extract`` verb: CLI options mapped onto :class:`~stage1_extract.settings.ExtractSettings`."""

from __future__ import annotations

from pathlib import Path

import typer

from dinomix_cache.cli.common import err, given, parse_shape, setup_logging, shape_text, user_errors
from dinomix_cache.data.classes import SYNAPSE_CASE_IDS
from dinomix_cache.data.datasets import SplitSettings
from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.phantom.generate import PhantomSettings
from dinomix_cache.store.feature_store import StoreSettings
from dinomix_cache.teacher.model import TeacherSettings
from stage1_extract.runner import run_extraction
from stage1_extract.settings import ExtractSettings

DatasetOpt = typer.Option(ExtractSettings.dataset, "--dataset",
                          help="phantom (built-in, offline), synapse, amos or msd.")
DataOpt = typer.Option(None, "--data", help="Dataset root. Default data/DATASET; the phantom is generated "
                       "there on first use.")
TeacherOpt = typer.Option(
    TeacherSettings.source, "--teacher",
    help="Hugging Face hub id or local directory of a vision transformer (DINOv3, DINOv2, CLIP, SigLIP/SigLIP2, ViT, "
    "MAE ViT), "
    "or random:NAME for a random-init DINOv3 (labelled 'random, not pretrained'): tiny, vits16, vitb16, vitl16 "
    "(blind to context: for speed) or ctx-tiny, ctx-vits16 (context-sensitive like a trained ViT: for fidelity).")
LabeledOpt = typer.Option(None, "--labeled", help="Labeled share: synapse 10p|20p|40p (default 20p), "
                          "amos 2p|5p|10p (default 5p), msd/phantom any Np.")
SplitDirOpt = typer.Option(None, "--split-dir", help="Folder of split lists overriding the shipped ones.")
SeedOpt = typer.Option(SplitSettings.seed, "--split-seed",
                       help="Seed of generated splits (msd, phantom with few cases).")
ShapeOpt = typer.Option(shape_text(PreprocessSettings.target_shape), "--target-shape",
                        help="Volume shape D x H x W after preprocessing.")
InputOpt = typer.Option(None, "--input-size", help="Teacher input per slice, H x W pixels (multiple of the "
                        "patch size). Default: the slice size.")
DtypeOpt = typer.Option(TeacherSettings.dtype, "--dtype", help="Teacher dtype: float32, bfloat16 or float16.")
DeviceOpt = typer.Option(TeacherSettings.device, "--device", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
BatchOpt = typer.Option(ExtractSettings.batch_size, "--batch-size",
                        help="Slices per teacher forward (batches span cases).")
ReadThreadsOpt = typer.Option(ExtractSettings.read_threads, "--read-threads",
                              help="In-process: threads reading and preprocessing the next "
                              "cases while the teacher runs.")
PhantomCasesOpt = typer.Option(None, "--phantom-cases", help="Phantom: number of cases (default the 30 "
                               "Synapse ids, so the shipped Synapse splits apply).")
PhantomMatrixOpt = typer.Option(PhantomSettings.matrix, "--phantom-matrix", help="Phantom: in-plane voxels per side.")


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
) -> ExtractSettings:
    """Map CLI options onto :class:`~stage1_extract.settings.ExtractSettings`; options left None
    take the dataclasses' defaults."""
    phantom_ids = SYNAPSE_CASE_IDS if phantom_cases is None else tuple(f"{i:04d}" for i in range(1, phantom_cases + 1))
    return ExtractSettings(
        dataset=dataset, data=data, out=out_path,
        split=SplitSettings(**given(labeled=labeled, split_dir=split_dir, seed=split_seed)),
        preprocess=PreprocessSettings(target_shape=parse_shape(target_shape, 3, "--target-shape")),
        teacher=TeacherSettings(source=teacher, **given(revision=revision, dtype=dtype, device=device),
                                input_size=parse_shape(input_size, 2, "--input-size") if input_size else None),
        storage=StoreSettings(**given(compression=compression, keepbits=keepbits, chunk_slices=chunk_slices,
                                       volumes=volumes)),
        phantom=PhantomSettings(case_ids=phantom_ids, **given(matrix=phantom_matrix)),
        cases=tuple(cases) if cases else None, overwrite=overwrite, progress=progress,
        crop_windows=parse_shape(crop_windows, 2, "--crop-windows") if crop_windows else None,
        **given(batch_size=batch_size, workers=workers, scheduler=scheduler, read_threads=read_threads),
    )


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
        ExtractSettings.workers, "--workers",
        help="0: extract in this process. N: start a local dask cluster of N worker processes, "
        "one case per task (each process gets 1/N of the cores; with a CUDA teacher, the GPUs). The store is "
        "the same, bit for bit (checked on CPU). On a CPU, one worker per core works best."),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Use a running dask cluster instead, e.g. tcp://head:8786. Its workers must "
        "see --data, --out and the teacher at the same paths; start them with --nthreads 1, and with "
        "--resources GPU=1 (one worker per GPU) for a CUDA teacher. Excludes --workers."),
    read_threads: int = ReadThreadsOpt,
    cases: list[str] | None = typer.Option(None, "--cases", help="Only these case ids (repeat the option)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete and rebuild an existing store."),
    volumes: bool = typer.Option(StoreSettings.volumes, "--volumes/--no-volumes",
                                 help="Also store the preprocessed image and "
                                 "label volumes (training then needs nothing else)."),
    compression: str = typer.Option(
        StoreSettings.compression, "--compression",
        help="lossless (Blosc, exact; float16 features barely compress, CT volumes ≈3.4×), "
        "lossy (features rounded to --keepbits mantissa bits, then zstd: relative error ≤ 2^-(keepbits+1), "
        "measured max 0.39 % at keepbits 7) or none."),
    keepbits: int = typer.Option(StoreSettings.keepbits, "--keepbits",
                                 help="Mantissa bits kept by --compression lossy (1..9)."),
    chunk_slices: int = typer.Option(StoreSettings.chunk_slices, "--chunk-slices",
                                     help="Slices per stored chunk (a 64-slice crop reads 4-5)."),
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
    setup_logging()

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


