"""The DINO-Mix student: the DHC/SKCDF VNet with an auxiliary balanced head, and a projector.

* :class:`VNet` is the five-level VNet of the DHC/SKCDF lineage (see docs/protocol.md, VNet): BatchNorm + ReLU,
  strided-conv downsampling, transposed-conv upsampling and skip connections by **addition**. It is not
  MONAI's ``VNet`` (that one concatenates skips, has residual blocks and 16 base channels). Besides the
  main 1×1×1 classifier it carries SKCDF's auxiliary balanced classifier on the same last decoder feature
  (see docs/protocol.md, VNet).
* :class:`Projector` maps the deepest encoder map x5 (stride 16) to the foundation teacher's hidden size
  C_T for feature distillation.
* :class:`DinoMixStudent` bundles both; its forward returns a :class:`StudentOutput`.
* The EMA copy of the student that pseudo-labels is :class:`stage2_train.method.ema.EmaTeacher`.

Shapes use (B, C, D, H, W); D is the axial (slice) axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

__all__ = [
    "DOWNSAMPLE_FACTOR",
    "NORMALIZATIONS",
    "Normalization",
    "DinoMixStudent",
    "Projector",
    "StudentOutput",
    "VNet",
    "count_parameters",
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


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module``.

    Args:
        module: any module.
        trainable_only: count only parameters with ``requires_grad`` set.

    Returns:
        The total number of elements over ``module.parameters()`` (shared parameters counted once).
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


Normalization = Literal["batch", "instance"]
NORMALIZATIONS: tuple[Normalization, ...] = get_args(Normalization)


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
