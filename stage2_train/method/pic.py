"""Progressive Imbalance-aware CutMix (PIC), the paper's Eq. 2-4.

Per unlabeled sample: draw a class ``c ~ P_E`` (a blend of a class-balanced and a uniform distribution
that moves towards uniform as training goes on), draw one voxel of class ``c`` in the paired labeled
crop (if ``c`` is absent there, redraw from the classes present), centre a box there (clipped to the
crop), cut it from the labeled crop and paste it at the same position into the strongly augmented
unlabeled crop. The target of the mixed crop is the ground truth inside the box and the pseudo-label
outside it.

Eq. 2: ``I_c = min_j N_j / N_c``; Eq. 3: ``P_bal(c) = I_c^γ / Σ_j I_j^γ``;
Eq. 4: ``P_E = (1 - α) P_bal + α P_uni``, ``α = min(1, E / (η E_max))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dinomix_cache.errors import SettingsError

__all__ = [
    "PicSettings",
    "box_size_for",
    "pic_batch",
    "pic_box",
    "pic_distribution",
    "pic_mix",
    "progressive_alpha",
    "sample_class",
]

Box = tuple[slice, slice, slice]


def _counts(class_voxels) -> np.ndarray:
    """Class voxel counts as a 1-D float64 array, validated."""
    if isinstance(class_voxels, torch.Tensor):
        class_voxels = class_voxels.detach().cpu().numpy()
    counts = np.asarray(class_voxels, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_voxels must be a non-empty 1-D sequence, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)):
        raise ValueError("class_voxels must be finite")
    if np.any(counts < 0):
        raise ValueError(f"class_voxels must be non-negative, got {counts.tolist()}")
    if not np.any(counts > 0):
        raise ValueError("class_voxels are all 0: no class can be pasted")
    return counts


def progressive_alpha(epoch: float, max_epoch: float, eta: float) -> float:
    """The progressive factor of Eq. 4, ``α = min(1, E / (η E_max))``.

    ``eta = 0`` gives ``α = 1`` at every epoch, including ``E = 0`` (the 0/0 case is defined as 1 so
    that η = 0 means "pure uniform", Table 4). ``eta = inf`` gives ``α = 0`` at every epoch ("pure
    balanced").
    """
    if not max_epoch > 0:
        raise ValueError(f"max_epoch must be > 0, got {max_epoch}")
    if epoch < 0 or math.isnan(epoch):
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if eta < 0 or math.isnan(eta):
        raise ValueError(f"eta must be >= 0 (or inf), got {eta}")
    if eta == 0:
        return 1.0
    if math.isinf(eta):
        return 0.0
    return min(1.0, float(epoch) / (float(eta) * float(max_epoch)))


def pic_distribution(
    class_voxels, epoch: float, max_epoch: float, gamma: float = 1.0, eta: float = 2 / 3
) -> np.ndarray:
    """The PIC sampling distribution ``P_E`` over the C classes (Eq. 2-4).

    ``P_E = (1 - α) P_bal + α P_uni`` with ``α = min(1, E / (η E_max))``, ``P_bal(c) ∝ I_c^γ`` and
    ``I_c = min_j N_j / N_c`` over all C classes, background included.

    Classes with ``N_c = 0`` cannot be pasted (no voxel of theirs exists), so they get probability 0
    in both ``P_bal`` and ``P_uni`` (the others are renormalised), and ``min_j`` runs over the classes
    with ``N_j > 0`` only.

    Args:
        class_voxels: the C class voxel counts ``N_c`` of the labeled data (array-like, shape (C,)).
        epoch: the current epoch E (>= 0; may be fractional).
        max_epoch: E_max (> 0).
        gamma: the focusing exponent γ of Eq. 3 (γ = 0 makes ``P_bal`` uniform over present classes).
        eta: the scaling η of Eq. 4. ``eta = 0`` → ``α = 1`` at every epoch, E = 0 included (0/0 is
            defined as 1), i.e. pure uniform; ``eta = inf`` → ``α = 0``, i.e. pure ``P_bal``.

    Returns:
        float64 array of shape (C,), non-negative, summing to 1.

    Raises:
        ValueError: if a count is negative or not finite, all counts are 0, ``max_epoch <= 0``,
            ``epoch < 0``, ``eta < 0`` or ``gamma`` is not finite.
    """
    counts = _counts(class_voxels)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    alpha = progressive_alpha(epoch, max_epoch, eta)
    present = counts > 0
    imbalance = np.zeros_like(counts)
    imbalance[present] = counts[present].min() / counts[present]  # Eq. 2
    p_bal = np.zeros_like(counts)
    p_bal[present] = imbalance[present] ** gamma
    p_bal /= p_bal.sum()  # Eq. 3
    p_uni = present / present.sum()
    probs = (1.0 - alpha) * p_bal + alpha * p_uni  # Eq. 4
    return probs / probs.sum()


def sample_class(probs, present: Sequence[int], rng: np.random.Generator) -> int:
    """Draw a class to paste, restricted to the classes present in the labeled crop.

    First ``c ~ probs``; if ``c`` is not in ``present`` (the labeled crop has no voxel of it), redraw
    from ``probs`` renormalised over ``present``; if ``probs`` is 0 on every present class, redraw
    uniformly over ``present``.

    Args:
        probs: C class probabilities (shape (C,), e.g. from :func:`pic_distribution`).
        present: the class indices that occur in the paired labeled crop.
        rng: the random generator (the draw is deterministic given its state).

    Returns:
        the drawn class index, always a member of ``present``.

    Raises:
        ValueError: if ``present`` is empty or names a class outside ``[0, C)``, or ``probs`` is
            not a valid distribution.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or np.any(p < 0) or not np.all(np.isfinite(p)) or p.sum() <= 0:
        raise ValueError(f"probs must be a non-negative 1-D distribution, got {p.tolist()}")
    classes = sorted({int(c) for c in present})
    if not classes:
        raise ValueError("no class is present in the labeled crop")
    if classes[0] < 0 or classes[-1] >= p.size:
        raise ValueError(f"present classes {classes} are outside [0, {p.size})")
    c = int(rng.choice(p.size, p=p / p.sum()))
    if c in classes:
        return c
    sub = p[classes]
    sub = sub / sub.sum() if sub.sum() > 0 else np.full(len(classes), 1.0 / len(classes))
    return classes[int(rng.choice(len(classes), p=sub))]


def _to_numpy_labels(label_crop) -> np.ndarray:
    if isinstance(label_crop, torch.Tensor):
        return label_crop.detach().cpu().numpy()
    return np.asarray(label_crop)


def pic_box(label_crop, cls: int, box_size: tuple[int, int, int], rng: np.random.Generator) -> Box:
    """A box centred on a random voxel of class ``cls``, clipped to the crop.

    The centre voxel is drawn uniformly among the voxels of ``cls``. Along each axis the box starts at
    ``centre - size // 2`` and has ``size`` voxels, then is clipped to ``[0, extent)`` (so it shrinks at
    the borders rather than moving; it always contains the centre voxel).

    Args:
        label_crop: integer labels of the labeled crop, shape (D, H, W) (numpy or torch).
        cls: the class whose voxel centres the box.
        box_size: the box size (d, h, w) in voxels, each >= 1 (larger than the crop → the whole axis).
        rng: the random generator.

    Returns:
        ``(slice_d, slice_h, slice_w)`` with unit step, inside the crop.

    Raises:
        ValueError: if ``cls`` has no voxel in ``label_crop``, or the shapes are wrong.
    """
    labels = _to_numpy_labels(label_crop)
    if labels.ndim != 3:
        raise ValueError(f"label_crop must be (D, H, W), got shape {labels.shape}")
    if len(box_size) != 3 or any(int(s) < 1 for s in box_size):
        raise ValueError(f"box_size must be three sizes >= 1, got {box_size}")
    flat = np.flatnonzero(labels == cls)
    if flat.size == 0:
        raise ValueError(f"class {cls} is absent from the labeled crop")
    centre = np.unravel_index(int(flat[int(rng.integers(flat.size))]), labels.shape)
    box = []
    for c, s, extent in zip(centre, box_size, labels.shape, strict=True):
        start = int(c) - int(s) // 2
        box.append(slice(max(0, start), min(int(extent), start + int(s))))
    return tuple(box)  # type: ignore[return-value]


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else np.array(x, copy=True)


def pic_mix(labeled_image, labeled_label, unlabeled_image, pseudo_label, box: Box):
    """Paste the box of the labeled crop into the unlabeled crop (CutMix at the same position).

    Args:
        labeled_image: the labeled crop, shape (C, D, H, W) or (D, H, W).
        labeled_label: its ground truth, shape (D, H, W).
        unlabeled_image: the (strongly augmented) unlabeled crop, same shape as ``labeled_image``.
        pseudo_label: the pseudo-label of the unlabeled crop, shape (D, H, W).
        box: ``(slice_d, slice_h, slice_w)``, e.g. from :func:`pic_box`.

    Returns:
        ``(x_mix, y_mix, mask)``: ``x_mix`` equals ``labeled_image`` inside the box and
        ``unlabeled_image`` outside (shape and dtype of ``unlabeled_image``); ``y_mix`` equals
        ``labeled_label`` inside and ``pseudo_label`` outside (dtype of ``pseudo_label``); ``mask`` is a
        bool (D, H, W), True inside the box. Torch inputs give tensors (on the inputs' device), numpy
        inputs give arrays. New objects: the inputs are not modified.
    """
    if tuple(labeled_image.shape) != tuple(unlabeled_image.shape):
        raise ValueError(f"image shapes differ: {tuple(labeled_image.shape)} vs {tuple(unlabeled_image.shape)}")
    spatial = tuple(unlabeled_image.shape[-3:])
    for name, lab in (("labeled_label", labeled_label), ("pseudo_label", pseudo_label)):
        if tuple(lab.shape) != spatial:
            raise ValueError(f"{name} must have shape {spatial}, got {tuple(lab.shape)}")
    box = tuple(box)
    x_mix = _clone(unlabeled_image)
    x_mix[(..., *box)] = labeled_image[(..., *box)]
    y_mix = _clone(pseudo_label)
    y_mix[box] = labeled_label[box]
    if isinstance(unlabeled_image, torch.Tensor):
        mask = torch.zeros(spatial, dtype=torch.bool, device=unlabeled_image.device)
    else:
        mask = np.zeros(spatial, dtype=bool)
    mask[box] = True
    return x_mix, y_mix, mask


@dataclass(frozen=True)
class PicSettings:
    """Settings of PIC.

    Attributes:
        gamma: γ of Eq. 3 (the paper gives no value; 1.0).
        eta: η of Eq. 4 (paper: 2/3; 0 → pure uniform, ``float('inf')`` → pure balanced).
        box_fraction: the box size as a fraction of the crop per axis (D, H, W); default half the crop.
        enabled: False turns PIC off (:func:`pic_batch` then returns the unlabeled batch unmixed).

    Raises:
        SettingsError (a ValueError): gamma not finite, eta negative or NaN, box fractions outside (0, 1].
    """

    gamma: float = 1.0
    eta: float = 2 / 3
    box_fraction: tuple[float, float, float] = (0.5, 0.5, 0.5)
    enabled: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.gamma):
            raise SettingsError(f"PIC gamma must be finite (--pic-gamma), got {self.gamma}")
        if math.isnan(self.eta) or self.eta < 0:
            raise SettingsError(f"PIC eta must be >= 0 or inf (--pic-eta), got {self.eta}")
        if len(self.box_fraction) != 3 or not all(0 < f <= 1 for f in self.box_fraction):
            raise SettingsError(f"PIC box_fraction must be three fractions in (0, 1], got {self.box_fraction}")
        object.__setattr__(self, "box_fraction", tuple(float(f) for f in self.box_fraction))


def box_size_for(crop_shape: Sequence[int], box_fraction: Sequence[float]) -> tuple[int, int, int]:
    """Box size in voxels: ``max(1, round(fraction * extent))`` per axis (64×128×128 at 0.5 → 32×64×64)."""
    return tuple(max(1, round(f * int(n))) for f, n in zip(box_fraction, crop_shape, strict=True))  # type: ignore[return-value]


def pic_batch(
    labeled_images: torch.Tensor,
    labeled_labels: torch.Tensor,
    unlabeled_images: torch.Tensor,
    pseudo_labels: torch.Tensor,
    class_voxels,
    epoch: float,
    max_epoch: float,
    settings: PicSettings,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """PIC over a batch: unlabeled sample ``i`` is mixed with labeled sample ``i % n_labeled``.

    For each unlabeled sample: ``c ~ pic_distribution(class_voxels, epoch, max_epoch, gamma, eta)``,
    redrawn among the classes present in the paired labeled crop (:func:`sample_class`); a box of
    ``box_size_for(crop, settings.box_fraction)`` centred on a random voxel of ``c`` (:func:`pic_box`);
    then :func:`pic_mix`.

    Args:
        labeled_images: (L, C_in, D, H, W) labeled crops.
        labeled_labels: (L, D, H, W) integer ground truth.
        unlabeled_images: (B, C_in, D, H, W) strongly augmented unlabeled crops.
        pseudo_labels: (B, D, H, W) integer pseudo-labels of the unlabeled crops.
        class_voxels: the C class voxel counts of the labeled data.
        epoch: current epoch E.
        max_epoch: E_max.
        settings: :class:`PicSettings`.
        rng: numpy generator; the result is deterministic given its state.

    Returns:
        ``(x_mix, y_mix, box_masks, drawn_classes)``: (B, C_in, D, H, W) mixed images, (B, D, H, W)
        mixed targets (dtype of ``pseudo_labels``), (B, D, H, W) bool masks (True inside the pasted
        box: those target voxels are ground truth, e.g. ``box_masks | confident`` for a confidence
        mask), and the B drawn classes. With ``settings.enabled`` False: clones of the unlabeled
        images and pseudo-labels, all-False masks and drawn classes ``-1``.
    """
    if labeled_images.ndim != 5 or unlabeled_images.ndim != 5:
        raise ValueError("images must be (N, C_in, D, H, W)")
    n_lab, n_unl = labeled_images.shape[0], unlabeled_images.shape[0]
    if n_lab == 0:
        raise ValueError("pic_batch needs at least one labeled sample")
    if tuple(labeled_labels.shape) != (n_lab, *labeled_images.shape[2:]):
        raise ValueError(f"labeled_labels shape {tuple(labeled_labels.shape)} does not match the images")
    if tuple(pseudo_labels.shape) != (n_unl, *unlabeled_images.shape[2:]):
        raise ValueError(f"pseudo_labels shape {tuple(pseudo_labels.shape)} does not match the images")
    if not settings.enabled:
        masks = torch.zeros(pseudo_labels.shape, dtype=torch.bool, device=pseudo_labels.device)
        return unlabeled_images.clone(), pseudo_labels.clone(), masks, [-1] * n_unl

    probs = pic_distribution(class_voxels, epoch, max_epoch, gamma=settings.gamma, eta=settings.eta)
    box_size = box_size_for(labeled_images.shape[2:], settings.box_fraction)
    label_np: dict[int, np.ndarray] = {}
    xs, ys, ms, drawn = [], [], [], []
    for i in range(n_unl):
        j = i % n_lab
        if j not in label_np:
            label_np[j] = _to_numpy_labels(labeled_labels[j])
        lab = label_np[j]
        if lab.min() < 0 or lab.max() >= probs.size:
            raise ValueError(f"labeled labels must lie in [0, {probs.size}), got [{lab.min()}, {lab.max()}]")
        present = np.flatnonzero(np.bincount(lab.ravel().astype(np.int64), minlength=probs.size))
        c = sample_class(probs, present.tolist(), rng)
        box = pic_box(lab, c, box_size, rng)
        x, y, m = pic_mix(labeled_images[j], labeled_labels[j], unlabeled_images[i], pseudo_labels[i], box)
        xs.append(x)
        ys.append(y)
        ms.append(m)
        drawn.append(c)
    return torch.stack(xs), torch.stack(ys), torch.stack(ms), drawn
