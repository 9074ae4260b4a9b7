"""The ``train`` verb: a preset, the options' changes on top, then :func:`stage2_train.train.loop.train`."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import typer

from dinomix_cache.cli.common import err, parse_shape, setup_logging, user_errors
from dinomix_cache.errors import UserError
from stage2_train.train.loop import train as run_training
from stage2_train.train.settings import DEFAULT_PRESET, TrainSettings
from stage2_train.train.settings import preset as make_preset


@user_errors
def train(
    cache: str | None = typer.Option(None, "--cache", help="The feature store to train from: a .zarr folder, a .zip "
                                     "made by pack, or a URL (https://, s3://, ...) (on --resume: only if it moved; "
                                     "it must be the same store)."),
    out_path: Path | None = typer.Option(None, "--out", help="Run folder. Default runs/STORE-TARGETS-seedSEED."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder, only for a store made with --no-volumes "
                                     "(volumes are rebuilt from the recorded source files)."),
    preset: str = typer.Option(DEFAULT_PRESET, "--preset", help="paper (the paper's settings), cpu (width 8, "
                               "48x64x64 crops, instance norm, lr 0.5, 30 epochs: the demo's, for a store made with "
                               "--target-shape 48x96x96) or cpu-small (width 4, 32x64x64 crops, 30 epochs)."),
    targets: str = typer.Option(TrainSettings.targets, "--targets",
                                help="Distillation targets: hybrid (cache, teacher only for "
                                "mixed or flipped slices), cache (no teacher at all) or online (teacher always)."),
    seed: int = typer.Option(TrainSettings.seed, "--seed", help="Seed of every random draw and of the initialisation."),
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
        TrainSettings.teacher_view, "--teacher-view",
        help="What the teacher sees of each training crop. slice (default): the whole "
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
    aux_mode: str = typer.Option(TrainSettings.aux_mode, "--aux-mode",
                                 help="How the aux losses weigh their Bernoulli-masked voxels: skcdf (logits and "
                                 "labels multiplied by the mask, as SKCDF, which the paper follows), weighted (the "
                                 "mask as per-voxel weights over all voxels, as ABC) or exclude (mean over the kept "
                                 "voxels: each weighs 1/keep-fraction times more)."),
    unsup_weighting: str = typer.Option(TrainSettings.unsup_weighting, "--unsup-weighting",
                                        help="How L_unsup weighs its kept voxels (pasted box or confident "
                                        "pseudo-label): weighted (the mask as per-voxel weights over all voxels of "
                                        "x_mix, as MOST and FixMatch) or exclude (mean over the kept voxels only)."),
    unsup_rampup: float | None = typer.Option(None, "--unsup-rampup",
                                              help="Length of lambda_unsup's sigmoid ramp exp(-5(1-t)^2) as a "
                                              "fraction of the run's iterations (1.0, as DHC and SKCDF; 0 = none)."),
    ema_warmup: bool = typer.Option(TrainSettings.ema_warmup, "--ema-warmup/--no-ema-warmup",
                                    help="EMA decay min(1 - 1/(t+1), 0.99) at iteration t (the mean teacher's "
                                    "warm-up: the EMA starts from the trained student, not its random init)."),
    fkd_reduction: str = typer.Option(TrainSettings.fkd_reduction, "--fkd-reduction",
                                      help="Eq. 1 over the teacher's C channels: channel_sum (as written: the "
                                      "squared L2 distance of the normalised vectors per location, 2 - 2 cos) or "
                                      "mean (also averaged over channels: Eq. 1 / C)."),
    precision: str = typer.Option(TrainSettings.precision, "--precision",
                                  help="Student forwards: auto (bf16 autocast on a GPU or "
                                  "a CPU with native bf16, AVX512-BF16 or AMX; float32 elsewhere), float32 or "
                                  "bfloat16. Recorded resolved in settings.json; losses stay float32."),
    memory_format: str = typer.Option(TrainSettings.memory_format, "--memory-format",
                                      help="auto (channels-last on a CPU, except bf16 on "
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
    setup_logging()

    def done(run: Path) -> None:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once (rank 0 wrote the folder)
            err.print(f"run {run}: progress.png, log.jsonl, latest.pt and best.pt", highlight=False, soft_wrap=True)

    if resume is not None:
        done(run_training(None, resume=resume, max_steps=max_steps, epochs=epochs, cache=cache, progress=progress))
        return
    if cache is None:
        raise UserError("pass --cache STORE (a store made by extract), or --resume RUN")
    settings = make_preset(preset, cache)
    pic = replace(settings.pic, enabled=not no_pic, **({"eta": pic_eta} if pic_eta is not None else {}),
                  **({"gamma": pic_gamma} if pic_gamma is not None else {}))
    changes: dict = {"out": out_path, "data": data, "targets": targets, "seed": seed, "fkd": not no_fkd,
                     "aux": not no_aux, "labeled_only": labeled_only, "flip": flip, "aux_mode": aux_mode,
                     "unsup_weighting": unsup_weighting, "ema_warmup": ema_warmup, "fkd_reduction": fkd_reduction,
                     "pic": pic, "teacher_view": teacher_view, "crop_grid": crop_grid, "precision": precision,
                     "memory_format": memory_format}
    for key, value in (("epochs", epochs), ("width", width), ("tau", tau), ("lr", lr),
                       ("normalization", normalization), ("unsup_rampup", unsup_rampup)):
        if value is not None:
            changes[key] = value
    if crop:
        changes["crop"] = parse_shape(crop, 3, "--crop")
    done(run_training(replace(settings, **changes), max_steps=max_steps, progress=progress))


