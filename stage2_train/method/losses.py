"""Losses of DINO-Mix (Eq. 1 and Eq. 5): Dice + CE, the masked auxiliary (class-balance) loss,
the feature distillation loss, pseudo-labels, and the aux Bernoulli masks.

Segmentation loss convention (DHC / SKCDF ``DC_and_CE_loss``):
``L = 1·CE + 1·Dice``, CE the voxel mean of ``nn.CrossEntropyLoss`` on logits, Dice the soft batch Dice
over the foreground classes on the softmax:
``dc_c = (2 tp_c + 1) / (2 tp_c + fp_c + fn_c + 1)`` with tp/fp/fn summed over batch and space and
``Dice = 1 - mean_{c >= 1} dc_c`` (SKCDF; DHC's ``-mean`` differs by a constant only).
In MONAI terms: ``DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
smooth_nr=1, smooth_dr=1, squared_pred=False, jaccard=False, lambda_dice=1, lambda_ce=1)`` — MONAI
computes ``1 - (2 tp + smooth_nr) / (2 tp + fp + fn + smooth_dr)`` (it halves fp and fn, then doubles
the whole denominator). The peers' extra ``1e-8`` in the denominator is dropped. :func:`dice_ce`
computes the same values without a one-hot tensor (``2 tp + fp + fn`` is the sum of the predicted and
the true class mass), which halves the loss's share of a CPU training step; the tests compare it with
MONAI's ``DiceCELoss`` and ``MaskedDiceLoss``.

Masked terms (``L_unsup`` under its box | confident mask, the aux terms under their Bernoulli masks) come
in named conventions (:data:`MaskWeighting`, :data:`AuxMode`) that decide how much a kept voxel weighs;
``docs/method.md`` ("How much each term weighs") states each term's effective weight.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AUX_MODES",
    "FKD_REDUCTIONS",
    "MASK_WEIGHTINGS",
    "AuxMode",
    "FkdReduction",
    "MaskWeighting",
    "MaskedSegLoss",
    "SegLoss",
    "annealed_rates",
    "class_rates",
    "dice_ce",
    "distillation_loss",
    "labeled_aux_mask",
    "pseudo_labels",
    "unlabeled_aux_mask",
]

# How a masked Dice + CE weighs its kept voxels. "weighted": the mask is a per-voxel weight over all
# voxels, CE = sum(w * CE_v) / N (MOST's thresholded loss, FixMatch / ABC: the kept fraction scales the
# term); "exclude": CE = sum(w * CE_v) / sum(w), the mean over the kept voxels only. The Dice is the
# masked soft Dice in both (probabilities and one-hot targets multiplied by the mask).
MaskWeighting = Literal["weighted", "exclude"]
MASK_WEIGHTINGS: tuple[MaskWeighting, ...] = get_args(MaskWeighting)
# How the auxiliary balanced head's loss treats the voxels its mask drops (see :class:`MaskedSegLoss`):
# SKCDF's multiply (the paper's reference for the aux terms), or one of the two weightings above.
AuxMode = Literal["skcdf", "weighted", "exclude"]
AUX_MODES: tuple[AuxMode, ...] = get_args(AuxMode)
# Eq. 1's reduction over the teacher's C channels (see :func:`distillation_loss`).
FkdReduction = Literal["channel_sum", "mean"]
FKD_REDUCTIONS: tuple[FkdReduction, ...] = get_args(FkdReduction)


# ----------------------------------------------------------------------------------------------
# class-balance (ABC / SKCDF) Bernoulli masks
# ----------------------------------------------------------------------------------------------


def class_rates(class_voxels) -> np.ndarray:
    """Keep rates ``r_c = min_k N_k / N_c`` of the auxiliary class-balance masks.

    ``min_k`` runs over the classes with ``N_k > 0`` (background included), so the rarest present
    class has ``r = 1`` and the background (usually the largest) the smallest rate. A class with
    ``N_c = 0`` (never seen in the labeled data) gets ``r_c = 1``: its voxels (e.g. pseudo-labelled
    ones) are always kept. (SKCDF does not guard this case and would divide by zero.)

    Args:
        class_voxels: the C class voxel counts ``N_c`` (array-like, shape (C,)).

    Returns:
        float64 array of shape (C,), values in (0, 1].

    Raises:
        ValueError: if a count is negative or not finite, or all counts are 0.
    """
    if isinstance(class_voxels, torch.Tensor):
        class_voxels = class_voxels.detach().cpu().numpy()
    counts = np.asarray(class_voxels, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_voxels must be a non-empty 1-D sequence, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"class_voxels must be finite and non-negative, got {counts.tolist()}")
    present = counts > 0
    if not present.any():
        raise ValueError("class_voxels are all 0")
    rates = np.ones_like(counts)
    rates[present] = counts[present].min() / counts[present]
    return rates


def annealed_rates(rates, epoch: float, max_epoch: float) -> np.ndarray:
    """Unlabeled keep rates ``r'_c = 1 - (E / E_max)(1 - r_c)``: 1 at E = 0, ``r_c`` at E = E_max.

    ``E / E_max`` is clipped to [0, 1] (past E_max the rates stay at ``r_c``).
    """
    if not max_epoch > 0:
        raise ValueError(f"max_epoch must be > 0, got {max_epoch}")
    t = min(1.0, max(0.0, float(epoch) / float(max_epoch)))
    r = np.asarray(rates.detach().cpu().numpy() if isinstance(rates, torch.Tensor) else rates, dtype=np.float64)
    return 1.0 - t * (1.0 - r)


def _bernoulli_keep(labels: torch.Tensor, rates, generator: torch.Generator | None) -> torch.Tensor:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    r = torch.as_tensor(np.asarray(rates, dtype=np.float64), dtype=torch.float64)
    if r.ndim != 1:
        raise ValueError("rates must be 1-D (one per class)")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= r.numel()):
        raise ValueError(f"labels must lie in [0, {r.numel()})")
    p = r.to(labels.device)[labels.long()]
    gen_device = generator.device if generator is not None else labels.device
    u = torch.rand(labels.shape, generator=generator, device=gen_device, dtype=torch.float64).to(labels.device)
    return u < p


def labeled_aux_mask(labels: torch.Tensor, rates, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-voxel Bernoulli keep mask of the labeled aux loss: keep voxel v with ``p = r_{y_v}``.

    Args:
        labels: (B, D, H, W) integer ground truth (any shape works).
        rates: the C keep rates (from :func:`class_rates`).
        generator: torch generator (CPU or on the labels' device); None → torch's global RNG.

    Returns:
        bool tensor of the labels' shape and device, True = kept.
    """
    return _bernoulli_keep(labels, rates, generator)


def unlabeled_aux_mask(
    pseudo_aux: torch.Tensor, rates, epoch: float, max_epoch: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-voxel Bernoulli keep mask of the unlabeled aux loss: ``p = 1 - (E / E_max)(1 - r_ŷ)``.

    Args:
        pseudo_aux: (B, D, H, W) the aux head's own pseudo-label ŷ_aux (integer).
        rates: the C keep rates ``r_c`` (from :func:`class_rates`).
        epoch: E; ``E / E_max`` is clipped to [0, 1] (E = 0 keeps every voxel).
        max_epoch: E_max (> 0).
        generator: torch generator (CPU or on the labels' device); None → torch's global RNG.

    Returns:
        bool tensor of the labels' shape and device, True = kept.
    """
    return _bernoulli_keep(pseudo_aux, annealed_rates(rates, epoch, max_epoch), generator)


# ----------------------------------------------------------------------------------------------
# segmentation losses
# ----------------------------------------------------------------------------------------------


def _check_seg_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got {tuple(logits.shape)}")
    if tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"target must be (B, *spatial) = {(logits.shape[0], *logits.shape[2:])}, got {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer label tensor, got {target.dtype}")
    if logits.shape[1] < 2:
        raise ValueError("logits need at least 2 classes (softmax over classes)")


def dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
            lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth: float = 1.0,
            include_background: bool = False, weighting: MaskWeighting = "exclude") -> torch.Tensor:
    """``lambda_ce · CE + lambda_dice · (1 - mean_c dc_c)``, soft batch Dice, in float32, without one-hot.

    With voxel weights w (``weight``; None = all 1) and p = softmax(logits), g = one-hot(target):
    ``CE = Σ w · (-log p_y) / Σ w`` (``weighting="exclude"``) or ``/ N``, N the number of voxels
    (``weighting="weighted"``), ``tp_c = Σ w² p_c g_c``, ``dc_c = (2 tp_c + smooth) /
    (Σ w p_c + Σ w g_c + smooth)``, sums over batch and space, c over the foreground classes (all with
    ``include_background``). This is MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, batch=True)``
    without weights and ``MaskedDiceLoss`` (inputs and targets multiplied by the mask) + weighted CE with
    them: ``2 tp + fp + fn = Σ w p_c + Σ w g_c``, so only the true class's probability is gathered.

    Args:
        logits: (B, C, *spatial) raw scores.
        target: (B, *spatial) integer labels in [0, C).
        weight: optional (B, *spatial) bool or non-negative float voxel weights.
        weighting: the CE's denominator with weights (see :data:`MaskWeighting`).

    Returns:
        scalar loss (0 with a graph when every weight is 0).
    """
    b, c = logits.shape[:2]
    z = logits.float().reshape(b, c, -1)
    y = target.reshape(b, 1, -1).long()
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    log_p_y, p_y = log_p.gather(1, y), p.gather(1, y)  # (B, 1, S): the true class only
    classes = y.reshape(-1)
    if weight is None:
        ce = -log_p_y.mean()
        pred_mass = p.sum(dim=(0, 2))
        true_mass = torch.bincount(classes, minlength=c).to(z.dtype)
        tp = z.new_zeros(c).index_add(0, classes, p_y.reshape(-1))
    else:
        w = weight.reshape(b, 1, -1).to(device=z.device, dtype=z.dtype)
        norm = w.sum().clamp_min(1e-12) if weighting == "exclude" else float(w.numel())
        ce = -(w * log_p_y).sum() / norm
        pred_mass = torch.bmm(p, w.transpose(1, 2)).sum(dim=(0, 2))  # Σ w p_c without a (B, C, S) product
        true_mass = torch.bincount(classes, weights=w.reshape(-1), minlength=c).to(z.dtype)
        tp = z.new_zeros(c).index_add(0, classes, (w * w * p_y).reshape(-1))
    first = 0 if include_background else 1
    dc = (2 * tp[first:] + smooth) / (pred_mass[first:] + true_mass[first:] + smooth)
    return lambda_ce * ce + lambda_dice * (1 - dc.mean())


class SegLoss(nn.Module):
    """Dice + CE of the main head (``L_sup``, ``L_unsup``): MONAI's ``DiceCELoss``, by :func:`dice_ce`.

    ``loss = lambda_ce · mean_v CE_v + lambda_dice · (1 - mean_{c >= 1} dc_c)`` with
    ``dc_c = (2 tp_c + smooth) / (2 tp_c + fp_c + fn_c + smooth)`` on softmax probabilities and one-hot
    targets, tp/fp/fn summed over batch and space (batch Dice), background excluded from the Dice
    (not from the CE). Logits are cast to float32 first (safe under bf16 autocast).

    With a ``weight_mask`` (B, *spatial), bool or non-negative float: voxel v counts with weight
    ``w_v`` — the Dice uses probabilities and one-hot targets multiplied by ``w_v`` (MONAI
    ``MaskedDiceLoss``), and CE is ``Σ w_v CE_v / N`` over all N voxels (``weighting="weighted"``: the
    kept fraction scales it, as MOST's and FixMatch's masked losses) or ``Σ w_v CE_v / Σ w_v``
    (``"exclude"``: the mean over the kept voxels, however few). An all-zero mask gives loss 0 with a graph.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the CE term.
        smooth: the ``+1`` of the peers' Dice, MONAI ``smooth_nr = smooth_dr = smooth``.
        include_background: include class 0 in the Dice (peers: False).
        weighting: the CE's denominator under a ``weight_mask`` (:data:`MaskWeighting`).
    """

    def __init__(
        self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth: float = 1.0, include_background: bool = False,
        weighting: MaskWeighting = "exclude",
    ) -> None:
        super().__init__()
        if weighting not in MASK_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {MASK_WEIGHTINGS}, got {weighting!r}")
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.smooth = float(smooth)
        self.include_background = include_background
        self.weighting: MaskWeighting = weighting

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            logits: (B, C, D, H, W) raw scores.
            target: (B, D, H, W) integer labels in [0, C).
            weight_mask: optional (B, D, H, W) bool / float voxel weights (see the class docstring).

        Returns:
            scalar loss.
        """
        _check_seg_inputs(logits, target)
        if weight_mask is None:
            return dice_ce(logits, target, None, self.lambda_dice, self.lambda_ce, self.smooth,
                           self.include_background)
        return self.weighted(logits, target, weight_mask)

    def weighted(self, logits: torch.Tensor, target: torch.Tensor, weight_mask: torch.Tensor) -> torch.Tensor:
        """Dice + CE with per-voxel weights (see the class docstring)."""
        _check_seg_inputs(logits, target)
        if tuple(weight_mask.shape) != tuple(target.shape):
            raise ValueError(
                f"weight_mask must have the target's shape {tuple(target.shape)}, got {tuple(weight_mask.shape)}"
            )
        return dice_ce(logits, target, weight_mask, self.lambda_dice, self.lambda_ce, self.smooth,
                       self.include_background, self.weighting)


class MaskedSegLoss(nn.Module):
    """The auxiliary class-balance loss (``L_sup^aux``, ``L_unsup^aux``): Dice + CE under a keep mask.

    Modes:
        ``"skcdf"`` (default; the paper's aux terms follow SKCDF): logits and labels are multiplied by the
        mask, then the plain Dice + CE is taken. A masked voxel has zero logits (uniform softmax 1/C) and
        target 0 (background): it gives no gradient but still counts in the CE mean (adding log C), so a
        kept voxel's CE weighs 1/N as in ``"weighted"``, and it adds 1/C false-positive mass to every
        foreground class in the Dice, which damps the Dice's gradient as the kept fraction falls. An
        all-masked batch is not 0 in this mode.

        ``"weighted"`` (ABC's per-sample masks, per voxel): the mask is a per-voxel weight over all N
        voxels — CE is ``Σ m CE_v / N`` — and the Dice is the masked soft Dice of the kept voxels (as in
        ``"exclude"``). All voxels masked → 0.

        ``"exclude"`` (true masking): masked voxels are left out entirely — CE is the mean
        over the kept voxels only, and the soft batch Dice is computed over the kept voxels only
        (MONAI ``MaskedDiceLoss``: softmax first, then probabilities and one-hot targets are multiplied
        by the mask, so a masked voxel adds nothing to any class's tp, fp or fn). The value equals
        :class:`SegLoss` on the kept voxels gathered into a smaller tensor; with a keep fraction f, a
        kept voxel weighs 1/f times a ``"weighted"`` one. All voxels masked → 0 (with a graph, zero
        gradient, no NaN).

    Args:
        mode: ``"skcdf"``, ``"weighted"`` or ``"exclude"``.
        lambda_dice, lambda_ce, smooth, include_background: as in :class:`SegLoss`.
    """

    MODES = AUX_MODES

    def __init__(
        self,
        mode: str = "skcdf",
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth: float = 1.0,
        include_background: bool = False,
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.seg = SegLoss(lambda_dice, lambda_ce, smooth, include_background,
                           weighting="exclude" if mode == "skcdf" else mode)  # type: ignore[arg-type]

    def inert(self, mask: torch.Tensor, num_classes: int) -> float:
        """The part of this loss's value that carries no gradient: in ``"skcdf"`` mode each masked voxel adds
        ``log C`` to the CE mean, so ``lambda_ce · (1 - kept fraction) · log C``; 0 in the other modes.
        (Its share of a total loss says nothing of what the term weighs; the training log subtracts it.)"""
        if self.mode != "skcdf":
            return 0.0
        return self.seg.lambda_ce * (1.0 - float(mask.float().mean())) * math.log(num_classes)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: (B, C, D, H, W) raw scores of the aux head.
            target: (B, D, H, W) integer labels (ground truth or the aux pseudo-label).
            mask: (B, D, H, W) bool keep mask (True = kept), e.g. from :func:`labeled_aux_mask`.

        Returns:
            scalar loss.
        """
        _check_seg_inputs(logits, target)
        if tuple(mask.shape) != tuple(target.shape):
            raise ValueError(f"mask must have the target's shape {tuple(target.shape)}, got {tuple(mask.shape)}")
        if self.mode != "skcdf":
            return self.seg.weighted(logits, target, mask)
        keep = mask.to(device=logits.device)
        masked_logits = logits.float() * keep.unsqueeze(1).to(torch.float32)
        masked_target = target.long() * keep.long()
        return self.seg(masked_logits, masked_target)


# ----------------------------------------------------------------------------------------------
# distillation (Eq. 1) and pseudo-labels
# ----------------------------------------------------------------------------------------------


def distillation_loss(
    projected: torch.Tensor, target: torch.Tensor, reduction: FkdReduction = "channel_sum", eps: float = 1e-12
) -> torch.Tensor:
    """Feature distillation, Eq. 1: MSE between L2-normalised student projection and teacher target.

    Both tensors are L2-normalised over the channel axis at every location (``F.normalize``, dim 1;
    a zero vector stays zero), the target is detached (stop-gradient), then:

    - ``reduction="channel_sum"`` (Eq. 1 as written, the run default): the squared L2 norm of the
      difference over channels at each location, ``|u - v|² = 2 - 2 cos(u, v) ∈ [0, 4]``, averaged over
      batch and locations.
    - ``reduction="mean"``: ``F.mse_loss``, the mean over channels too, i.e. Eq. 1 divided by C (0.0052
      for a ViT-S teacher where Eq. 1 is about 2).

    Computed in float32.

    Args:
        projected: (B, C, d, h, w) the projector output P(E_S(x_mix)).
        target: (B, C, d, h, w) the teacher features on the same grid.
        reduction: ``"channel_sum"`` or ``"mean"``.
        eps: the norm floor of ``F.normalize``.

    Returns:
        scalar loss; gradient flows into ``projected`` only.
    """
    if tuple(projected.shape) != tuple(target.shape):
        raise ValueError(f"shapes differ: projected {tuple(projected.shape)} vs target {tuple(target.shape)}")
    if projected.ndim < 2:
        raise ValueError("expected (B, C, ...) tensors")
    u = F.normalize(projected.float(), dim=1, eps=eps)
    v = F.normalize(target.detach().float(), dim=1, eps=eps)
    sq = (u - v).square()
    if reduction == "mean":
        return sq.mean()
    if reduction == "channel_sum":
        return sq.sum(dim=1).mean()
    raise ValueError(f"reduction must be 'mean' or 'channel_sum', got {reduction!r}")


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and their confidence mask.

    Args:
        logits: (B, C, D, H, W) raw scores (e.g. of the EMA teacher on the weak view).
        threshold: τ; a voxel is confident where its max softmax probability is ``>= τ``
            (τ = 0 → every voxel is confident).

    Returns:
        ``(labels, confident)``: (B, D, H, W) long argmax of the softmax and (B, D, H, W) bool,
        both detached.
    """
    if logits.ndim < 2:
        raise ValueError("expected (B, C, ...) logits")
    probs = torch.softmax(logits.detach().float(), dim=1)
    conf, labels = probs.max(dim=1)
    return labels.long(), conf >= threshold
