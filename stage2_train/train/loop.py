"""``dinomix-cache train``: DINO-Mix from a feature store, with validation, checkpoints and resume."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dinomix_cache.errors import UserError
from dinomix_cache.settings_codec import settings_to_json
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.teacher.model import Teacher, TeacherSettings, load_teacher
from stage2_train.method.iteration import DinoMixIteration, TrainState
from stage2_train.method.networks import StudentOutput
from stage2_train.sampling.crops import center_crop
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.targets.policies import TargetPolicy, make_policy
from stage2_train.train import precision  # the module: tests replace its CPU probes
from stage2_train.train.distributed import Distributed, checkpoint_payload, from_environment, restore_state
from stage2_train.train.run_folder import RunFolder, store_identity
from stage2_train.train.run_schema import dataclass_from_json, state_dict_mismatch
from stage2_train.train.settings import TrainSettings

log = logging.getLogger("dinomix_cache.train")


def open_training_store(settings: TrainSettings) -> FeatureStore:
    """Open the store and check it can train: complete, labeled cases, volumes, crop fits. The store
    holds a reader lock until closed, so ``extract --overwrite`` cannot delete it meanwhile.

    Raises:
        UserError: naming what is missing and how to fix it.
    """
    store = FeatureStore.open(settings.cache).hold_reader_lock()
    try:
        return _check_training_store(store, settings)
    except BaseException:
        store.close()
        raise


def _check_training_store(store: FeatureStore, settings: TrainSettings) -> FeatureStore:
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
    shape = store.attrs.preprocessing.target_shape
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
    recorded = store.attrs.teacher
    try:
        teacher = load_teacher(TeacherSettings(source=recorded.source, revision=recorded.revision,
                                               dtype=recorded.dtype, input_size=tuple(recorded.input_size)))
    except UserError as exc:
        raise UserError(f"--targets {targets} needs the store's teacher: {exc} "
                        "(or train with --targets cache, which needs no teacher)") from None
    identity = teacher.identity(recorded.input_size)
    if identity.get("weights_sha256") != recorded.weights_sha256:
        raise UserError(f"the teacher at {recorded.source} is not the one {store.path} was made with "
                        "(weights differ); use --targets cache")
    return teacher


def load_policy(settings: TrainSettings, store: FeatureStore, volumes: VolumeCache) -> TargetPolicy | None:
    """The distillation target policy; ``online``/``hybrid`` load the teacher the store records."""
    if not settings.fkd or settings.labeled_only:
        return None
    teacher = load_store_teacher(store, settings.targets) if settings.targets in ("online", "hybrid") else None
    policy = make_policy(settings.targets, store, volumes, teacher, view=settings.teacher_view)
    if policy.reads_cache:
        try:
            policy.view.check_crop(settings.crop)
        except ValueError as exc:
            raise UserError(f"--teacher-view {settings.teacher_view} with --targets {settings.targets}: {exc}; "
                            "extract a store whose --crop-windows match the crop, or use --targets online") from None
        if settings.teacher_view == "crop" and settings.effective_crop_grid == "voxel":
            log.warning("--teacher-view crop with --crop-grid voxel: crop windows exist on the token grid only, so "
                        "cached targets of crops between them are the nearest window's (approximate)")
    return policy


def validate(iteration: DinoMixIteration, volumes: VolumeCache, eval_ids: list[str],
             network: Callable[[torch.Tensor], StudentOutput] | None = None) -> tuple[float, list[float]]:
    """Hard Dice of a network's main head (the student's by default; the EMA teacher's when ``network`` is
    ``iteration.ema``) on the centre crop of each eval case, pooled over the crops.

    Returns:
        (mean over the classes present, per foreground class Dice in [0, 1] with NaN where a class is
        absent from both prediction and ground truth; logged as null). A quick training signal, not the evaluation
        protocol (``evaluate`` runs the sliding window over whole volumes).
    """
    student = iteration.student
    student.eval()
    network = student if network is None else network
    num_classes = student.vnet.num_classes
    inter = np.zeros(num_classes)
    total = np.zeros(num_classes)
    with torch.inference_mode():
        for cid in eval_ids:
            crop = center_crop(cid, volumes.shape(cid), iteration.settings.crop)
            image = volumes.crop_image(crop)[None].to(iteration.device)
            pred = iteration.forward(network, image).logits.max(1).indices[0].cpu()  # = argmax(1), faster
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
            processes, too few cases for N processes, a damaged run folder (settings.json,
            store.json, latest.pt), damaged store data, or a failed write. A new run refused before
            its first checkpoint leaves no run folder behind.
    """
    with from_environment() as context:
        return _train(context, settings, resume, max_steps, epochs, cache, progress)


def _train(context: Distributed, settings: TrainSettings | None, resume: Path | None, max_steps: int | None,
           epochs: int | None, cache: Path | str | None, progress: bool) -> Path:
    """:func:`train` in this process's place of the job (every rank runs it; rank 0 writes)."""
    checkpoint: dict | None = None
    if resume is not None:
        folder = RunFolder(resume)
        settings = folder.train_settings()
        saved = folder.identity()
        checkpoint = folder.load_checkpoint("latest")  # validated before anything is built from it
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
        # The same bounds as a saved settings.json, before anything (the bf16 check) is allocated from them.
        dataclass_from_json(type(settings), json.dumps(settings_to_json(settings.resolved())), "the training settings")
        settings = settings.resolved(context.device)
        folder = RunFolder(settings.out)  # type: ignore[arg-type]
        if (folder.path / "settings.json").exists():
            raise UserError(f"{folder.path} already holds a run; resume it with --resume {folder.path} or choose --out")
    check_precision(settings, context.device, is_main=context.is_main)
    store = open_training_store(settings)
    created = False
    try:
        if resume is not None:
            _check_same_store(store, saved, resume)
        identity = store_identity(store)
        roles = store.roles()
        cases = store.complete_cases()
        volumes = VolumeCache(store, cases, with_labels=True, data=settings.data)
        policy = load_policy(settings, store, volumes)
        iteration = DinoMixIteration(settings, store, volumes, policy, context.device, context)
        if checkpoint is not None:
            state = _restore(context, iteration, checkpoint, folder.path / "latest.pt")
            context.run_on_main(folder.remove_stale_temporaries)
            context.run_on_main(lambda: folder.truncate_log(state.step))
        else:
            context.run_on_main(lambda: folder.create(settings_to_json(settings), identity))
            created = True
            state = TrainState.seeded(settings.seed, context.rank, context.world_size)
        _loop(context, settings, folder, iteration, volumes, state, [c for c in cases if roles[c] == "eval"],
              max_steps, progress)
    except UserError:
        if created and context.is_main:
            folder.discard()  # nothing was trained yet: leave no run folder behind
        raise
    finally:
        store.close()
    return folder.path


def _check_same_store(store: FeatureStore, saved: dict, resume: Path) -> None:
    """Refuse to resume a run from a store other than its own (classes first: the clearer message)."""
    classes = (saved.get("meta") or {}).get("dataset", {}).get("class_names")
    if classes is not None and list(classes) != store.class_names:
        raise UserError(f"{store.path} has classes {', '.join(store.class_names)} but {resume} was trained on "
                        f"{', '.join(classes)}; resume with the run's own store or start a new run")
    if saved["attrs_sha256"] != store_identity(store)["attrs_sha256"]:
        raise UserError(f"{resume} was trained from another store ({saved['path']}); "
                        f"{store.path} differs. Resume with the same store or start a new run")


def _restore(context: Distributed, iteration: DinoMixIteration, checkpoint: dict, path: Path) -> TrainState:
    """Load a validated checkpoint into the networks and the generators.

    Raises:
        UserError: its tensors do not fit the networks settings.json and store.json describe, or its
            optimiser or generator states are malformed.
    """
    networks = checkpoint["networks"]
    for name, module in (("student", iteration.student), ("ema", iteration.ema)):
        mismatch = state_dict_mismatch(module.state_dict(), networks[name])
        if mismatch:
            raise UserError(f"{path} does not fit the run's {name} network ({mismatch}): settings.json or store.json "
                            "disagree with the checkpoint; restore the run folder's files, or start a new run")
    try:
        iteration.load_state_dicts(networks)
        return restore_state(context, checkpoint, path.parent)
    except UserError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise UserError(f"{path} holds a malformed optimiser or generator state ({type(exc).__name__}: {reason}); "
                        "restore it, or start a new run") from None


def _loop(context: Distributed, settings: TrainSettings, folder: RunFolder, iteration: DinoMixIteration,
          volumes: VolumeCache, state: TrainState, eval_ids: list[str], max_steps: int | None, progress: bool) -> None:
    """Iterate to the end (or ``max_steps``): log, validate each epoch, checkpoint, plot."""
    per_epoch = iteration.sampler.iterations_per_epoch()
    total_steps = settings.epochs * per_epoch
    stop = min(total_steps, max_steps) if max_steps is not None else total_steps
    if context.is_main:
        log.info("run %s: %d iterations per epoch, %d epochs, targets %s, %s %s on %s", folder.path, per_epoch,
                 settings.epochs, "none" if iteration.policy is None else settings.targets, settings.precision,
                 settings.memory_format.replace("_", "-"), device_description(context.device))
    bar = TrainProgress(stop, state.step, enabled=progress and context.is_main)
    steps: list[dict[str, float]] = []  # this epoch's records (since the start or the resume point)
    try:
        while state.step < stop:
            start = time.perf_counter()
            record = context.mean_record(iteration.step(state))
            steps.append(record)
            if context.is_main:
                bar.update(state, record, time.perf_counter() - start)
                folder.log({"kind": "step", "step": state.step, "epoch": state.epoch - (state.iteration == 0),
                            "seconds": round(time.perf_counter() - start, 4), **record})
            if state.iteration == 0:  # an epoch just ended
                dice = float("nan")
                if context.is_main:
                    summary = epoch_record(iteration, volumes, eval_ids, state, steps)
                    folder.log(summary)
                    dice = summary["val_dice"]
                steps.clear()
                iteration.pseudo_stats.reset()
                dice = context.broadcast_float(dice)  # the other ranks wait here, then update best_dice alike
                if dice > state.best_dice:
                    state.best_dice = dice
                    save_checkpoint(context, folder, "best", iteration, state)
            if state.step % settings.checkpoint_every == 0 or state.step == stop:
                save_checkpoint(context, folder, "latest", iteration, state)
    finally:
        bar.close()
    if context.is_main:
        folder.plot()


# Each loss term's weight in Eq. 5 (λ: the ramped λ_unsup of the step), for the epoch's term shares.
_UNSUP_TERMS = ("unsup", "unsup_aux")
_TERMS = ("sup", "sup_aux", "distill", *_UNSUP_TERMS)


def epoch_record(iteration: DinoMixIteration, volumes: VolumeCache, eval_ids: list[str], state: TrainState,
                 steps: list[dict[str, float]]) -> dict:
    """The log line of an epoch that just ended: validation Dice of the student and of the EMA teacher,
    and what the epoch's steps did — each term's share of the total loss (weighted as in Eq. 5, less the
    constant that SKCDF's masked voxels add to the aux terms), the
    distillation gradient's share at x5, the confident and kept fractions of the unsupervised branch,
    the target recompute fraction and, where the truth of unlabeled cases is known, the pseudo-labels'
    quality (:class:`~stage2_train.method.pseudo_label_stats.PseudoLabelStats`)."""

    def mean(key: str) -> float | None:
        values = [r[key] for r in steps if key in r and not np.isnan(r[key])]
        return round(float(np.mean(values)), 4) if values else None

    def rounded(values: list[float]) -> list[float | None]:
        return [None if np.isnan(v) else round(v, 4) for v in values]

    dice, per_class = validate(iteration, volumes, eval_ids) if eval_ids else (float("nan"), [])
    record: dict = {"kind": "epoch", "epoch": state.epoch - 1, "step": state.step, "val_dice": dice,
                    "val_dice_per_class": rounded(per_class)}
    if not iteration.settings.labeled_only and iteration.unlabeled and eval_ids:
        ema_dice, ema_per_class = validate(iteration, volumes, eval_ids, iteration.ema)
        record.update(ema_val_dice=ema_dice, ema_val_dice_per_class=rounded(ema_per_class))
    # Each term with its Eq. 5 weight, less what carries no gradient (SKCDF's masked voxels: log C each).
    weighted = {k: float(np.mean([(r.get(k, 0.0) - r.get(f"{k}_inert", 0.0))
                                  * (r.get("lambda_unsup", 0.0) if k in _UNSUP_TERMS else 1.0) for r in steps]))
                for k in _TERMS if any(k in r for r in steps)}
    total = sum(weighted.values())
    if total > 0:
        record["shares"] = {k: round(v / total, 4) for k, v in weighted.items()}
    for key in ("distill_grad", "confident", "kept", "lambda_unsup", "ema_decay", "recomputed"):
        value = mean(key)
        if value is not None:
            record[key] = value
    stats = iteration.pseudo_stats.summary()
    if stats is not None:
        record.update(stats)
    return record


def check_precision(settings: TrainSettings, device: torch.device, is_main: bool = True) -> None:
    """On a CPU, refuse bf16 where this CPU's bf16 convolutions are wrong for the run's shapes, and say why
    ``auto`` chose float32 there.

    Raises:
        UserError: ``--precision bfloat16`` with convolutions that fail the check.
    """
    if device.type != "cpu" or not precision.cpu_bf16_native():
        return
    problem = precision.cpu_bf16_problem(settings.width, settings.crop, settings.batch)
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
    if not precision.cpu_bf16_native():
        return "cpu (no native bf16)"
    return f"cpu (native bf16: {'AMX' if precision.cpu_amx() else 'AVX512-BF16'})"


def save_checkpoint(context: Distributed, folder: RunFolder, name: str, iteration: DinoMixIteration,
                    state: TrainState) -> None:
    """Write ``name.pt`` on rank 0 (with every rank's generators when distributed). Collective."""
    payload = checkpoint_payload(context, iteration.state_dicts(), state)
    if payload is not None:
        folder.save_checkpoint(name, payload)


class TrainProgress:
    """A rich progress bar over iterations: epoch, step, loss, seconds per step, ETA."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
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

