"""The DINO-Mix student: the DHC/SKCDF VNet with an auxiliary balanced head, a projector and an EMA copy.

* :class:`VNet` is the five-level VNet of the DHC/SKCDF lineage (``PROTOCOL.md`` 1.6): BatchNorm + ReLU,
  strided-conv downsampling, transposed-conv upsampling and skip connections by **addition**. It is not
  MONAI's ``VNet`` (that one concatenates skips, has residual blocks and 16 base channels). Besides the
  main 1×1×1 classifier it carries SKCDF's auxiliary balanced classifier on the same last decoder feature
  (``PROTOCOL.md`` 2.1).
* :class:`Projector` maps the deepest encoder map x5 (stride 16) to the foundation teacher's hidden size
  C_T for feature distillation.
* :class:`DinoMixStudent` bundles both; its forward returns a :class:`StudentOutput`.
* :class:`EmaTeacher` keeps an exponential moving average of the student for pseudo-labelling.

Shapes use (B, C, D, H, W); D is the axial (slice) axis.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "DOWNSAMPLE_FACTOR",
    "MEMORY_FORMATS",
    "PRECISIONS",
    "DinoMixStudent",
    "EmaTeacher",
    "Projector",
    "StudentOutput",
    "VNet",
    "bf16_native",
    "count_parameters",
    "cpu_bf16_native",
    "cpu_bf16_problem",
    "resolve_memory_format",
    "resolve_precision",
    "student_autocast",
    "torch_memory_format",
]

# Four stride-2 downsamplings: every spatial side must be a multiple of 2**4 so that the transposed
# convolutions restore exactly the shapes of the skip maps they are added to.
DOWNSAMPLE_FACTOR = 16


@dataclass
class StudentOutput:
    """What a student forward pass returns.

    Attributes:
        logits: main-head logits, (B, num_classes, D, H, W). The only head used at inference.
        aux_logits: auxiliary balanced-head logits, (B, num_classes, D, H, W); only for the aux losses.
        deep: the deepest encoder map x5 before dropout, (B, 16·width, D/16, H/16, W/16).
        projected: ``deep`` mapped to the teacher's hidden size, (B, C_T, D/16, H/16, W/16); ``None``
            when the network has no projector (a bare :class:`VNet`).
    """

    logits: torch.Tensor
    aux_logits: torch.Tensor
    deep: torch.Tensor
    projected: torch.Tensor | None = None


PRECISIONS = ("auto", "float32", "bfloat16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
# A bf16 convolution is taken as computed correctly when its output, input gradient and weight gradient are
# within this relative (Frobenius) distance of float32's; correct ones measured 0.002-0.004, wrong ones
# 0.9 to inf (garbage).
BF16_TOLERANCE = 0.05


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 convolutions in hardware: AVX512-BF16 or AMX tiles, through oneDNN.

    Without either, bf16 on a CPU is emulated with float32 arithmetic and is slower than float32."""
    cpu = torch.cpu
    has = [getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.backends.mkldnn.is_available() and any(has)


def cpu_amx() -> bool:
    """Whether this CPU has AMX tiles (e.g. Xeon Sapphire Rapids)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def bf16_native(device: torch.device) -> bool:
    """bf16 autocast is native on ``device``: any CUDA device (as the project always assumed), or a CPU
    with :func:`cpu_bf16_native`."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native())


def _conv_layers(width: int, crop: tuple[int, int, int]) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """One module per distinct convolution of a width-``width`` VNet on a ``crop``, with its input's
    (C, D, H, W) shape."""
    net = VNet(in_channels=1, num_classes=2, width=width, dropout=False)
    seen: dict[tuple, tuple[nn.Module, tuple[int, ...]]] = {}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        shape = tuple(args[0].shape[1:])
        key = (type(module).__name__, module.in_channels, module.out_channels, module.kernel_size, module.stride,
               module.padding, shape)
        seen.setdefault(key, (module, shape))

    for m in net.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net.eval()(torch.zeros(1, 1, *crop))
    return list(seen.values())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm().clamp_min(1e-30))


_SOUNDNESS: dict[tuple, str | None] = {}


def cpu_bf16_problem(width: int, crop: tuple[int, int, int], batch: int) -> str | None:
    """None if every convolution of the VNet at this width, crop and batch computes correctly under CPU bf16
    autocast; else which one does not.

    oneDNN 3.12's ``jit_bf16:avx512_core_bf16`` convolution (an AVX512-BF16 CPU such as AMD EPYC Zen 4)
    returns garbage weight gradients for a 3x3x3 convolution whose input has depth 2 (the deepest level of
    a crop 32 slices deep): relative errors of 1 to inf, different on every call. Each distinct convolution
    of the network (kernel, stride, channels, input shape) is therefore run once in float32 and once under
    bf16 autocast on random data, forward and backward (and forward alone at batch 1, as in validation), and
    compared with :data:`BF16_TOLERANCE`. Takes 0.1-2 s on a CPU; the answer is kept for the process. The
    global random generator is left untouched.
    """
    key = (width, tuple(crop), batch)
    if key in _SOUNDNESS:
        return _SOUNDNESS[key]
    problem = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for module, shape in _conv_layers(width, tuple(crop)):
            for b, backward in ((batch, True), (1, False)):
                x = torch.rand(b, *shape, requires_grad=backward)
                results = []
                for bf16 in (False, True):
                    module.zero_grad(set_to_none=True)
                    x.grad = None
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(backward):
                        y = module(x).float()
                    grads: tuple[torch.Tensor, ...] = ()
                    if backward:
                        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
                        y.backward(g)
                        grads = (x.grad.clone(), module.weight.grad.clone())
                    results.append((y.detach(), *grads))
                errors = [_relative(b16, f32) for b16, f32 in zip(results[1], results[0], strict=True)]
                if not all(e <= BF16_TOLERANCE for e in errors):  # also catches NaN
                    what = ("output", "input gradient", "weight gradient")
                    worst = max(range(len(errors)), key=lambda i: errors[i] if errors[i] == errors[i] else float("inf"))
                    kernel, spatial = "x".join(map(str, module.kernel_size)), "x".join(map(str, shape[1:]))
                    problem = (f"{type(module).__name__} {module.in_channels}->{module.out_channels} kernel {kernel} "
                               f"on batch {b} x {spatial}: bf16 {what[worst]} off by {errors[worst]:.3g} (relative)")
                    break
            if problem:
                break
    _SOUNDNESS[key] = problem
    return problem


def resolve_precision(precision: str, device: torch.device, width: int | None = None,
                      crop: tuple[int, int, int] | None = None, batch: int = 1) -> str:
    """``auto`` → ``bfloat16`` on a GPU, and on a CPU with native bf16 (:func:`cpu_bf16_native`) whose bf16
    convolutions compute correctly for this network (:func:`cpu_bf16_problem`, checked when ``width`` and
    ``crop`` are given); ``float32`` otherwise. An explicit ``float32``/``bfloat16`` is kept.

    Raises:
        ValueError: an unknown name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if not bf16_native(device):
        return "float32"
    if device.type == "cpu" and width is not None and crop is not None and cpu_bf16_problem(width, crop, batch):
        return "float32"
    return "bfloat16"


def resolve_memory_format(memory_format: str, device: torch.device, precision: str) -> str:
    """``auto`` → ``channels_last`` (``torch.channels_last_3d``) on a CPU, except bf16 on an AMX CPU, where
    contiguous tensors were measured faster; ``contiguous`` on a GPU. An explicit value is kept.

    Raises:
        ValueError: an unknown name, or a precision that is not resolved.
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}: choose one of {', '.join(MEMORY_FORMATS)}")
    if precision not in PRECISIONS[1:]:
        raise ValueError(f"resolve the precision first (got {precision!r})")
    if memory_format != "auto":
        return memory_format
    if device.type != "cpu" or (precision == "bfloat16" and cpu_amx()):
        return "contiguous"
    return "channels_last"


def torch_memory_format(memory_format: str) -> torch.memory_format:
    """``channels_last`` → ``torch.channels_last_3d``, ``contiguous`` → ``torch.contiguous_format``."""
    return torch.channels_last_3d if memory_format == "channels_last" else torch.contiguous_format


def student_autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The precision of student forwards (training and inference alike): bf16 autocast when ``precision``
    is ``bfloat16`` (or ``auto`` on a device with native bf16, :func:`bf16_native`), plain float32
    otherwise. Callers cast the outputs to float32 before losses or softmax."""
    enabled = resolve_precision(precision, device) == "bfloat16"
    return torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16,
                          enabled=enabled)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module``.

    Args:
        module: any module.
        trainable_only: count only parameters with ``requires_grad`` set.

    Returns:
        The total number of elements over ``module.parameters()`` (shared parameters counted once).
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


NORMALIZATIONS = ("batch", "instance")


def _norm(channels: int, normalization: str) -> nn.Module:
    """BatchNorm3d (DHC's) or InstanceNorm3d with a learned scale and shift (no running statistics)."""
    if normalization == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.BatchNorm3d(channels)


def _conv_stack(n_convs: int, channels: int, in_channels: int | None = None,
                normalization: str = "batch") -> nn.Sequential:
    """``n_convs`` × (Conv3d 3×3×3, padding 1 → norm → ReLU); no residual connection (as DHC)."""
    layers: list[nn.Module] = []
    c_in = channels if in_channels is None else in_channels
    for _ in range(n_convs):
        layers += [nn.Conv3d(c_in, channels, kernel_size=3, padding=1), _norm(channels, normalization),
                   nn.ReLU(inplace=True)]
        c_in = channels
    return nn.Sequential(*layers)


def _down(in_channels: int, out_channels: int, normalization: str = "batch") -> nn.Sequential:
    """Conv3d kernel 2 stride 2 → norm → ReLU: halves every spatial side."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2),
        _norm(out_channels, normalization),
        nn.ReLU(inplace=True),
    )


def _up(in_channels: int, out_channels: int, normalization: str = "batch") -> nn.Sequential:
    """ConvTranspose3d kernel 2 stride 2 → norm → ReLU: doubles every spatial side."""
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2),
        _norm(out_channels, normalization),
        nn.ReLU(inplace=True),
    )


class VNet(nn.Module):
    """The DHC/SKCDF VNet with a main and an auxiliary balanced 1×1×1 head.

    Encoder (channels for ``width`` w; stride in brackets)::

        enc1: 1 conv  -> x1  w    (1)    down1 -> enc2: 2 convs -> x2  2w (2)
        down2 -> enc3: 3 convs -> x3  4w (4)    down3 -> enc4: 3 convs -> x4  8w (8)
        down4 -> enc5: 3 convs -> x5 16w (16)

    Decoder: ``up4(x5) + x4 -> dec4`` (3 convs), ``up3 + x3 -> dec3`` (3), ``up2 + x2 -> dec2`` (2),
    ``up1 + x1 -> dec1`` (1) giving the last feature x9 (w channels), then ``main_head`` and ``aux_head``.
    Every conv block is Conv3d 3×3×3 (padding 1, with bias) + BatchNorm3d (DHC's; InstanceNorm3d with
    ``normalization="instance"``) + ReLU. Skips are added, so each
    up-convolution outputs exactly the channels of the skip map it meets.

    With ``dropout`` on, Dropout3d(p=0.5) is applied to x5 (before the decoder) and to x9 (before the heads),
    in training mode only (``nn.Dropout3d`` is the identity in ``eval()``), as DHC's ``has_dropout``.
    With 14 classes and w = 32 the network has 37,778,588 parameters: the peers' 37,778,126 (one head)
    plus 462 for the aux head.

    Args:
        in_channels: image channels (1 for CT).
        num_classes: output classes including background (14 for Synapse, 16 for AMOS).
        width: base channel count w (``n_filters`` in DHC; 32 in the peers, 4–8 for tests and CPU demos).
        dropout: apply Dropout3d(0.5) to x5 and x9 in training mode.
        normalization: ``batch`` (BatchNorm3d, DHC's) or ``instance`` (InstanceNorm3d with a learned
            scale and shift: each crop normalised by its own statistics, in training and in inference).
            With small crops (48x64x64: 3x4x4 voxels at x5) and batches of four, BatchNorm's running
            statistics can stop matching the batch statistics the network learned with, so that ``eval()``
            loses organs the training batches segment; instance normalisation has no running statistics.

    Raises:
        ValueError: if a count is below 1 or ``normalization`` is unknown.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 14, width: int = 32, dropout: bool = True,
                 normalization: str = "batch") -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if value < 1:
                raise ValueError(f"VNet {name} must be at least 1, got {value}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"VNet normalization {normalization!r}: use one of {', '.join(NORMALIZATIONS)}")
        self.normalization = normalization
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        self.has_dropout = dropout
        w = width

        self.enc1 = _conv_stack(1, w, in_channels=in_channels, normalization=normalization)
        self.down1 = _down(w, 2 * w, normalization)
        self.enc2 = _conv_stack(2, 2 * w, normalization=normalization)
        self.down2 = _down(2 * w, 4 * w, normalization)
        self.enc3 = _conv_stack(3, 4 * w, normalization=normalization)
        self.down3 = _down(4 * w, 8 * w, normalization)
        self.enc4 = _conv_stack(3, 8 * w, normalization=normalization)
        self.down4 = _down(8 * w, 16 * w, normalization)
        self.enc5 = _conv_stack(3, 16 * w, normalization=normalization)

        self.up4 = _up(16 * w, 8 * w, normalization)
        self.dec4 = _conv_stack(3, 8 * w, normalization=normalization)
        self.up3 = _up(8 * w, 4 * w, normalization)
        self.dec3 = _conv_stack(3, 4 * w, normalization=normalization)
        self.up2 = _up(4 * w, 2 * w, normalization)
        self.dec2 = _conv_stack(2, 2 * w, normalization=normalization)
        self.up1 = _up(2 * w, w, normalization)
        self.dec1 = _conv_stack(1, w, normalization=normalization)

        # One module serves both sites: Dropout3d has no state, and each call draws its own channel mask.
        self.dropout: nn.Module = nn.Dropout3d(p=0.5) if dropout else nn.Identity()
        self.main_head = nn.Conv3d(w, num_classes, kernel_size=1)
        self.aux_head = nn.Conv3d(w, num_classes, kernel_size=1)
        self._init_weights()

    @property
    def deep_channels(self) -> int:
        """Channels of x5 (16·width), the input size a :class:`Projector` needs."""
        return 16 * self.width

    def _init_weights(self) -> None:
        # DHC's initialisation: Kaiming-normal (fan-in, ReLU gain) conv weights, BN scale 1 and shift 0.
        # Conv biases keep PyTorch's default uniform init, as in DHC.
        for m in self.modules():
            if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm3d | nn.InstanceNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise if ``x`` cannot go through the network.

        Args:
            x: image batch, (B, in_channels, D, H, W).

        Raises:
            ValueError: wrong rank, wrong channel count, or a spatial side that is not a positive multiple
                of 16 (four 2× downsamplings; the decoder could not add the skip maps back otherwise).
        """
        if x.ndim != 5:
            raise ValueError(f"VNet expects a 5-D batch (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"VNet was built for {self.in_channels} input channel(s), got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        if any(s < DOWNSAMPLE_FACTOR or s % DOWNSAMPLE_FACTOR for s in spatial):
            raise ValueError(
                f"VNet input spatial shape (D, H, W) = {spatial} has a side that is not a positive multiple of "
                f"{DOWNSAMPLE_FACTOR} (it downsamples four times by 2); crop or pad to e.g. (64, 128, 128)"
            )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder maps x1..x5 (no dropout applied).

        Args:
            x: image batch, (B, in_channels, D, H, W), sides multiples of 16.

        Returns:
            ``[x1, x2, x3, x4, x5]`` with w·(1, 2, 4, 8, 16) channels at strides (1, 2, 4, 8, 16).

        Raises:
            ValueError: see :meth:`check_input`.
        """
        self.check_input(x)
        x1 = self.enc1(x)
        x2 = self.enc2(self.down1(x1))
        x3 = self.enc3(self.down2(x2))
        x4 = self.enc4(self.down3(x3))
        x5 = self.enc5(self.down4(x4))
        return [x1, x2, x3, x4, x5]

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Decoder from the encoder maps to the last feature x9 (dropout on x5 applied here, not on x9).

        Args:
            feats: ``[x1, x2, x3, x4, x5]`` as returned by :meth:`encode`.

        Returns:
            x9, (B, width, D, H, W).
        """
        x1, x2, x3, x4, x5 = feats
        x = self.dec4(self.up4(self.dropout(x5)) + x4)
        x = self.dec3(self.up3(x) + x3)
        x = self.dec2(self.up2(x) + x2)
        return self.dec1(self.up1(x) + x1)

    def forward(self, x: torch.Tensor) -> StudentOutput:
        """Segment a batch.

        Args:
            x: image batch, (B, in_channels, D, H, W), intensities as preprocessed (e.g. [0, 1]); every
                spatial side a multiple of 16.

        Returns:
            :class:`StudentOutput` with ``logits`` and ``aux_logits`` (B, num_classes, D, H, W) and ``deep``
            = x5 (B, 16·width, D/16, H/16, W/16); ``projected`` is ``None``.

        Raises:
            ValueError: see :meth:`check_input`.
        """
        feats = self.encode(x)
        # x5 is returned before dropout: the distillation target compares encoder features, and dropping
        # half of the channels would only add noise to that comparison. The decoder still sees the dropped
        # x5, as in DHC.
        x9 = self.dropout(self.decode(feats))
        return StudentOutput(logits=self.main_head(x9), aux_logits=self.aux_head(x9), deep=feats[-1])


class Projector(nn.Module):
    """Lightweight per-location map from the student's x5 to the teacher's hidden size C_T.

    Without ``hidden``: one Conv3d 1×1×1 (with bias). With ``hidden``: Conv3d 1×1×1 → BatchNorm3d → ReLU →
    Conv3d 1×1×1. PyTorch's default init (the distillation loss L2-normalises the output, so its scale
    does not matter).

    Args:
        in_channels: channels of x5 (16·width; :attr:`VNet.deep_channels`).
        teacher_channels: the teacher's hidden size C_T (384 for ViT-S/16, 768 for ViT-B/16, ...).
        hidden: width of the optional hidden layer.

    Raises:
        ValueError: if a channel count is below 1.
    """

    def __init__(self, in_channels: int, teacher_channels: int, hidden: int | None = None) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("teacher_channels", teacher_channels), ("hidden", hidden)):
            if value is not None and value < 1:
                raise ValueError(f"Projector {name} must be at least 1, got {value}")
        self.in_channels = in_channels
        self.teacher_channels = teacher_channels
        self.hidden = hidden
        if hidden is None:
            self.net: nn.Module = nn.Conv3d(in_channels, teacher_channels, kernel_size=1)
        else:
            self.net = nn.Sequential(
                nn.Conv3d(in_channels, hidden, kernel_size=1),
                nn.BatchNorm3d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv3d(hidden, teacher_channels, kernel_size=1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project.

        Args:
            x: (B, in_channels, d, h, w).

        Returns:
            (B, teacher_channels, d, h, w), not normalised.
        """
        return self.net(x)


class DinoMixStudent(nn.Module):
    """The DINO-Mix student: :class:`VNet` (``vnet``) plus the distillation :class:`Projector` (``projector``).

    Args:
        num_classes: output classes including background.
        teacher_channels: the foundation teacher's hidden size C_T.
        width: VNet base width (32 in the peers).
        projector_hidden: hidden width of the projector; ``None`` for a single 1×1×1 conv.
        dropout: VNet dropout in training mode (see :class:`VNet`).
        in_channels: image channels.
        normalization: the VNet's ``batch`` or ``instance`` normalisation (see :class:`VNet`).
    """

    def __init__(
        self,
        num_classes: int,
        teacher_channels: int,
        width: int = 32,
        projector_hidden: int | None = None,
        dropout: bool = True,
        in_channels: int = 1,
        normalization: str = "batch",
    ) -> None:
        super().__init__()
        self.vnet = VNet(in_channels=in_channels, num_classes=num_classes, width=width, dropout=dropout,
                         normalization=normalization)
        self.projector = Projector(self.vnet.deep_channels, teacher_channels, hidden=projector_hidden)

    def forward(self, x: torch.Tensor) -> StudentOutput:
        """Segment a batch and project its x5 for distillation.

        Args:
            x: image batch, (B, in_channels, D, H, W), sides multiples of 16.

        Returns:
            :class:`StudentOutput`; ``projected`` is (B, C_T, D/16, H/16, W/16).

        Raises:
            ValueError: see :meth:`VNet.check_input`.
        """
        out = self.vnet(x)
        out.projected = self.projector(out.deep)
        return out


class EmaTeacher:
    """An exponential-moving-average copy of a network, for pseudo-labels (mean teacher).

    The copy never receives gradients (``requires_grad`` False) and stays in ``eval()``: dropout off and
    BatchNorm on its running statistics, so pseudo-labels are deterministic. It is deliberately not an
    ``nn.Module``: a parent's ``.train()`` cannot switch it back to training mode, and it does not show up
    in the student's ``parameters()`` (so no optimiser can touch it).

    Args:
        model: the student; it is deep-copied, so the two never share storage.
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float = 0.99) -> None:
        """One EMA step: θ_ema ← decay·θ_ema + (1 − decay)·θ for every parameter; buffers copied.

        Args:
            student: the network being trained; same architecture as the copy.
            decay: weight of the old EMA value in [0, 1] (0.99 in the paper; 0 copies the student).

        Raises:
            ValueError: if ``decay`` is outside [0, 1] or the parameter/buffer names differ.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        ema_params = dict(self.module.named_parameters())
        params = dict(student.named_parameters())
        ema_buffers = dict(self.module.named_buffers())
        buffers = dict(student.named_buffers())
        if ema_params.keys() != params.keys() or ema_buffers.keys() != buffers.keys():
            raise ValueError("EMA update: the student's parameter/buffer names differ from the EMA copy's")
        for name, p_ema in ema_params.items():
            # lerp_ computes θ_ema + (1 − decay)(θ − θ_ema), the same average with a single rounding (and exact
            # copies at decay 0 or 1).
            p_ema.lerp_(params[name].detach(), 1.0 - decay)
        # BatchNorm running statistics are copied rather than averaged, the common practice in mean-teacher
        # code: they are already running averages, and copying keeps them consistent with the batch
        # statistics the student's current weights produce (num_batches_tracked is an integer anyway).
        for name, b_ema in ema_buffers.items():
            b_ema.copy_(buffers[name])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the EMA copy (in eval mode, without building an autograd graph)."""
        self.module.eval()
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> EmaTeacher:
        """Move the copy like ``nn.Module.to``; returns ``self``."""
        self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The copy's state dict (parameters and buffers), for checkpoints."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore the copy from :meth:`state_dict`; it stays gradient-free and in eval mode.

        Args:
            state_dict: as saved by :meth:`state_dict`.
            strict: require exactly matching keys (``nn.Module.load_state_dict``).

        Raises:
            RuntimeError: on missing/unexpected keys (strict) or shape mismatches.
        """
        self.module.load_state_dict(state_dict, strict=strict)
        self.module.requires_grad_(False)
        self.module.eval()
