"""Where the student's crops lie, and the strong view.

* :func:`random_crop` / :func:`center_crop` choose where a crop lies (training: uniform over every
  valid position; validation: DHC's centre crop). A :class:`Crop` is a small, hashable record, so the
  trainer can key teacher targets by it and the feature store can be sliced at the same place; the
  volumes they are cut from are :class:`stage2_train.sampling.volume_cache.VolumeCache`'s.
* :func:`random_gamma` is the strong view (see docs/method.md, augmentation).

Randomness comes only from the ``np.random.Generator`` / ``torch.Generator`` passed in, never from a
global RNG, so a resumed run that restores those generators' states repeats the exact sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DEFAULT_FLIP_AXES",
    "Crop",
    "Shape3",
    "center_crop",
    "random_crop",
    "random_gamma",
]

Shape3 = tuple[int, int, int]

# DHC's RandomFlip_LR / RandomFlip_UD flip axes 1 and 2 of the (D, H, W) crop: in-plane only, never
# the slice axis (see docs/protocol.md, training crops).
DEFAULT_FLIP_AXES: tuple[int, ...] = (1, 2)


def _shape3(value: Sequence[int], what: str) -> Shape3:
    """``value`` as a tuple of three ints, or ValueError naming ``what``."""
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be three integers (D, H, W), got {value!r}") from exc
    if len(out) != 3:
        raise ValueError(f"{what} must be three integers (D, H, W), got {value!r}")
    return out  # type: ignore[return-value]


def _check_fits(volume_shape: Shape3, size: Shape3) -> None:
    if any(s < 1 for s in size):
        raise ValueError(f"crop size {size} must be positive on every axis")
    if any(v < 1 for v in volume_shape):
        raise ValueError(f"volume shape {volume_shape} must be positive on every axis")
    if any(s > v for s, v in zip(size, volume_shape, strict=True)):
        raise ValueError(
            f"crop size {size} (D, H, W) is larger than the volume {volume_shape} on at least one axis; "
            "use a smaller crop or a larger preprocessing target shape"
        )


@dataclass(frozen=True)
class Crop:
    """Where a training or validation crop lies in a case's preprocessed volume.

    Attributes:
        case_id: the case.
        offset: (z, y, x) start of the crop in the preprocessed (D, H, W) volume, voxels.
        size: (D, H, W) of the crop.
        flips: whether axes (z, y, x) are flipped after cropping (all False unless flips are on).
    """

    case_id: str
    offset: Shape3
    size: Shape3
    flips: tuple[bool, bool, bool] = (False, False, False)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """The crop as slices into the (D, H, W) volume (flips not applied)."""
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.size, strict=True))  # type: ignore[return-value]

    @property
    def flipped_axes(self) -> tuple[int, ...]:
        """Indices of the flipped axes of the (D, H, W) crop, e.g. ``(1, 2)``."""
        return tuple(i for i, f in enumerate(self.flips) if f)


def random_crop(
    case_id: str,
    volume_shape: Sequence[int],
    size: Sequence[int],
    rng: np.random.Generator,
    flip: bool = False,
    flip_axes: Sequence[int] = DEFAULT_FLIP_AXES,
    grid: Sequence[float] = (1, 1, 1),
) -> Crop:
    """A crop at a uniformly random valid position (DHC's RandomCrop), optionally with random flips.

    On each axis the offset is ``round(k * g)`` with ``k`` uniform over every integer that keeps the
    crop inside (``k * g <= V - S``), independently per axis. With ``grid=(1, 1, 1)`` that is every
    offset ``0 <= o <= V - S`` (DHC). ``grid=(1, 16, 16)`` puts the in-plane offsets on a 16-pixel
    token grid, so that each patch token of the crop is a token of the full slice (the ``token``
    crop grid of :class:`~stage2_train.train.settings.TrainSettings`). Draws, in order: the z, y, x
    offsets, then one uniform number per axis of ``flip_axes`` if ``flip`` (nothing else, so the
    draw count is fixed per call).

    Args:
        case_id: the case.
        volume_shape: (D, H, W) of the preprocessed volume.
        size: (D, H, W) of the crop.
        rng: the only source of randomness.
        flip: flip each axis of ``flip_axes`` with probability 0.5 (off by default, see docs/method.md).
        flip_axes: axes that may be flipped; DHC's in-plane axes ``(1, 2)`` by default.
        grid: (z, y, x) spacing of the allowed offsets in voxels (may be fractional, e.g. 160/14),
            each ``>= 1``.

    Returns:
        The :class:`Crop`.

    Raises:
        ValueError: ``size`` is larger than ``volume_shape`` on some axis (the message names both),
            or a shape / axis is malformed.
    """
    volume_shape = _shape3(volume_shape, "volume shape")
    size = _shape3(size, "crop size")
    _check_fits(volume_shape, size)
    steps = tuple(float(g) for g in grid)
    if len(steps) != 3 or any(not g >= 1 for g in steps):
        raise ValueError(f"grid must be three spacings >= 1 (z, y, x), got {tuple(grid)!r}")
    offset = tuple(int(round(int(rng.integers(0, int((v - s) // g + 1e-9) + 1)) * g))
                   for v, s, g in zip(volume_shape, size, steps, strict=True))
    flips = [False, False, False]
    if flip:
        axes = tuple(int(a) for a in flip_axes)
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"flip_axes must be distinct axes among 0, 1, 2, got {tuple(flip_axes)}")
        for axis in axes:
            flips[axis] = bool(rng.random() < 0.5)
    return Crop(case_id, offset, size, tuple(flips))  # type: ignore[arg-type]


def center_crop(case_id: str, volume_shape: Sequence[int], size: Sequence[int]) -> Crop:
    """The centred crop used for validation (DHC's CenterCrop), no flips.

    The offset on each axis is ``(V - S) // 2`` (an odd margin leaves the extra voxel at the end).

    Raises:
        ValueError: ``size`` is larger than ``volume_shape`` on some axis (the message names both).
    """
    volume_shape = _shape3(volume_shape, "volume shape")
    size = _shape3(size, "crop size")
    _check_fits(volume_shape, size)
    offset = tuple((v - s) // 2 for v, s in zip(volume_shape, size, strict=True))
    return Crop(case_id, offset, size)  # type: ignore[arg-type]


def random_gamma(
    images: torch.Tensor,
    gamma_range: tuple[float, float] = (0.7, 1.5),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The strong view: per sample ``x ** g`` with ``g ~ U(gamma_range)``.

    Images are clamped to [0, 1] first, so tiny negatives left by interpolation cannot give NaN.
    The exponents are drawn on the generator's device (CPU when ``generator`` is None, from torch's
    global RNG then) and moved to the images' device, so a CPU generator serves CUDA images too.

    Args:
        images: (B, 1, D, H, W) intensities in [0, 1] (any shape with the batch first works).
        gamma_range: (low, high), ``0 < low <= high``.
        generator: source of the B exponents; pass one to be reproducible.

    Returns:
        A new tensor of the same shape and dtype, in [0, 1].

    Raises:
        ValueError: a bad ``gamma_range`` or an image tensor without a batch axis.
    """
    low, high = (float(g) for g in gamma_range)
    if not (0.0 < low <= high and np.isfinite(high)):
        raise ValueError(f"gamma_range must satisfy 0 < low <= high < inf, got {tuple(gamma_range)}")
    if images.ndim < 1:
        raise ValueError("images must have a batch axis, e.g. (B, 1, D, H, W)")
    batch = images.shape[0]
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
    gamma = (low + (high - low) * u).to(device=images.device)
    gamma = gamma.reshape((batch,) + (1,) * (images.ndim - 1))
    return images.clamp(0.0, 1.0).float().pow(gamma).to(images.dtype)
