"""Losses: Dice + CE against hand formulas, true masking vs SKCDF masking, aux masks, Eq. 1, pseudo-labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stage2_train.method.losses import (
    MaskedSegLoss,
    SegLoss,
    annealed_rates,
    class_rates,
    distillation_loss,
    labeled_aux_mask,
    pseudo_labels,
    unlabeled_aux_mask,
)


def hand_ce_dice(logits: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """The peers' CE (voxel mean) and soft batch Dice over foreground classes, smooth 1, by loops.

    logits (N, C) and target (N,) for N voxels (batch and space flattened together: batch Dice).
    """
    n, c = logits.shape
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    ce = -sum(math.log(probs[v, target[v]]) for v in range(n)) / n
    dcs = []
    for k in range(1, c):
        tp = sum(probs[v, k] for v in range(n) if target[v] == k)
        fp = sum(probs[v, k] for v in range(n) if target[v] != k)
        fn = sum(1.0 - probs[v, k] for v in range(n) if target[v] == k)
        dcs.append((2 * tp + 1) / (2 * tp + fp + fn + 1))
    return ce, 1.0 - sum(dcs) / len(dcs)


def _flat(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None):
    """(B, C, *S) logits, (B, *S) target → (N, C), (N,) numpy float64, optionally only kept voxels."""
    lf = torch.movedim(logits.detach(), 1, -1).reshape(-1, logits.shape[1]).double().numpy()
    tf = target.reshape(-1).numpy()
    if keep is not None:
        k = keep.reshape(-1).numpy()
        lf, tf = lf[k], tf[k]
    return lf, tf


def _example(seed=0, shape=(2, 4, 3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    b, c, *s = shape
    logits = torch.randn(shape, generator=g) * 2
    target = torch.randint(0, c, (b, *s), generator=g)
    mask = torch.rand((b, *s), generator=g) < 0.6
    return logits, target, mask


# ---------------------------------------------------------------- SegLoss


@pytest.mark.parametrize("lam_dice, lam_ce", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)])
def test_segloss_matches_hand_dice_ce(lam_dice, lam_ce):
    logits, target, _ = _example()
    loss = SegLoss(lambda_dice=lam_dice, lambda_ce=lam_ce)(logits, target)
    ce, dice = hand_ce_dice(*_flat(logits, target))
    assert loss.item() == pytest.approx(lam_ce * ce + lam_dice * dice, rel=1e-5)


def test_segloss_tiny_example_by_hand():
    # One sample, 2 classes, 2 voxels. Logits (0, 0) → p = (0.5, 0.5); logits (0, ln 3) → p = (0.25, 0.75).
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])  # (B=1, C=2, N=2)
    target = torch.tensor([[1, 1]])
    # CE = (-ln 0.5 - ln 0.75) / 2; class 1: tp = 0.5 + 0.75 = 1.25, fp = 0, fn = 0.5 + 0.25 = 0.75.
    ce = (math.log(2.0) - math.log(0.75)) / 2
    dc = (2 * 1.25 + 1) / (2 * 1.25 + 0 + 0.75 + 1)
    assert SegLoss()(logits, target).item() == pytest.approx(ce + 1 - dc, rel=1e-6)


def test_segloss_rejects_bad_inputs():
    logits, target, _ = _example()
    with pytest.raises(ValueError):
        SegLoss()(logits, target[:, :2])
    with pytest.raises(TypeError):
        SegLoss()(logits, target.float())


# ---------------------------------------------------------------- masked aux loss


@pytest.mark.parametrize("lam_dice, lam_ce", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)])
def test_exclusion_equals_loss_on_kept_voxels_alone(lam_dice, lam_ce):
    logits, target, mask = _example(1)
    logits.requires_grad_(True)
    loss = MaskedSegLoss(mode="exclude", lambda_dice=lam_dice, lambda_ce=lam_ce)(logits, target, mask)
    # Reference 1: hand formulas on the kept voxels gathered into a flat list (no MONAI).
    ce, dice = hand_ce_dice(*_flat(logits, target, mask))
    assert loss.item() == pytest.approx(lam_ce * ce + lam_dice * dice, rel=1e-5)
    # Reference 2: the unmasked SegLoss on a smaller (1, C, K) tensor of the kept voxels; same gradients.
    kept_logits = torch.movedim(logits, 1, -1)[mask].T.unsqueeze(0)  # (1, C, K)
    kept_target = target[mask].unsqueeze(0)  # (1, K)
    ref = SegLoss(lambda_dice=lam_dice, lambda_ce=lam_ce)(kept_logits, kept_target)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    (g,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    # Exactly zero gradient at masked voxels, and the kept voxels' gradient is the reference's.
    assert torch.all(torch.movedim(g, 1, -1)[~mask] == 0)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


def test_segloss_weight_mask_is_exclusion():
    logits, target, mask = _example(2)
    a = SegLoss()(logits, target, weight_mask=mask)
    b = MaskedSegLoss(mode="exclude")(logits, target, mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert SegLoss()(logits, target, weight_mask=torch.ones_like(mask)).item() == pytest.approx(
        SegLoss()(logits, target).item(), rel=1e-5
    )


@pytest.mark.parametrize("mode", ["exclude", "weighted"])
def test_all_masked_gives_zero_with_graph(mode):
    logits, target, mask = _example(3)
    logits.requires_grad_(True)
    loss = MaskedSegLoss(mode=mode)(logits, target, torch.zeros_like(mask))
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)


def test_skcdf_mode_counts_masked_voxels_hand_computed():
    # 1 sample, C = 3, 4 voxels; voxels 2 and 3 are masked.
    logits = torch.tensor([[[2.0, 0.0, 5.0, -1.0], [0.0, 1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]]])
    target = torch.tensor([[0, 1, 2, 1]])
    mask = torch.tensor([[True, True, False, False]])
    # Kept voxels as they are: v0 logits (2, 0, 0), target 0; v1 logits (0, 1, 0), target 1.
    # Masked voxels become logits (0, 0, 0) → p = (1/3, 1/3, 1/3), target 0 (background).
    e2 = math.exp(2.0)
    p0 = [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)]
    e1 = math.exp(1.0)
    p1 = [1 / (e1 + 2), e1 / (e1 + 2), 1 / (e1 + 2)]
    third = 1 / 3
    ce = (-math.log(p0[0]) - math.log(p1[1]) - 2 * math.log(third)) / 4  # masked voxels count: ln 3 each
    # Class 1: tp = p1[1]; fp = p0[1] + 2/3 (1/3 per masked voxel); fn = 1 - p1[1].
    dc1 = (2 * p1[1] + 1) / (2 * p1[1] + p0[1] + 2 * third + (1 - p1[1]) + 1)
    # Class 2: no target voxel: tp = 0, fn = 0; fp = p0[2] + p1[2] + 2/3.
    dc2 = 1 / (p0[2] + p1[2] + 2 * third + 1)
    expected = ce + 1 - (dc1 + dc2) / 2
    lg = logits.clone().requires_grad_(True)
    skcdf = MaskedSegLoss(mode="skcdf")(lg, target, mask)
    assert skcdf.item() == pytest.approx(expected, rel=1e-6)
    skcdf.backward()
    assert torch.all(lg.grad[..., 2:] == 0)  # no gradient from masked voxels, but they count in the value
    # True exclusion: only v0 and v1 (class 2 has tp = 0, fp = p0[2] + p1[2], fn = 0).
    ce_x = (-math.log(p0[0]) - math.log(p1[1])) / 2
    dc1_x = (2 * p1[1] + 1) / (2 * p1[1] + p0[1] + (1 - p1[1]) + 1)
    dc2_x = 1 / (p0[2] + p1[2] + 1)
    excl = MaskedSegLoss(mode="exclude")(logits, target, mask)
    assert excl.item() == pytest.approx(ce_x + 1 - (dc1_x + dc2_x) / 2, rel=1e-6)
    assert abs(excl.item() - skcdf.item()) > 0.1


def test_skcdf_mode_equals_plain_loss_on_multiplied_inputs():
    logits, target, mask = _example(4)
    a = MaskedSegLoss(mode="skcdf")(logits, target, mask)
    b = SegLoss()(logits * mask.unsqueeze(1), target * mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    with pytest.raises(ValueError):
        MaskedSegLoss(mode="drop")


# ---------------------------------------------------------------- rates and Bernoulli masks


def test_class_rates():
    # min over present = 10: r = [10/1000, 10/100, (absent → 1), 10/10].
    np.testing.assert_allclose(class_rates([1000, 100, 0, 10]), [0.01, 0.1, 1.0, 1.0])
    for bad in ([0, 0], [5, -1], []):
        with pytest.raises(ValueError):
            class_rates(bad)


def _labels(n_per_class=40000, n_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(n_classes).repeat_interleave(n_per_class)
    return lab[torch.randperm(lab.numel(), generator=g)].reshape(4, 10, 40, -1)


def test_labeled_mask_keep_rates_converge():
    rates = np.array([0.05, 0.3, 0.7, 1.0])
    lab = _labels()
    keep = labeled_aux_mask(lab, rates, torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and keep.shape == lab.shape
    for c, r in enumerate(rates):
        frac = keep[lab == c].float().mean().item()
        assert frac == pytest.approx(r, abs=0.01)
    assert keep[lab == 3].all()  # rate 1 keeps every voxel
    again = labeled_aux_mask(lab, rates, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_unlabeled_mask_annealing():
    rates = np.array([0.05, 0.3, 0.7, 1.0])
    lab = _labels(seed=1)
    g = torch.Generator().manual_seed(1)
    assert unlabeled_aux_mask(lab, rates, 0, 100, g).all()  # E = 0 keeps all
    end = unlabeled_aux_mask(lab, rates, 100, 100, g)
    half = unlabeled_aux_mask(lab, rates, 50, 100, g)
    for c, r in enumerate(rates):
        assert end[lab == c].float().mean().item() == pytest.approx(r, abs=0.01)
        assert half[lab == c].float().mean().item() == pytest.approx(1 - 0.5 * (1 - r), abs=0.01)
    np.testing.assert_allclose(annealed_rates(rates, 250, 100), rates)  # clipped past E_max
    with pytest.raises(ValueError):
        labeled_aux_mask(torch.tensor([0, 4]), rates)


# ---------------------------------------------------------------- distillation (Eq. 1)


def test_distillation_hand_example():
    # (B, C, d, h, w) = (1, 2, 1, 1, 2): two channels at two locations.
    proj = torch.tensor([[3.0, 0.0], [4.0, 2.0]]).reshape(1, 2, 1, 1, 2).requires_grad_(True)
    targ = torch.tensor([[1.0, 0.0], [0.0, 5.0]]).reshape(1, 2, 1, 1, 2).requires_grad_(True)
    # Location 0: (3, 4)/5 = (0.6, 0.8) vs (1, 0): diff (-0.4, 0.8), squared 0.16 + 0.64 = 0.8.
    # Location 1: (0, 2)/2 = (0, 1) vs (0, 5)/5 = (0, 1): 0.
    loss = distillation_loss(proj, targ)  # Eq. 1: squared distance per location, mean over the 2 locations
    assert loss.item() == pytest.approx(0.8 / 2)
    assert distillation_loss(proj, targ, reduction="mean").item() == pytest.approx(0.8 / 4)  # and over 2 channels
    loss.backward()
    assert targ.grad is None  # stop-gradient on the teacher target
    assert proj.grad is not None and proj.grad.abs().sum() > 0


def test_distillation_zero_for_positive_scale_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(2, 8, 2, 3, 3, generator=g)
    # Each location scaled by its own positive factor: directions unchanged.
    scale = torch.rand(2, 1, 2, 3, 3, generator=g) * 5 + 0.1
    assert distillation_loss(proj, proj * scale).item() == pytest.approx(0.0, abs=1e-12)
    assert distillation_loss(proj, -proj).item() == pytest.approx(4.0)  # |u - (-u)|² = 4 per location
    assert distillation_loss(proj, -proj, reduction="mean").item() == pytest.approx(4 / 8)
    with pytest.raises(ValueError):
        distillation_loss(proj, proj[:, :4])


def test_distillation_is_two_minus_two_cosine_per_location():
    # Eq. 1 on crafted vectors: |u/|u| - v/|v||² = 2 - 2 cos(u, v) at each location, averaged over locations.
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(2, 16, 1, 2, 3, generator=g, dtype=torch.float64)
    targ = torch.randn(2, 16, 1, 2, 3, generator=g, dtype=torch.float64)
    u = np.moveaxis(proj.numpy(), 1, -1).reshape(-1, 16)
    v = np.moveaxis(targ.numpy(), 1, -1).reshape(-1, 16)
    cos = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
    assert distillation_loss(proj, targ).item() == pytest.approx(float(np.mean(2 - 2 * cos)), rel=1e-5)
    assert distillation_loss(proj, targ, reduction="mean").item() == pytest.approx(float(np.mean(2 - 2 * cos)) / 16,
                                                                                  rel=1e-5)
    with pytest.raises(ValueError):
        distillation_loss(proj, targ, reduction="sum")  # type: ignore[arg-type]


# ---------------------------------------------------------------- masked-loss conventions against peer formulas


def _crafted(seed=7, shape=(2, 5, 4, 6, 6), keep=0.05):
    """Logits, labels and a sparse keep mask (about ``keep`` of the voxels), as a confident mask is early on."""
    logits, target, _ = _example(seed, shape)
    mask = torch.rand(target.shape, generator=torch.Generator().manual_seed(seed + 1)) < keep
    return logits, target, mask


def test_weighted_ce_is_most_thresholded_ce():
    # MOST: CE with ignore_index on unconfident voxels, reduction "none", then the mean over ALL voxels.
    logits, target, mask = _crafted()
    ignored = torch.where(mask, target, torch.full_like(target, 255))
    most = torch.nn.functional.cross_entropy(logits, ignored, ignore_index=255, reduction="none").mean()
    ours = SegLoss(lambda_dice=0.0, weighting="weighted")(logits, target, weight_mask=mask)
    assert ours.item() == pytest.approx(most.item(), rel=1e-6)
    # "exclude" is the same sum over the kept voxels divided by their count: 1/keep-fraction times larger.
    excl = SegLoss(lambda_dice=0.0, weighting="exclude")(logits, target, weight_mask=mask)
    assert excl.item() == pytest.approx(most.item() * mask.numel() / mask.sum().item(), rel=1e-6)


def test_weighted_aux_is_abc_masked_mean_plus_masked_dice():
    # ABC: -mean over all samples of mask · Σ_c y_c log p_c (masked samples count as 0); the Dice of the
    # kept voxels is MONAI's MaskedDiceLoss.
    from monai.losses import MaskedDiceLoss

    logits, target, mask = _crafted(seed=9, keep=0.2)
    log_p = torch.log_softmax(logits, dim=1)
    one_hot = torch.nn.functional.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    abc = -(mask * (one_hot * log_p).sum(1)).mean()
    dice = MaskedDiceLoss(include_background=False, softmax=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)(
        logits, one_hot, mask=mask.unsqueeze(1).float())
    ours = MaskedSegLoss(mode="weighted")(logits, target, mask)
    assert ours.item() == pytest.approx(abc.item() + dice.item(), rel=1e-6)


def test_skcdf_aux_ce_gradient_equals_weighted():
    # SKCDF's multiply adds a constant log C per masked voxel to the CE and nothing to its gradient: its CE
    # weighs a kept voxel 1/N, as "weighted" does.
    logits, target, mask = _crafted(seed=11, keep=0.1)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    skcdf = MaskedSegLoss(mode="skcdf", lambda_dice=0.0)(a, target, mask)
    weighted = MaskedSegLoss(mode="weighted", lambda_dice=0.0)(b, target, mask)
    masked_share = 1 - mask.float().mean().item()
    assert skcdf.item() == pytest.approx(weighted.item() + masked_share * math.log(logits.shape[1]), rel=1e-6)
    skcdf.backward()
    weighted.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)


def test_unknown_weighting_refused():
    with pytest.raises(ValueError):
        SegLoss(weighting="kept")  # type: ignore[arg-type]


# ---------------------------------------------------------------- pseudo-labels


def test_pseudo_labels_threshold():
    # Two voxels, 3 classes: probs (0.96, 0.02, 0.02) and (0.2, 0.5, 0.3).
    probs = torch.tensor([[0.96, 0.2], [0.02, 0.5], [0.02, 0.3]]).reshape(1, 3, 1, 1, 2)
    logits = probs.log().requires_grad_(True)
    labels, conf = pseudo_labels(logits, 0.95)
    assert labels.dtype == torch.long and labels.shape == (1, 1, 1, 2)
    assert labels.flatten().tolist() == [0, 1]
    assert conf.flatten().tolist() == [True, False]
    assert pseudo_labels(logits, 0.0)[1].all()
    assert pseudo_labels(logits, 0.5)[1].flatten().tolist() == [True, True]  # >= τ counts as confident
    assert not labels.requires_grad and not conf.requires_grad


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_dice_ce_equals_monai_value_and_gradient(weighted, include_background):
    from monai.losses import DiceCELoss, MaskedDiceLoss

    logits, target, mask = _example(4, shape=(2, 5, 4, 6, 7))
    weight = (mask.float() * torch.rand(mask.shape, generator=torch.Generator().manual_seed(5))) if weighted else None
    dice = dict(include_background=include_background, softmax=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)
    a = logits.clone().requires_grad_(True)
    loss = SegLoss(include_background=include_background)(a, target, weight_mask=weight)
    b = logits.clone().requires_grad_(True)
    if weight is None:
        ref = DiceCELoss(to_onehot_y=True, **dice)(b, target.unsqueeze(1))
    else:
        one_hot = torch.nn.functional.one_hot(target, 5).movedim(-1, 1).float()
        ce = (weight * torch.nn.functional.cross_entropy(b, target, reduction="none")).sum() / weight.sum()
        ref = ce + MaskedDiceLoss(**dice)(b, one_hot, mask=weight.unsqueeze(1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def test_skcdf_inert_part_is_the_masked_voxels_constant():
    logits, target, mask = _crafted(seed=13, keep=0.1)
    skcdf = MaskedSegLoss(mode="skcdf", lambda_dice=0.0)
    weighted = MaskedSegLoss(mode="weighted", lambda_dice=0.0)
    inert = skcdf.inert(mask, logits.shape[1])
    assert skcdf(logits, target, mask).item() - inert == pytest.approx(weighted(logits, target, mask).item(), rel=1e-5)
    assert weighted.inert(mask, logits.shape[1]) == 0.0
