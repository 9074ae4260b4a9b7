"""``dinomix-cache train-teacher``: a small DINOv3 ViT trained on a dataset's labels, so that its tokens carry anatomy.

No offline teacher knows anatomy (``random:*`` teachers are random-init DINOv3s), so the
distillation term cannot show its effect on the phantom. This module trains a
``transformers.DINOv3ViTModel`` with a linear head on its patch tokens (``last_hidden_state[:, 1 + R:]``)
to predict the class histogram of the pixels each patch covers (soft cross-entropy), from axial slices
preprocessed and fed exactly as ``extract`` feeds its teacher (:func:`~dinomix_cache.data.preprocess.load_case`,
then :func:`~dinomix_cache.teacher.model.teacher_pixels`: grey repeated to 3 channels, the DINOv3
mean/std). Random gamma, contrast, brightness and in-plane shifts keep the tokens meaningful on the
gamma-changed, CutMix-pasted slices of training.

The folder it writes is an ordinary Hugging Face folder (``config.json``, ``model.safetensors``; the
head is dropped) plus ``dinomix_teacher.json`` (:mod:`dinomix_cache.teacher.provenance`): what it learnt
from, whether it is an oracle, its settings, seed and metrics. ``extract --teacher FOLDER`` loads it
like any checkpoint folder and names it by that file's label, never "pretrained".

Determinism: the weights depend only on the settings (seed included), the data and the number of
CPU threads (fixed by ``threads``); on one machine the same settings give the same bytes.

Failure modes (:class:`~dinomix_cache.errors.UserError`, nothing written): a non-empty ``out``
without ``overwrite`` (or, with it, one that is not a teacher folder), no labelled case in the chosen
split, and whatever dataset discovery and preprocessing refuse.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

import dinomix_cache
from dinomix_cache.atomic import write_atomic
from dinomix_cache.data.datasets import CaseSource, DatasetSpec, discover_dataset
from dinomix_cache.data.preprocess import load_case
from dinomix_cache.errors import UserError, writing
from dinomix_cache.phantom.generate import generate_phantom
from dinomix_cache.settings_codec import settings_to_json
from dinomix_cache.teacher import families as fam
from dinomix_cache.teacher.anatomy_settings import AnatomyTeacherSettings
from dinomix_cache.teacher.model import teacher_pixels
from dinomix_cache.teacher.provenance import PROVENANCE_FILE, PROVENANCE_KIND, files_sha256, trained_label

__all__ = ["AnatomyTeacherReport", "patch_histograms", "train_anatomy_teacher", "training_cases"]

_WARMUP = 0.05  # share of the steps with a linear learning-rate warm-up
_EVAL_BATCH = 64


@dataclass(frozen=True)
class AnatomyTeacherReport:
    """What a ``train-teacher`` run made.

    Attributes:
        out: the teacher folder.
        label: how the teacher is named everywhere (from its provenance file).
        cases: the case ids trained on.
        seconds: wall time of the training steps.
        final_loss: soft cross-entropy, mean over the last 10 % of steps (nats).
        eval_accuracy: share of the eval cases' patches whose majority class the head predicts
            (None without labelled eval cases).
        eval_foreground_accuracy: the same over patches whose majority class is not background.
    """

    out: Path
    label: str
    cases: tuple[str, ...]
    seconds: float
    final_loss: float
    eval_accuracy: float | None
    eval_foreground_accuracy: float | None

    def summary(self) -> str:
        """One line: loss, eval patch accuracy, time, folder."""
        acc = "no eval cases" if self.eval_accuracy is None else (
            f"eval patch accuracy {100 * self.eval_accuracy:.1f} % "
            f"(foreground {100 * (self.eval_foreground_accuracy or 0.0):.1f} %)")
        return (f"teacher {self.out} [{self.label}]: {len(self.cases)} case(s), loss {self.final_loss:.3f}, {acc}, "
                f"{self.seconds:.0f} s")


def training_cases(spec: DatasetSpec, labels: str) -> list[CaseSource]:
    """The labelled cases a teacher learns from: role ``labeled`` (``labels="labeled"``), or ``labeled``
    and ``unlabeled`` (``labels="train"``); eval and test cases never.

    Raises:
        UserError: none of them has a label file.
    """
    roles = ("labeled",) if labels == "labeled" else ("labeled", "unlabeled")
    cases = [c for c in spec.cases if c.role in roles and c.label is not None]
    if not cases:
        raise UserError(f"no labelled {' or '.join(roles)} cases in {spec.name} at {spec.root}: a teacher learns "
                        "from labels; add label files or choose --labels")
    return cases


def patch_histograms(labels: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """(B, H, W) integer labels → (B, h·w, K) float32 class shares of the pixels under each token.

    Token ``(i, j)`` of an ``(h, w)`` grid covers slice pixels ``[i·H/h, (i+1)·H/h)`` (adaptive average
    pooling; exact when H/h is an integer, bins overlapping by a pixel otherwise). Rows sum to 1.
    """
    one_hot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)
    shares = F.adaptive_avg_pool2d(one_hot, grid)
    return shares.flatten(2).transpose(1, 2)


def _augment(images: torch.Tensor, labels: torch.Tensor, settings: AnatomyTeacherSettings,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice: gamma, contrast and brightness on (B, H, W) images in [0, 1], and one in-plane shift
    of image and label together (zero fill: air and background)."""
    b = images.shape[0]
    low, high = settings.gamma_range
    u = torch.rand(b, 3, generator=generator)
    gamma = (low + (high - low) * u[:, 0]).view(b, 1, 1)
    scale = (1 + settings.intensity * (2 * u[:, 1] - 1)).view(b, 1, 1)
    offset = (settings.intensity / 2 * (2 * u[:, 2] - 1)).view(b, 1, 1)
    images = images.clamp(0, 1) ** gamma * scale + offset
    s = settings.max_shift
    if s == 0:
        return images, labels
    shifts = torch.randint(-s, s + 1, (b, 2), generator=generator).tolist()
    out_i, out_l = torch.zeros_like(images), torch.zeros_like(labels)
    height, width = images.shape[1:]
    for k, (dy, dx) in enumerate(shifts):
        src_y, dst_y = slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy))
        src_x, dst_x = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
        out_i[k, dst_y, dst_x] = images[k, src_y, src_x]
        out_l[k, dst_y, dst_x] = labels[k, src_y, src_x]
    return out_i, out_l


@contextlib.contextmanager
def _deterministic(threads: int, seed: int) -> Iterator[None]:
    """Fixed CPU threads, deterministic kernels and torch's global RNG seeded (DINOv3's RoPE draws its
    training-time jitter from it) inside the block; all restored afterwards."""
    threads_before, deterministic_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)


def _config(settings: AnatomyTeacherSettings) -> DINOv3ViTConfig:
    return DINOv3ViTConfig(hidden_size=settings.hidden_size, num_hidden_layers=settings.layers,
                           num_attention_heads=settings.heads, intermediate_size=4 * settings.hidden_size,
                           patch_size=settings.patch_size, num_register_tokens=settings.registers)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``, and never replace a folder that is not a teacher."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder for the teacher")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace the teacher there, or choose "
                            "another --out")
        if not (out / PROVENANCE_FILE).is_file():
            raise UserError(f"--out {out} holds something other than a teacher made by train-teacher (no "
                            f"{PROVENANCE_FILE}); --overwrite replaces only those: choose another --out")


def _prepare(settings: AnatomyTeacherSettings) -> DatasetSpec:
    assert settings.data is not None
    if settings.dataset == "phantom":
        generate_phantom(settings.data, settings.phantom, progress=settings.progress)
    return discover_dataset(settings.dataset, settings.data, settings.split)


def _slices(cases: list[CaseSource], settings: AnatomyTeacherSettings,
            num_classes: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict[str, str | None]]]:
    """Every axial slice of ``cases``, preprocessed as ``extract`` does: images (N, H, W) as stored
    (float16), labels (N, H, W) uint8, and each case's source hashes."""
    images, labels, hashes = [], [], {}
    for case in cases:
        pre = load_case(case, settings.preprocess, num_classes)
        assert pre.label is not None
        images.append(torch.from_numpy(pre.image))
        labels.append(torch.from_numpy(pre.label))
        hashes[case.case_id] = {"image": pre.source["image_sha256"], "label": pre.source["label_sha256"]}
    return torch.cat(images), torch.cat(labels), hashes


def _patch_accuracy(model: DINOv3ViTModel, head: torch.nn.Linear, images: torch.Tensor, labels: torch.Tensor,
                    input_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[float, float]:
    """(all patches, foreground-majority patches): share whose majority class the head predicts."""
    prefix = 1 + model.config.num_register_tokens
    mean, std = fam.DEFAULT_NORM["dinov3"]
    hits = fg_hits = total = fg_total = 0
    with torch.no_grad():
        for start in range(0, len(images), _EVAL_BATCH):
            x, y = images[start:start + _EVAL_BATCH], labels[start:start + _EVAL_BATCH]
            tokens = model(pixel_values=teacher_pixels(x, input_hw, mean, std)).last_hidden_state[:, prefix:]
            pred = head(tokens).argmax(-1)
            majority = patch_histograms(y, grid, head.out_features).argmax(-1)
            fg = majority > 0
            hits += int((pred == majority).sum())
            fg_hits += int((pred == majority)[fg].sum())
            total += majority.numel()
            fg_total += int(fg.sum())
    return hits / max(total, 1), fg_hits / max(fg_total, 1)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first ``_WARMUP`` of the steps, then a cosine decay to 0."""
    warmup = max(1, round(_WARMUP * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _fit(model: DINOv3ViTModel, head: torch.nn.Linear, images: torch.Tensor, labels: torch.Tensor,
         settings: AnatomyTeacherSettings, input_hw: tuple[int, int], grid: tuple[int, int]) -> list[float]:
    """``settings.steps`` AdamW steps on random augmented batches of ``images`` (N, H, W); the losses.
    Its randomness is a generator seeded by ``settings.seed`` and torch's global RNG (seeded by the caller)."""
    mean, std = fam.DEFAULT_NORM["dinov3"]
    params = [*model.parameters(), *head.parameters()]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, functools.partial(_lr_factor, steps=settings.steps))
    generator = torch.Generator().manual_seed(settings.seed)
    prefix = 1 + settings.registers
    losses: list[float] = []
    model.train()
    bar = Progress(TextColumn("[bold]train-teacher[/]"), BarColumn(bar_width=24), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(compact=True),
                   console=Console(stderr=True), disable=not settings.progress)
    with bar:
        task = bar.add_task("steps", total=settings.steps, loss="-")
        for step in range(settings.steps):
            pick = torch.randint(len(images), (settings.batch_size,), generator=generator)
            x, y = _augment(images[pick].to(torch.float32), labels[pick], settings, generator)
            target = patch_histograms(y, grid, head.out_features)
            tokens = model(pixel_values=teacher_pixels(x, input_hw, mean, std)).last_hidden_state[:, prefix:]
            loss = -(target * head(tokens).log_softmax(-1)).sum(-1).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            if step % 10 == 0 or step == settings.steps - 1:
                bar.update(task, completed=step + 1, loss=f"{np.mean(losses[-50:]):.3f}")
    model.eval()
    return losses


def train_anatomy_teacher(settings: AnatomyTeacherSettings) -> AnatomyTeacherReport:
    """Train the teacher that ``settings`` describe and write its folder (see the module docstring).

    Returns:
        The :class:`AnatomyTeacherReport` (its :meth:`~AnatomyTeacherReport.summary` is the CLI's last line).

    Raises:
        UserError: see the module docstring; nothing is written then.
    """
    settings = settings.resolved()
    assert settings.out is not None
    _check_out(settings.out, settings.overwrite)
    spec = _prepare(settings)
    cases = training_cases(spec, settings.labels)
    eval_cases = [c for c in spec.cases if c.role == "eval" and c.label is not None]
    num_classes = len(spec.class_names)
    input_hw = settings.input_size or settings.preprocess.target_shape[1:]
    if any(v % settings.patch_size for v in input_hw):
        raise UserError(f"teacher input size {input_hw[0]}x{input_hw[1]} (the slice size unless --input-size is "
                        f"given) is not a multiple of the patch size {settings.patch_size}: set --input-size")
    grid = (input_hw[0] // settings.patch_size, input_hw[1] // settings.patch_size)
    images, labels, hashes = _slices(cases, settings, num_classes)

    with _deterministic(settings.threads, settings.seed):
        model = DINOv3ViTModel(_config(settings))
        head = torch.nn.Linear(settings.hidden_size, num_classes)
        start = time.perf_counter()
        losses = _fit(model, head, images, labels, settings, input_hw, grid)
        seconds = time.perf_counter() - start
        accuracy: tuple[float | None, float | None] = (None, None)
        if eval_cases:
            eval_images, eval_labels, _ = _slices(eval_cases, settings, num_classes)
            accuracy = _patch_accuracy(model, head, eval_images, eval_labels, input_hw, grid)

    report = AnatomyTeacherReport(
        out=settings.out, label=trained_label(spec.name, settings.labels), cases=tuple(c.case_id for c in cases),
        seconds=seconds, final_loss=float(np.mean(losses[-max(1, settings.steps // 10):])),
        eval_accuracy=accuracy[0], eval_foreground_accuracy=accuracy[1])
    provenance = _provenance(settings, spec, report, {
        "case_roles": {c.case_id: c.role for c in cases}, "case_sha256": hashes,
        "eval_cases": [c.case_id for c in eval_cases], "input_size": list(input_hw)})
    _write_folder(model, provenance, settings.out)
    return report


def _provenance(settings: AnatomyTeacherSettings, spec: DatasetSpec, report: AnatomyTeacherReport,
                cases: dict[str, Any]) -> dict[str, Any]:
    """The ``dinomix_teacher.json`` record (its ``weights_sha256`` is added once the weights are written)."""
    return {
        "kind": PROVENANCE_KIND,
        "label": report.label,
        "labels": settings.labels,
        "oracle": settings.oracle,
        "note": ("Not a pretrained DINOv3: a small DINOv3 ViT that dinomix-cache train-teacher trained on the "
                 f"{spec.name} labels of the cases below"
                 + (", unlabeled ones included (an oracle for them)." if settings.oracle else ".")),
        "dataset": spec.name,
        "split": spec.split,
        "cases": list(report.cases),
        **cases,
        "target_shape": list(settings.preprocess.target_shape),
        "preprocessing": settings.preprocess.to_json(),
        "seed": settings.seed,
        "threads": settings.threads,
        "settings": settings_to_json(settings),
        "metrics": {"final_loss": report.final_loss, "eval_patch_accuracy": report.eval_accuracy,
                    "eval_foreground_patch_accuracy": report.eval_foreground_accuracy,
                    "train_seconds": round(report.seconds, 1)},
        "versions": {"dinomix-cache": dinomix_cache.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }


def _write_folder(model: DINOv3ViTModel, provenance: dict[str, Any], out: Path) -> None:
    """Write the Hugging Face folder and its provenance beside ``out``, then move it into place, so
    that ``out`` never holds half a teacher (an old one is replaced only once the new one is whole)."""
    out = out.absolute()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    old = tmp.with_name(tmp.name.replace(".tmp", ".old"))
    with writing(out, "teacher folder"):
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            provenance["weights_sha256"] = files_sha256([tmp / "model.safetensors"])
            write_atomic(tmp / PROVENANCE_FILE, json.dumps(provenance, indent=2) + "\n")
            if out.exists():
                out.rename(old)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
