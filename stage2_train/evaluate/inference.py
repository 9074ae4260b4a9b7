"""A trained run's student as a segmenter: checkpoint loading and sliding-window inference.

The protocol is the peers' (``docs/protocol.md``, "Evaluation"): windows of the run's training
crop (64×128×128 in the paper) start every ``stride`` voxels (16 slices × 32 × 32 by default), the
last one on each axis clamped to end at the border; each window's softmax of the student's *main*
head is summed into the volume with uniform weights and divided by the per-voxel count; argmax.
MONAI's ``sliding_window_inference`` does exactly this with ``mode="constant"``.

Only the student is used (not the EMA copy, not the auxiliary head). A run trained in bf16 (on a GPU,
or on a CPU with native bf16) is run under bf16 autocast where the device has native bf16, in float32
elsewhere (:func:`inference_precision`); the probabilities are accumulated in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.errors import SettingsError, UserError, check_choice
from dinomix_cache.store.attributes import preprocess_settings
from dinomix_cache.store.schema import StoreAttrs
from stage2_train.method.networks import DinoMixStudent
from stage2_train.train.precision import bf16_native, student_autocast
from stage2_train.train.run_folder import RunFolder
from stage2_train.train.run_schema import state_dict_mismatch
from stage2_train.train.settings import TrainSettings

__all__ = ["CHECKPOINTS", "DEFAULT_STRIDE", "Checkpoint", "InferenceSettings", "RunModel", "check_stride",
           "inference_precision", "load_run_model", "sliding_window_probabilities"]

log = logging.getLogger("dinomix_cache.inference")

DEFAULT_STRIDE = (16, 32, 32)  # slices × rows × columns between window starts (the peers' protocol)
Checkpoint = Literal["best", "latest"]
CHECKPOINTS: tuple[Checkpoint, ...] = get_args(Checkpoint)


@dataclass(frozen=True)
class InferenceSettings:
    """How a volume is segmented.

    Attributes:
        patch: (D, H, W) window in voxels; None = the run's training crop.
        stride: (D, H, W) voxels between window starts (16 × 32 × 32, the peers' default).
        sw_batch_size: windows per forward pass (more is faster on GPU, costs memory).
        checkpoint: ``best`` (best validation Dice, the peers' choice) or ``latest``.

    Raises:
        SettingsError: an unknown checkpoint, a stride that is not three positive integers, or
            ``sw_batch_size`` < 1 (naming the CLI option).
    """

    patch: tuple[int, int, int] | None = None
    stride: tuple[int, int, int] = DEFAULT_STRIDE
    sw_batch_size: int = 4
    checkpoint: Checkpoint = "best"

    def __post_init__(self) -> None:
        check_choice(self.checkpoint, CHECKPOINTS, "--checkpoint", "checkpoint")
        check_stride(self.stride, self.sw_batch_size)


def check_stride(stride: tuple[int, ...], sw_batch_size: int) -> None:
    """Refuse a sliding-window stride that is not three positive integers, or ``sw_batch_size`` < 1.

    Raises:
        SettingsError: naming ``--stride`` or ``--sw-batch-size``.
    """
    if len(stride) != 3 or any(int(s) < 1 for s in stride):
        raise SettingsError(f"stride {stride} must be three positive integers (D, H, W) (--stride)")
    if sw_batch_size < 1:
        raise SettingsError(f"sw_batch_size {sw_batch_size} must be at least 1 (--sw-batch-size)")


@dataclass
class RunModel:
    """A run's student, ready to segment, with what is needed to preprocess its inputs.

    Attributes:
        run: the run folder.
        settings: the run's resolved training settings.
        store_meta: the attributes of the store it was trained from (teacher, preprocessing,
            classes, split), as recorded in the run folder (``store.json``).
        network: the student in ``eval()`` mode on ``device``.
        device: where it runs.
        checkpoint: which checkpoint was loaded (``best`` or ``latest``) and at which ``step``.
        store_sha256: the sha256 of the store's attributes (its identity, ``store.json``).
        store_attrs: ``store_meta``, validated and typed.
    """

    run: Path
    settings: TrainSettings
    store_meta: dict[str, Any]
    network: DinoMixStudent
    device: torch.device
    checkpoint: str
    step: int
    store_sha256: str
    store_attrs: StoreAttrs

    @property
    def class_names(self) -> list[str]:
        return self.store_attrs.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def preprocess(self) -> PreprocessSettings:
        """The store's preprocessing: inputs must be prepared exactly as the training volumes were."""
        return preprocess_settings(self.store_attrs)

    def patch(self, settings: InferenceSettings) -> tuple[int, int, int]:
        return tuple(int(v) for v in (settings.patch or self.settings.crop))  # type: ignore[return-value]

    @property
    def precision(self) -> str:
        """The precision of this model's forwards (:func:`inference_precision`)."""
        return inference_precision(self.settings.precision, self.device)

    def segment(self, image: np.ndarray, settings: InferenceSettings = InferenceSettings()) -> np.ndarray:
        """Labels of a preprocessed (D, H, W) image in [0, 1]: (D, H, W) uint8, same grid."""
        probs = sliding_window_probabilities(self.network, image, self.patch(settings), settings.stride,
                                             settings.sw_batch_size, self.device, self.precision)
        # max(0).indices = argmax(0) (the first maximum), four times faster on a CPU
        return probs.max(0).indices.to(torch.uint8).cpu().numpy()


def inference_precision(trained: str, device: torch.device) -> str:
    """``bfloat16`` for a run trained in bf16 (its recorded ``precision``) on a device with native bf16
    (a GPU, an AVX512-BF16 or AMX CPU); ``float32`` otherwise."""
    return "bfloat16" if trained == "bfloat16" and bf16_native(device) else "float32"


def load_run_model(run: Path, checkpoint: str = "best", device: torch.device | None = None) -> RunModel:
    """Load a run folder's student from ``best.pt`` (or ``latest.pt``).

    ``best`` falls back to ``latest`` (with a log line) when the run never validated (no eval
    cases), since the latest weights are then all there is.

    Raises:
        UserError: not a run folder; settings.json, store.json or the checkpoint damaged, foreign or
            disagreeing with each other (naming the file); or no checkpoint at all (train it first).
            The network is built from validated, bounded numbers only.
    """
    folder = RunFolder(Path(run))
    settings = folder.train_settings()
    identity = folder.identity()
    attrs = folder.store_attrs()
    if attrs is None:
        raise UserError(f"{run}/store.json records no store attributes (an older run); retrain it to evaluate")
    names = [checkpoint] + (["latest"] if checkpoint == "best" else [])
    found = next((n for n in names if (folder.path / f"{n}.pt").exists()), None)
    if found is None:
        raise UserError(f"{run} holds no checkpoint ({checkpoint}.pt missing): train it first "
                        f"(dinomix-cache train --resume {run} continues an interrupted run)")
    if found != checkpoint:
        log.info("%s has no %s.pt (no validation ran); using %s.pt", run, checkpoint, found)
    payload = folder.load_checkpoint(found)
    if any(c > v for c, v in zip(settings.crop, attrs.preprocessing.target_shape, strict=True)):
        raise UserError(f"{run}/settings.json: crop {list(settings.crop)} exceeds the store's volumes "
                        f"{list(attrs.preprocessing.target_shape)} (store.json); the run folder's files disagree")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = DinoMixStudent(attrs.num_classes, attrs.teacher.hidden_size, width=settings.width,
                             projector_hidden=settings.projector_hidden, dropout=settings.dropout,
                             normalization=settings.normalization)
    mismatch = state_dict_mismatch(network.state_dict(), payload["networks"]["student"])
    if mismatch:
        raise UserError(f"{folder.path / (found + '.pt')} does not fit the student that settings.json and store.json "
                        f"describe ({mismatch}); the run folder's files disagree: restore them, or retrain")
    network.load_state_dict(payload["networks"]["student"])
    network.to(device).eval()
    return RunModel(Path(run), settings, identity["meta"], network, device, found, int(payload["state"]["step"]),
                    str(identity["attrs_sha256"]), attrs)


def sliding_window_probabilities(
    network: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    patch: tuple[int, int, int],
    stride: tuple[int, int, int],
    sw_batch_size: int,
    device: torch.device,
    precision: str = "auto",
) -> torch.Tensor:
    """Uniformly averaged softmax of the main head over sliding windows.

    Args:
        network: returns a :class:`~stage2_train.method.networks.StudentOutput` (``.logits``) for a
            (B, 1, *patch) batch.
        image: (D, H, W) preprocessed image, at least ``patch`` on every axis.
        patch: window size (D, H, W).
        stride: voxels between window starts (D, H, W).
        sw_batch_size: windows per forward pass.
        device: where the network runs; the (C, D, H, W) float32 sum is kept there too.
        precision: of the network's forwards: ``float32``, ``bfloat16`` or ``auto`` (bf16 where the
            device has native bf16; see :func:`~stage2_train.train.precision.resolve_precision`).

    Returns:
        (C, D, H, W) float32 class probabilities on ``device``.

    Raises:
        UserError: the image is not 3D or is smaller than the window on some axis.
    """
    # float32 copy: the input may be a read-only float16 view of a cached volume
    volume = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, dtype=np.float32))
    if volume.ndim != 3:
        raise UserError(f"a (D, H, W) volume is needed, got shape {tuple(volume.shape)}")
    if any(p > v for p, v in zip(patch, volume.shape, strict=True)):
        raise UserError(f"volume {tuple(volume.shape)} is smaller than the inference window {tuple(patch)}; "
                        "pass a smaller --patch")
    # MONAI steps int(patch · (1 - overlap)); half a voxel of slack keeps that exactly `stride`.
    overlap = [1.0 - (s + 0.5) / p if s < p else 0.0 for s, p in zip(stride, patch, strict=True)]

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        with student_autocast(device, precision):
            logits = network(batch).logits
        return torch.softmax(logits.float(), dim=1)

    with torch.inference_mode():
        x = volume.to(device=device, dtype=torch.float32)[None, None]
        probs = sliding_window_inference(x, list(patch), sw_batch_size, predictor, overlap=overlap,
                                         mode="constant", sw_device=device, device=device)
    return probs[0]  # type: ignore[index]
