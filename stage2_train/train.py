"""``dinomix-cache train``: DINO-Mix from a feature store, with validation, checkpoints and resume."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from dinomix_cache.errors import UserError
from dinomix_cache.store import FeatureStore
from dinomix_cache.teacher import Teacher, TeacherSettings, load_teacher
from stage2_train.distributed import Distributed, checkpoint_payload, from_environment, restore_state
from stage2_train.pic import PicSettings
from stage2_train.run_folder import RunFolder, store_identity
from stage2_train.sampling import VolumeCache, center_crop
from stage2_train.settings import TrainSettings
from stage2_train.targets import TargetPolicy, make_policy
from stage2_train.trainer import DinoMixIteration, TrainState

log = logging.getLogger("dinomix_cache.train")


def open_training_store(settings: TrainSettings) -> FeatureStore:
    """Open the store and check it can train: complete, labeled cases, volumes, crop fits.

    Raises:
        UserError: naming what is missing and how to fix it.
    """
    store = FeatureStore.open(settings.cache)
    incomplete = store.incomplete_cases()
    if incomplete or store.class_voxels() is None:
        raise UserError(f"{store.path} is not complete ({len(incomplete)} case(s) missing, e.g. "
                        f"{' '.join(incomplete[:3]) or 'statistics'}); rerun extract to finish it")
    roles = store.roles()
    if not any(r == "labeled" for r in roles.values()):
        raise UserError(f"{store.path} has no labeled cases; extract it with a split that has some (--labeled)")
    if not store.storage.volumes and settings.data is None:
        raise UserError(f"{store.path} holds no volumes (made with --no-volumes); pass --data DIR, the dataset "
                        "folder it was extracted from, to rebuild them from the source files")
    shape = tuple(int(v) for v in store.meta["preprocessing"]["target_shape"])
    if any(c > v for c, v in zip(settings.crop, shape, strict=True)):
        raise UserError(f"crop {'x'.join(map(str, settings.crop))} is larger than the store's volumes "
                        f"{'x'.join(map(str, shape))}; use a smaller --crop")
    if any(c % 16 for c in settings.crop):
        raise UserError(f"crop {'x'.join(map(str, settings.crop))}: every side must be a multiple of 16 (the VNet)")
    return store


def load_store_teacher(store: FeatureStore, targets: str) -> Teacher:
    """Load the teacher a store records (same source, revision, dtype) and check it is the same one.

    Raises:
        UserError: it cannot be loaded, or its weights differ from the store's.
    """
    recorded = store.meta["teacher"]
    try:
        teacher = load_teacher(TeacherSettings(source=recorded["source"], revision=recorded.get("revision"),
                                               dtype=recorded["dtype"]))
    except UserError as exc:
        raise UserError(f"--targets {targets} needs the store's teacher: {exc} "
                        "(or train with --targets cache, which needs no teacher)") from None
    identity = teacher.identity(tuple(recorded["input_size"]))
    if identity.get("weights_sha256") != recorded.get("weights_sha256"):
        raise UserError(f"the teacher at {recorded['source']} is not the one {store.path} was made with "
                        "(weights differ); use --targets cache")
    return teacher


def load_policy(settings: TrainSettings, store: FeatureStore, volumes: VolumeCache) -> TargetPolicy | None:
    """The distillation target policy; ``online``/``hybrid`` load the teacher the store records."""
    if not settings.fkd or settings.labeled_only:
        return None
    teacher = load_store_teacher(store, settings.targets) if settings.targets in ("online", "hybrid") else None
    return make_policy(settings.targets, store, volumes, teacher)


def validate(iteration: DinoMixIteration, volumes: VolumeCache, eval_ids: list[str]) -> tuple[float, list[float]]:
    """Hard Dice of the student's main head on the centre crop of each eval case, pooled over the crops.

    Returns:
        (mean over the classes present, per foreground class Dice in [0, 1] with NaN where a class is
        absent from both prediction and ground truth; logged as null). A quick training signal, not the evaluation
        protocol (``evaluate`` runs the sliding window over whole volumes).
    """
    student = iteration.student
    student.eval()
    num_classes = student.vnet.num_classes
    inter = np.zeros(num_classes)
    total = np.zeros(num_classes)
    with torch.inference_mode():
        for cid in eval_ids:
            crop = center_crop(cid, volumes.shape(cid), iteration.settings.crop)
            image = volumes.crop_image(crop)[None].to(iteration.device)
            pred = iteration.forward(student, image).logits.max(1).indices[0].cpu()  # = argmax(1), faster
            label = volumes.crop_label(crop)
            for c in range(1, num_classes):
                p, g = pred == c, label == c
                inter[c] += int((p & g).sum())
                total[c] += int(p.sum() + g.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(total[1:] > 0, 2 * inter[1:] / total[1:], np.nan)
    present = per_class[~np.isnan(per_class)]
    return (float(present.mean()) if present.size else 0.0), [float(v) for v in per_class]


def train(settings: TrainSettings | None, resume: Path | None = None, max_steps: int | None = None,
          epochs: int | None = None, cache: Path | str | None = None, progress: bool = False) -> Path:
    """Train (or resume) a run; returns the run folder.

    Args:
        settings: the run's settings (None on resume: the run's own are used).
        resume: a run folder to continue from its ``latest`` checkpoint.
        max_steps: stop after this many iterations in total (tests, smoke runs).
        epochs: on resume, a new E_max (raising it trains longer with the schedule stretched).
        cache: on resume, the store if it moved (it must be the same store: attributes are compared).
        progress: show a progress bar (epoch, step, loss, step time, ETA).

    Under ``torchrun --nproc-per-node N`` (N > 1) the N processes train one run with
    ``DistributedDataParallel`` (``stage2_train/distributed.py``): each runs the paper's 2 labeled +
    2 unlabeled crops a step, so the effective batch is N x (2 + 2) and an epoch has 1/N as many steps;
    the learning rate is not scaled. Rank 0 writes the run folder; resume with the same N.

    Raises:
        UserError: bad store, crop, teacher, a resume from another store or with another number of
            processes, or too few cases for N processes.
    """
    with from_environment() as context:
        return _train(context, settings, resume, max_steps, epochs, cache, progress)


def _train(context: Distributed, settings: TrainSettings | None, resume: Path | None, max_steps: int | None,
           epochs: int | None, cache: Path | str | None, progress: bool) -> Path:
    """:func:`train` in this process's place of the job (every rank runs it; rank 0 writes)."""
    if resume is not None:
        folder = RunFolder(resume)
        settings = settings_from_json(folder.settings())
        if cache is not None:
            settings = replace(settings, cache=cache)  # TrainSettings makes it a Path or keeps a URL
        if epochs is not None and epochs != settings.epochs:
            if context.is_main:
                log.info("E_max %d -> %d: the poly schedule is stretched over the new length", settings.epochs,
                         epochs)
            settings = replace(settings, epochs=epochs)
        settings = settings.resolved(context.device)  # saved resolved: kept as they are
    else:
        if settings is None:
            raise UserError("no settings for a new run: pass --cache STORE")
        settings = settings.resolved(context.device)
        folder = RunFolder(settings.out)  # type: ignore[arg-type]
    device = context.device
    check_precision(settings, device, is_main=context.is_main)
    store = open_training_store(settings)
    identity = store_identity(store)
    if resume is not None:
        saved = folder.identity()
        classes = saved.get("meta", {}).get("dataset", {}).get("class_names")
        if classes is not None and list(classes) != store.class_names:
            raise UserError(f"{store.path} has classes {', '.join(store.class_names)} but {resume} was trained on "
                            f"{', '.join(classes)}; resume with the run's own store or start a new run")
        if saved["attrs_sha256"] != identity["attrs_sha256"]:
            raise UserError(f"{resume} was trained from another store ({saved['path']}); "
                            f"{store.path} differs. Resume with the same store or start a new run")
    roles = store.roles()
    cases = store.complete_cases()
    volumes = VolumeCache(store, cases, with_labels=True, data=settings.data)
    iteration = DinoMixIteration(settings, store, volumes, load_policy(settings, store, volumes), device, context)
    if resume is not None:
        checkpoint = folder.load_checkpoint("latest")
        iteration.load_state_dicts(checkpoint["networks"])
        state = restore_state(context, checkpoint, resume)
        context.run_on_main(lambda: folder.truncate_log(state.step))
    else:
        context.run_on_main(lambda: folder.create(settings_to_json(settings), identity))
        state = TrainState.seeded(settings.seed, context.rank, context.world_size)
    eval_ids = [c for c in cases if roles[c] == "eval"]
    per_epoch = iteration.sampler.iterations_per_epoch()
    total_steps = settings.epochs * per_epoch
    stop = min(total_steps, max_steps) if max_steps is not None else total_steps
    if context.is_main:
        log.info("run %s: %d iterations per epoch, %d epochs, targets %s, %s %s on %s", folder.path, per_epoch,
                 settings.epochs, "none" if iteration.policy is None else settings.targets, settings.precision,
                 settings.memory_format.replace("_", "-"), device_description(device))
    bar = TrainProgress(stop, state.step, enabled=progress and context.is_main)
    recomputed: list[float] = []  # this epoch's (since the start or the resume point)
    while state.step < stop:
        start = time.perf_counter()
        record = context.mean_record(iteration.step(state))
        recomputed.append(record.get("recomputed", 0.0))
        if context.is_main:
            bar.update(state, record, time.perf_counter() - start)
            folder.log({"kind": "step", "step": state.step, "epoch": state.epoch - (state.iteration == 0),
                        "seconds": round(time.perf_counter() - start, 4), **record})
        if state.iteration == 0:  # an epoch just ended
            dice = float("nan")
            if context.is_main:
                dice, per_class = validate(iteration, volumes, eval_ids) if eval_ids else (float("nan"), [])
                folder.log({"kind": "epoch", "epoch": state.epoch - 1, "step": state.step, "val_dice": dice,
                            "val_dice_per_class": [None if np.isnan(v) else round(v, 4) for v in per_class],
                            "recomputed": round(float(np.mean(recomputed)), 4)})
            recomputed.clear()
            dice = context.broadcast_float(dice)  # the other ranks wait here, then update best_dice alike
            if dice > state.best_dice:
                state.best_dice = dice
                save_checkpoint(context, folder, "best", iteration, state)
        if state.step % settings.checkpoint_every == 0 or state.step == stop:
            save_checkpoint(context, folder, "latest", iteration, state)
    bar.close()
    if context.is_main:
        folder.plot()
    return folder.path


def check_precision(settings: TrainSettings, device: torch.device, is_main: bool = True) -> None:
    """On a CPU, refuse bf16 where this CPU's bf16 convolutions are wrong for the run's shapes, and say why
    ``auto`` chose float32 there.

    Raises:
        UserError: ``--precision bfloat16`` with convolutions that fail the check.
    """
    from stage2_train.networks import cpu_bf16_native, cpu_bf16_problem

    if device.type != "cpu" or not cpu_bf16_native():
        return
    problem = cpu_bf16_problem(settings.width, settings.crop, settings.batch)
    if problem is None:
        return
    if settings.precision == "bfloat16":
        raise UserError(f"bf16 on this CPU computes wrong results for this network ({problem}); train with "
                        "--precision float32 or auto, or with a crop whose depth is not 32 slices")
    if is_main:
        log.info("float32: this CPU has native bf16, but its bf16 convolutions are wrong for this network "
                 "(%s)", problem)


def device_description(device: torch.device) -> str:
    """``cpu (native bf16: AVX512-BF16)``, ``cpu (no native bf16)``, ``cuda:0``: for the run's first log line."""
    if device.type != "cpu":
        return str(device)
    from stage2_train.networks import cpu_amx, cpu_bf16_native

    if not cpu_bf16_native():
        return "cpu (no native bf16)"
    return f"cpu (native bf16: {'AMX' if cpu_amx() else 'AVX512-BF16'})"


def save_checkpoint(context: Distributed, folder: RunFolder, name: str, iteration: DinoMixIteration,
                    state: TrainState) -> None:
    """Write ``name.pt`` on rank 0 (with every rank's generators when distributed). Collective."""
    payload = checkpoint_payload(context, iteration.state_dicts(), state)
    if payload is not None:
        folder.save_checkpoint(name, payload)


class TrainProgress:
    """A rich progress bar over iterations: epoch, step, loss, seconds per step, ETA."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]train[/] epoch {task.fields[epoch]}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} · {task.fields[sec]} s/step"), TextColumn("eta"),
            TimeRemainingColumn(compact=True), console=Console(stderr=True), disable=not enabled)
        self._progress.start()
        self._task = self._progress.add_task("", total=total, completed=done, epoch=0, loss="-", sec="-")

    def update(self, state: TrainState, record: dict, seconds: float) -> None:
        self._progress.update(self._task, completed=state.step, epoch=state.epoch, loss=f"{record['total']:.3f}",
                              sec=f"{seconds:.2f}")

    def close(self) -> None:
        self._progress.stop()


def settings_to_json(settings: TrainSettings) -> dict:
    return json.loads(json.dumps(asdict(settings), default=str))


def settings_from_json(data: dict) -> TrainSettings:
    """The inverse of :func:`settings_to_json` (tuples and paths restored)."""
    data = dict(data)
    # `cache` stays as saved: TrainSettings makes a local store a Path and keeps a URL a str.
    data["out"] = Path(data["out"]) if data.get("out") else None
    data["data"] = Path(data["data"]) if data.get("data") else None
    data["crop"] = tuple(data["crop"])
    data["gamma_range"] = tuple(data["gamma_range"])
    # Runs saved before these fields existed: bf16 autocast on a GPU, float32 on a CPU, contiguous.
    data.setdefault("precision", "bfloat16" if torch.cuda.is_available() else "float32")
    data.setdefault("memory_format", "contiguous")
    pic = dict(data["pic"])
    pic["box_fraction"] = tuple(pic["box_fraction"])
    data["pic"] = PicSettings(**pic)
    return TrainSettings(**data)
