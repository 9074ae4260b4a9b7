"""Frozen ViT teacher: loads DINOv3 (default), DINOv2, CLIP or SigLIP(2) and returns patch-token grids.

``load_teacher(TeacherSettings(...))`` gives a :class:`Teacher`; ``Teacher.forward_slices`` maps a batch
of greyscale CT slices in [0, 1] to the patch-token grid of the last hidden state (its input is
built by :func:`teacher_pixels`, which a teacher trained by this project is trained on too). Loading
never runs code from the source (safetensors only, no ``trust_remote_code``) and honours
``HF_HUB_OFFLINE``. ``Teacher.identity`` is the provenance record stored with the features and
compared on resume; ``Teacher.label`` says what the weights are ("random, not pretrained",
"pretrained", or what a trained teacher's provenance file says, oracle warning included).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dinomix_cache.errors import UserError
from dinomix_cache.teacher import families as fam
from dinomix_cache.teacher.loaded import LoadedModel
from dinomix_cache.teacher.pretrained import DEFAULT_TEACHER, load_pretrained
from dinomix_cache.teacher.provenance import files_sha256
from dinomix_cache.teacher.random_init import RANDOM_PREFIX, load_random

RANDOM_LABEL = "random, not pretrained"
PRETRAINED_LABEL = "pretrained"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# Config fields that do not change feature values (or change between saves of the same model).
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "torch_dtype",
    "dtype",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_attn_implementation_internal",
    "attn_implementation",
    "_experts_implementation",
    "_experts_implementation_internal",
    "_output_attentions",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "torchscript",
}


@dataclass(frozen=True)
class TeacherSettings:
    """Which frozen teacher, and how it runs. All but ``device`` change feature values and are
    recorded in the store (``Teacher.identity``).

    Attributes:
        source: hub id, local directory, or ``random:NAME`` (random init, labelled "random, not
            pretrained" everywhere): ``tiny``, ``vits16``, ``vitb16``, ``vitl16`` (context-free, for
            speed) or ``ctx-tiny``, ``ctx-vits16`` (context-sensitive, for fidelity measurements).
        revision: hub branch, tag or commit (hub ids only).
        input_size: teacher input (H, W) in pixels per slice, a multiple of the patch size;
            None = the slice size.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:N``.
    """

    source: str = DEFAULT_TEACHER
    revision: str | None = None  # hub revision (branch/tag/commit)
    input_size: tuple[int, int] | None = None  # teacher input (H, W) per slice; None -> the slice size
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto -> cuda if available else cpu


class Teacher:
    """A loaded, frozen teacher. Build it with :func:`load_teacher`."""

    def __init__(
        self,
        *,
        settings: TeacherSettings,
        model: torch.nn.Module,
        family: str,
        model_type: str,
        mean,
        std,
        is_random: bool,
        device: torch.device,
        dtype: torch.dtype,
        revision: str | None,
        weight_files: list[Path] | None,
        random_weights_sha256: str | None,
        provenance_label: str | None = None,
        training: dict | None = None,
    ):
        self.settings = settings
        self.model = model
        self.family = family
        self.model_type = model_type
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        self.hidden_size = int(cfg.hidden_size)
        self.num_prefix_tokens = fam.num_prefix_tokens(family, cfg)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.is_random = is_random
        self.device = device
        self.dtype = dtype
        self._revision = revision
        self._weight_files = weight_files
        self._weights_sha256 = random_weights_sha256
        self._provenance_label = provenance_label
        self.training = training  # a trained teacher's record (provenance.store_record), else None
        self._config_sha256 = _config_sha256(cfg)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    @property
    def label(self) -> str:
        """What the weights are, as every output names them."""
        if self._provenance_label is not None:
            return self._provenance_label
        return RANDOM_LABEL if self.is_random else PRETRAINED_LABEL

    def resolved_input_size(self, slice_hw: tuple[int, int]) -> tuple[int, int]:
        """Teacher input (H, W): settings.input_size, else the slice size; must be multiples of the patch."""
        size = self.settings.input_size if self.settings.input_size is not None else slice_hw
        _check_input_size(
            tuple(size), self.patch_size, self.settings.source, from_slices=self.settings.input_size is None
        )
        return int(size[0]), int(size[1])

    def grid_shape(self, slice_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = self.resolved_input_size(slice_hw)
        return h // self.patch_size, w // self.patch_size

    def weights_sha256(self) -> str:
        if self._weights_sha256 is None:
            self._weights_sha256 = files_sha256(self._weight_files or [])
        return self._weights_sha256

    def identity(self, slice_hw: tuple[int, int]) -> dict:
        """JSON-able provenance: everything that changes feature values (not the device). ``training``
        is present only for a teacher this project trained (stores made before it have none)."""
        extra = {} if self.training is None else {"training": self.training}
        return {
            "source": self.settings.source,
            "label": self.label,
            "family": self.family,
            "model_type": self.model_type,
            "model_class": type(self.model).__name__,
            "revision": self._revision,
            "weights_sha256": self.weights_sha256(),
            "config_sha256": self._config_sha256,
            "hidden_size": self.hidden_size,
            "patch_size": self.patch_size,
            "num_prefix_tokens": self.num_prefix_tokens,
            "input_size": list(self.resolved_input_size(slice_hw)),
            "mean": list(self.mean),
            "std": list(self.std),
            "dtype": _dtype_name(self.dtype),
            "layer": "last_hidden_state",
            **extra,
        }

    def describe(self) -> str:
        return (
            f"{self.settings.source} ({self.label}) {fam.DISPLAY_NAME[self.family]} h{self.hidden_size} "
            f"p{self.patch_size} {_dtype_name(self.dtype)} on {self.device}"
        )

    @torch.inference_mode()
    def forward_slices(self, slices: torch.Tensor, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, H, W) images in [0, 1] -> (B, h, w, C) float32 CPU patch grid of the last hidden state.

        The images are resized (bilinear) to ``input_size`` if given, else to the settings' input
        size (None: kept as they are), replicated to 3 channels, normalised and cast to the dtype:
        stage one's forward path, and the one every recompute in stage two takes.

        Raises:
            ValueError: not a (B, H, W) batch. UserError: an input size that is not a multiple of
                the patch size.
        """
        if slices.ndim != 3:
            raise ValueError(f"forward_slices expects (B, H, W) slices, got shape {tuple(slices.shape)}")
        b, height, width = slices.shape
        if input_size is not None:
            _check_input_size(tuple(input_size), self.patch_size, self.settings.source, from_slices=False)
            in_h, in_w = int(input_size[0]), int(input_size[1])
        else:
            in_h, in_w = self.resolved_input_size((height, width))
        x = teacher_pixels(slices.to(device=self.device), (in_h, in_w), self._mean_t, self._std_t).to(self.dtype)
        hidden = fam.run_model(self.family, self.model, x, self.patch_size)
        gh, gw = in_h // self.patch_size, in_w // self.patch_size
        expected = self.num_prefix_tokens + gh * gw
        if hidden.ndim != 3 or hidden.shape[0] != b or hidden.shape[1] != expected:
            raise RuntimeError(
                f"teacher {self.settings.source} ({type(self.model).__name__}) returned last_hidden_state "
                f"of shape {tuple(hidden.shape)}, expected ({b}, {expected}, C) = "
                f"{self.num_prefix_tokens} prefix tokens + {gh}x{gw} patches for a {in_h}x{in_w} input; "
                "this checkpoint's token layout is not supported"
            )
        grid = hidden[:, self.num_prefix_tokens :].reshape(b, gh, gw, hidden.shape[-1])
        return grid.to(device="cpu", dtype=torch.float32)


def teacher_pixels(slices: torch.Tensor, input_hw: tuple[int, int], mean: torch.Tensor | Sequence[float],
                   std: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """(B, H, W) slices in [0, 1] → (B, 3, H', W') float32 teacher input: resized (bilinear) to
    ``input_hw`` when it differs from (H, W), the grey value repeated on 3 channels, normalised by the
    per-channel ``mean`` and ``std``. Stage one's input, and the input a teacher trained by this
    project learns from (differentiable, so augmented slices can go through it)."""
    b, height, width = slices.shape
    in_h, in_w = int(input_hw[0]), int(input_hw[1])
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=slices.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=slices.device).view(1, 3, 1, 1)
    x = slices.to(torch.float32).unsqueeze(1)
    if (in_h, in_w) != (height, width):
        x = F.interpolate(x, size=(in_h, in_w), mode="bilinear", align_corners=False, antialias=False)
    x = x.expand(b, 3, in_h, in_w)
    return (x - mean_t) / std_t


def scaled_input_size(image_hw: tuple[int, int], slice_hw: tuple[int, int], input_hw: tuple[int, int],
                      patch: int) -> tuple[int, int]:
    """Teacher input for an image cut from a slice: ``image · input / slice`` per side, rounded to a
    multiple of the patch (at least one patch), so that a token covers about as many slice pixels as
    in the store (a 128-pixel crop of a 160-pixel slice seen at 224 becomes 176, not 179.2)."""
    return tuple(max(1, round(n * i / s / patch)) * patch  # type: ignore[return-value]
                 for n, i, s in zip(image_hw, input_hw, slice_hw, strict=True))


def load_teacher(settings: TeacherSettings) -> Teacher:
    """Load and freeze the teacher named by ``settings``.

    Raises:
        UserError: anything the user can fix (an unknown dtype, device or random name, a bad input
            size, weights that cannot be loaded).
    """
    dtype = _parse_dtype(settings.dtype)
    device = _parse_device(settings.device)
    if settings.input_size is not None and len(tuple(settings.input_size)) != 2:
        raise UserError(f"teacher input size must be (H, W), got {settings.input_size!r}")
    source = settings.source.strip()
    if source.startswith(RANDOM_PREFIX):
        loaded = load_random(source[len(RANDOM_PREFIX) :], settings.revision, dtype, device)
    else:
        loaded = load_pretrained(source, settings.revision, dtype, device)
    teacher = _wrap(settings, loaded, dtype, device)
    if settings.input_size is not None:
        teacher.resolved_input_size(tuple(settings.input_size))  # fail early on a bad size
    return teacher


def _wrap(settings: TeacherSettings, loaded: LoadedModel, dtype: torch.dtype, device: torch.device) -> Teacher:
    return Teacher(
        settings=settings,
        model=loaded.model,
        family=loaded.family,
        model_type=loaded.model_type,
        mean=loaded.mean,
        std=loaded.std,
        is_random=loaded.is_random,
        device=device,
        dtype=dtype,
        revision=loaded.revision,
        weight_files=loaded.weight_files,
        random_weights_sha256=loaded.random_weights_sha256,
        provenance_label=loaded.label,
        training=loaded.training,
    )


def _check_input_size(size: tuple, patch: int, source: str, *, from_slices: bool) -> None:
    if len(size) != 2 or any(int(v) != v or v <= 0 for v in size):
        raise UserError(f"teacher input size must be two positive integers (H, W), got {size!r}")
    if all(int(v) % patch == 0 for v in size):
        return

    def near(v: int) -> str:
        lo = (v // patch) * patch
        return f"{lo} or {lo + patch}" if lo > 0 else f"{patch}"

    origin = " (the slice size, used when no teacher input size is set)" if from_slices else ""
    h, w = int(size[0]), int(size[1])
    raise UserError(
        f"teacher input size {h}x{w}{origin} is not a multiple of the patch size {patch} of {source}: "
        f"nearest valid sizes are H {near(h)}, W {near(w)}"
    )


def _parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise UserError(f"unknown teacher dtype {name!r}: use float32, bfloat16 or float16") from None


def _parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown teacher device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"teacher device {name!r} requested but CUDA is not available; use the cpu or auto device"
        )
    return device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_sha256(config) -> str:
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(obj, list | tuple):
            return [clean(v) for v in obj]
        return obj

    text = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
