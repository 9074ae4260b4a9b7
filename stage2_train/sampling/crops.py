"""What the student trains on: crops, the volumes behind them, the cases of each iteration, gamma.

* :class:`VolumeCache` reads the preprocessed volumes of a store's complete cases once into memory
  (80x160x160 float16 is 4 MB a case, a few hundred MB for AMOS) and cuts crops from them.
* :func:`random_crop` / :func:`center_crop` choose where a crop lies (training: uniform over every
  valid position; validation: DHC's centre crop). A :class:`Crop` is a small, hashable record, so the
  trainer can key teacher targets by it and the feature store can be sliced at the same place.
* :class:`IterationSampler` decides which cases each iteration sees, following DHC's loaders
  (``PROTOCOL.md`` 1.4): an epoch is one pass over the unlabeled cases, ``n_unlabeled`` per
  iteration, with the labeled set repeated to cover it, ``n_labeled`` per iteration.
* :func:`random_gamma` is the strong view (``METHOD.md``, "Augmentation").

Randomness comes only from the ``np.random.Generator`` / ``torch.Generator`` passed in, never from a
global RNG, so a resumed run that restores those generators' states repeats the exact sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dinomix_cache.data.source_volumes import load_source_case, recorded_case_source
from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore

__all__ = [
    "DEFAULT_FLIP_AXES",
    "Crop",
    "IterationSampler",
    "VolumeCache",
    "center_crop",
    "random_crop",
    "random_gamma",
]

Shape3 = tuple[int, int, int]

# DHC's RandomFlip_LR / RandomFlip_UD flip axes 1 and 2 of the (D, H, W) crop: in-plane only, never
# the slice axis (PROTOCOL.md 1.4).
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
        flip: flip each axis of ``flip_axes`` with probability 0.5 (off by default, ``METHOD.md``).
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


class VolumeCache:
    """Preprocessed volumes of a store's complete cases, read once into memory (80x160x160 float16 = 4 MB a case).

    Images are kept as the store holds them (float16, (D, H, W), in [0, 1]); labels as uint8
    (D, H, W). Crops are copies: changing a returned tensor never changes the cache.

    Args:
        store: an open feature store that holds volumes.
        case_ids: the cases to load (duplicates are loaded once).
        with_labels: also load the label of every case that has one. Cases without a label
            (unlabeled ones) are fine; :meth:`crop_label` on them raises ValueError.
        data: the dataset folder, for a store made with ``--no-volumes``: each case is then
            preprocessed from its source files with the store's settings (sha256 checked against
            the store's record; about 1-2 s a case).

    Raises:
        UserError: a case is incomplete, the store holds no volumes (made with ``--no-volumes``)
            and no ``data`` is given, a source file is missing or differs from the recorded one, or
            a label's shape differs from its image's (a damaged store).

    Example::

        cache = VolumeCache(store, ["0001", "0002"], with_labels=True)
        crop = random_crop("0001", cache.shape("0001"), (64, 128, 128), rng)
        image = cache.crop_image(crop)   # (1, 64, 128, 128) float32
        label = cache.crop_label(crop)   # (64, 128, 128) int64
    """

    def __init__(self, store: FeatureStore, case_ids: Sequence[str], with_labels: bool,
                 data: Path | None = None) -> None:
        self._images: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        from_sources = not store.storage.volumes
        if from_sources and data is None:
            raise UserError(f"{store.path} holds no volumes (made with --no-volumes): pass --data DIR, the "
                            "dataset folder it was extracted from, to rebuild them")
        for case_id in dict.fromkeys(case_ids):
            if from_sources:
                image, label = self._from_sources(store, case_id, with_labels, data)  # type: ignore[arg-type]
            else:
                image = np.asarray(store.read_volume(case_id, "image"))
                has = with_labels and store.has_volume(case_id, "label")
                label = np.asarray(store.read_volume(case_id, "label")) if has else None
            if image.ndim != 3:
                raise UserError(f"{store.path}: image of case {case_id} has shape {image.shape}, expected (D, H, W)")
            self._images[case_id] = image
            if label is not None:
                if label.shape != image.shape:
                    raise UserError(
                        f"{store.path}: label of case {case_id} has shape {label.shape} but its image "
                        f"{image.shape}; the store is damaged: rebuild it with extract --overwrite"
                    )
                self._labels[case_id] = label

    @staticmethod
    def _from_sources(store: FeatureStore, case_id: str, with_labels: bool,
                      data: Path) -> tuple[np.ndarray, np.ndarray | None]:
        """The case preprocessed from its source files under ``data`` (hashes checked)."""
        if not store.is_complete(case_id):
            raise UserError(f"case {case_id} is not complete in {store.path}; rerun extract to finish it")
        source = store.case_source(case_id)
        case = recorded_case_source(case_id, store.roles().get(case_id, "unlabeled"), source, data)
        loaded = load_source_case(case, store.preprocess,
                                  len(store.class_names), expected=source, with_label=with_labels)
        return loaded.image, loaded.label

    @property
    def case_ids(self) -> list[str]:
        """The cached cases, in load order."""
        return list(self._images)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by images and labels."""
        return sum(a.nbytes for a in self._images.values()) + sum(a.nbytes for a in self._labels.values())

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._images

    def __len__(self) -> int:
        return len(self._images)

    def has_label(self, case_id: str) -> bool:
        """True if the case's label was loaded."""
        return case_id in self._labels

    def _image(self, case_id: str) -> np.ndarray:
        try:
            return self._images[case_id]
        except KeyError:
            raise ValueError(f"case {case_id!r} is not in this volume cache ({len(self._images)} cases)") from None

    def image(self, case_id: str) -> np.ndarray:
        """The whole preprocessed image, (D, H, W) as stored (float16), read-only."""
        view = self._image(case_id).view()
        view.flags.writeable = False
        return view

    def label(self, case_id: str) -> np.ndarray:
        """The whole label, (D, H, W) uint8, read-only.

        Raises:
            ValueError: the case has no label in this cache.
        """
        if case_id not in self._labels:
            raise ValueError(f"case {case_id!r} has no label in this volume cache")
        view = self._labels[case_id].view()
        view.flags.writeable = False
        return view

    def shape(self, case_id: str) -> Shape3:
        """(D, H, W) of the case's preprocessed volume."""
        return tuple(int(n) for n in self._image(case_id).shape)  # type: ignore[return-value]

    def _cut(self, array: np.ndarray, crop: Crop) -> np.ndarray:
        shape = tuple(array.shape)
        if any(o < 0 or o + s > v for o, s, v in zip(crop.offset, crop.size, shape, strict=True)):
            raise ValueError(
                f"crop at offset {crop.offset} of size {crop.size} lies outside case {crop.case_id}'s volume {shape}"
            )
        part = array[crop.slices]
        axes = crop.flipped_axes
        return np.flip(part, axis=axes) if axes else part

    def crop_image(self, crop: Crop) -> torch.Tensor:
        """The crop of the case's image, flips applied.

        Returns:
            (1, D, H, W) float32 tensor (a copy), values in [0, 1].

        Raises:
            ValueError: the case is not cached or the crop lies outside the volume.
        """
        part = self._cut(self._image(crop.case_id), crop)
        return torch.from_numpy(np.array(part, dtype=np.float32, copy=True)).unsqueeze(0)

    def crop_label(self, crop: Crop) -> torch.Tensor:
        """The crop of the case's label, flips applied.

        Returns:
            (D, H, W) int64 tensor (a copy).

        Raises:
            ValueError: the case is not cached, has no label (unlabeled, or the cache was built with
                ``with_labels=False``), or the crop lies outside the volume.
        """
        self._image(crop.case_id)
        label = self._labels.get(crop.case_id)
        if label is None:
            raise ValueError(
                f"case {crop.case_id!r} has no label in this volume cache "
                "(an unlabeled case, or the cache was built with with_labels=False)"
            )
        return torch.from_numpy(np.array(self._cut(label, crop), dtype=np.int64, copy=True))


class IterationSampler:
    """Which cases each training iteration sees.

    An epoch = one pass over the unlabeled cases, shuffled, in groups of ``n_unlabeled`` (the last
    incomplete group is dropped, as the peers' ``drop_last``); labeled cases come from a shuffled list
    repeated to cover the epoch (DHC: the labeled set repeated to the unlabeled length), ``n_labeled``
    per iteration. With no unlabeled cases (labeled-only baseline), an epoch = one pass over the
    labeled cases, shuffled, in groups of ``n_labeled`` (last incomplete group dropped).

    Labeled cases of an epoch: the labeled list repeated as often as the epoch needs
    (``iterations * n_labeled`` draws), shuffled as a whole, as DHC's shuffled loader over the
    repeated dataset. When the count is not a multiple of the labeled set, the cases that get one
    use more are a random subset (DHC always favours the first ones of its list), so every labeled
    case is used ``k`` or ``k + 1`` times. A case may then appear twice in one iteration, as in DHC.

    Args:
        labeled: ids of the labeled cases (at least one; no duplicates).
        unlabeled: ids of the unlabeled cases (may be empty: labeled-only; no duplicates).
        n_labeled: labeled cases per iteration.
        n_unlabeled: unlabeled cases per iteration.

    Raises:
        ValueError: no labeled cases, duplicates, a non-positive group size, or too few cases for
            a single iteration.

    Example::

        sampler = IterationSampler(labeled_ids, unlabeled_ids)      # 4 labeled, 16 unlabeled
        for lab, unl in sampler.epoch(rng):                         # 8 iterations
            ...                                                     # lab, unl: 2 ids each
    """

    def __init__(
        self, labeled: Sequence[str], unlabeled: Sequence[str], n_labeled: int = 2, n_unlabeled: int = 2
    ) -> None:
        self.labeled = [str(c) for c in labeled]
        self.unlabeled = [str(c) for c in unlabeled]
        self.n_labeled = int(n_labeled)
        self.n_unlabeled = int(n_unlabeled)
        if self.n_labeled < 1 or self.n_unlabeled < 1:
            raise ValueError(f"n_labeled and n_unlabeled must be >= 1, got {n_labeled} and {n_unlabeled}")
        if not self.labeled:
            raise ValueError("no labeled cases: training needs at least one")
        for name, ids in (("labeled", self.labeled), ("unlabeled", self.unlabeled)):
            if len(set(ids)) != len(ids):
                dups = sorted({c for c in ids if ids.count(c) > 1})
                raise ValueError(f"duplicate {name} case ids: {dups}")
        if self.iterations_per_epoch() == 0:
            if self.unlabeled:
                raise ValueError(
                    f"{len(self.unlabeled)} unlabeled case(s) are fewer than n_unlabeled={self.n_unlabeled}: "
                    "an epoch would have no iteration"
                )
            raise ValueError(
                f"{len(self.labeled)} labeled case(s) are fewer than n_labeled={self.n_labeled} "
                "(labeled-only): an epoch would have no iteration"
            )

    @property
    def labeled_only(self) -> bool:
        """True when there are no unlabeled cases (the labeled-only baseline)."""
        return not self.unlabeled

    def iterations_per_epoch(self) -> int:
        """Iterations of one epoch: ``len(unlabeled) // n_unlabeled`` (labeled-only: ``len(labeled) // n_labeled``)."""
        if self.labeled_only:
            return len(self.labeled) // self.n_labeled
        return len(self.unlabeled) // self.n_unlabeled

    def epoch(self, rng: np.random.Generator) -> list[tuple[list[str], list[str]]]:
        """The cases of every iteration of one epoch.

        Draws, in order: a permutation of the unlabeled cases, then (semi-supervised) the random
        subset for the remainder of the labeled repetition and a permutation of the repeated list;
        labeled-only: one permutation of the labeled cases.

        Args:
            rng: the only source of randomness.

        Returns:
            One ``(labeled ids, unlabeled ids)`` per iteration, with ``n_labeled`` and
            ``n_unlabeled`` ids (labeled-only: ``n_labeled`` and an empty list).
        """
        iters = self.iterations_per_epoch()
        if self.labeled_only:
            order = rng.permutation(len(self.labeled))
            return [
                ([self.labeled[i] for i in order[k * self.n_labeled:(k + 1) * self.n_labeled]], [])
                for k in range(iters)
            ]
        unl_order = rng.permutation(len(self.unlabeled))
        needed = iters * self.n_labeled
        n = len(self.labeled)
        full, rest = divmod(needed, n)
        pool = np.concatenate([np.tile(np.arange(n), full), rng.choice(n, size=rest, replace=False)])
        lab_order = pool[rng.permutation(needed)]
        out: list[tuple[list[str], list[str]]] = []
        for k in range(iters):
            lab = [self.labeled[i] for i in lab_order[k * self.n_labeled:(k + 1) * self.n_labeled]]
            unl = [self.unlabeled[i] for i in unl_order[k * self.n_unlabeled:(k + 1) * self.n_unlabeled]]
            out.append((lab, unl))
        return out


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
