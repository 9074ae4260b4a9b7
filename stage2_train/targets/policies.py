"""Distillation targets for the PIC-mixed crop x_mix: from the feature store, from the teacher, or both.

The target of a crop of ``Z×Y×X`` voxels is the teacher's patch-token grid of each slice of x_mix,
in the run's teacher view (:mod:`stage2_train.targets.views`: whole slices, or the crop), mapped
onto the student's deepest grid (stride 16) by area: ``(C_T, Z/16, Y/16, X/16)``, 16 slices per z
cell.

Three policies (``--targets online|cache|hybrid``, :func:`make_policy`):

* :class:`OnlineTargets` runs the teacher on every slice of x_mix (the weak view's intensities, no
  gamma; the PIC box pasted; flips applied). The reference of its view.
* :class:`CacheTargets` reads everything from the store; no teacher in memory. Pixels inside the
  pasted box take the labeled case's stored tokens, the others the unlabeled case's; a flipped crop
  takes its stored tokens flipped. Exact for unaltered slices, approximate for mixed or flipped ones
  (ViT tokens are neither additive nor flip-equivariant).
* :class:`HybridTargets` (the default policy) takes unaltered slices from the store and recomputes
  with the teacher the slices that hold part of the pasted box, and every slice of a crop flipped
  in-plane: equal to ``online`` up to the store's float16 rounding. A flip along z only reorders
  whole slices, which per-slice tokens follow exactly, so it costs no recompute.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch

from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.teacher.model import Teacher
from stage2_train.sampling.crops import Crop
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.targets.geometry import CELL, DEFAULT_MAPPING, MAPPINGS, TokenGrid
from stage2_train.targets.views import FEATURE_MEMORY_BYTES, TEACHER_VIEWS, MixedCrop, make_view

__all__ = [
    "POLICIES",
    "Targets",
    "TEACHER_BATCH",
    "CacheTargets",
    "HybridTargets",
    "MixedCrop",
    "OnlineTargets",
    "TargetPolicy",
    "TargetsError",
    "make_policy",
]

log = logging.getLogger("dinomix_cache.train")

TEACHER_BATCH = 64  # images per teacher forward when recomputing
Targets = Literal["online", "cache", "hybrid"]
POLICIES: tuple[Targets, ...] = get_args(Targets)


class TargetsError(UserError, ValueError):
    """A target policy that cannot work as asked (a ValueError; the CLI prints it as one line)."""


class TargetPolicy(ABC):
    """Distillation targets for batches of :class:`MixedCrop`; see the module docstring.

    Subclasses decide which slices the teacher recomputes (:meth:`recompute_mask`); the rest come
    from the store, through the run's teacher view. Build one with :func:`make_policy`.
    """

    name: str = ""
    reads_cache: bool = True  # False: every slice is recomputed, no stored token is read

    def __init__(
        self,
        store: FeatureStore,
        volumes: VolumeCache | None = None,
        teacher: Teacher | None = None,
        mapping: str = DEFAULT_MAPPING,
        view: str = "slice",
        batch_size: int = TEACHER_BATCH,
        memory_bytes: int = FEATURE_MEMORY_BYTES,
    ) -> None:
        if mapping not in MAPPINGS:
            raise TargetsError(f"unknown mapping {mapping!r}: use one of {', '.join(MAPPINGS)}")
        self.store = store
        self.volumes = volumes
        self.mapping = mapping
        self.batch_size = int(batch_size)
        self.view = make_view(view, store, need_windows=self.reads_cache)
        self.view.memory_bytes = int(memory_bytes)
        self.hidden_size = self.view.geometry.hidden
        self.teacher = _checked_teacher(teacher, store) if teacher is not None else None
        self._said_resize = False
        self._depths: dict[str, int] = {}

    @abstractmethod
    def recompute_mask(self, item: MixedCrop) -> np.ndarray:
        """(Z,) bool: which slices of the crop (after flips) the teacher recomputes."""

    def targets(self, items: Sequence[MixedCrop]) -> tuple[torch.Tensor, float]:
        """(B, C_T, Z/16, Y/16, X/16) float32 targets and the fraction of crop slices the teacher recomputed.

        Raises:
            ValueError: crops of different or bad sizes, outside their volume, or (crop view) of
                another in-plane size than the store's crop windows.
        """
        if not items:
            raise ValueError("targets() needs at least one crop")
        size = tuple(items[0].unlabeled.size)
        for item in items:
            if tuple(item.unlabeled.size) != size:
                raise ValueError(f"crop sizes differ within a batch: {size} vs {tuple(item.unlabeled.size)}")
        if any(n % CELL or n <= 0 for n in size):
            raise ValueError(f"crop size {size} must be positive multiples of {CELL} on every axis")
        if self.reads_cache:
            self.view.check_crop(size)  # type: ignore[arg-type]
        for item in items:
            self._check_inside(item.unlabeled)
            if item.labeled is not None:
                self._check_inside(item.labeled)
        masks = [self.recompute_mask(item) for item in items]
        slices = [self._cached_cells(item, ~mask) for item, mask in zip(items, masks, strict=True)]
        self._recompute(items, masks, slices)
        z, y, x = (n // CELL for n in size)
        out = torch.stack([s.reshape(z, CELL, y, x, -1).mean(1).permute(3, 0, 1, 2) for s in slices])
        total = sum(len(m) for m in masks)
        return out.contiguous(), float(sum(int(m.sum()) for m in masks) / total)

    def _check_inside(self, crop: Crop) -> None:
        depth = self._depths.get(crop.case_id)
        if depth is None:
            depth = self._depths[crop.case_id] = int(self.store.feature_shape(crop.case_id)[0])
        shape = (depth, *self.view.geometry.slice_hw)
        if any(o < 0 or o + n > v for o, n, v in zip(crop.offset, crop.size, shape, strict=True)):
            raise ValueError(f"crop at {tuple(crop.offset)} of size {tuple(crop.size)} lies outside case "
                             f"{crop.case_id}'s volume {shape}")

    # ------------------------------------------------------------------------------------ cache
    def _cached_cells(self, item: MixedCrop, wanted: np.ndarray) -> torch.Tensor:
        """(Z, Y/16, X/16, C) per-slice cell maps from the store for the ``wanted`` slices (zeros elsewhere)."""
        depth, height, width = item.unlabeled.size
        out = torch.zeros(depth, height // CELL, width // CELL, self.hidden_size)
        rows = np.flatnonzero(wanted)
        if rows.size == 0:
            return out
        unl = item.unlabeled
        grid = self.view.cached(unl, rows)
        out[rows] = grid.cells((height, width), unl.flips[1:], self.mapping)
        if item.mixed and item.labeled is not None and item.box is not None:
            bz, by, bx = item.box
            inside = (rows >= bz.start) & (rows < bz.stop)
            if inside.any():
                # the box is a rectangle: the unlabeled case's share of it out, the labeled case's in
                box_rows = rows[inside]
                part = TokenGrid(grid.tokens[torch.from_numpy(inside)], grid.origin, grid.token_px)
                out[box_rows] -= part.cells((height, width), unl.flips[1:], self.mapping, (by, bx))
                lab = self.view.cached(item.labeled, box_rows)
                out[box_rows] += lab.cells((height, width), item.labeled.flips[1:], self.mapping, (by, bx))
        return out

    # ------------------------------------------------------------------------------------ teacher
    def _recompute(self, items: Sequence[MixedCrop], masks: list[np.ndarray], slices: list[torch.Tensor]) -> None:
        """Run the teacher on the masked slices of every item (batches of ≤ batch_size), into ``slices``."""
        jobs: dict[tuple[int, int], list[tuple[int, np.ndarray, torch.Tensor]]] = {}
        for i, (item, mask) in enumerate(zip(items, masks, strict=True)):
            rows = np.flatnonzero(mask)
            if rows.size == 0:
                continue
            if self.teacher is None or self.volumes is None:
                raise TargetsError(f"--targets {self.name} needs the teacher and the volumes to recompute slices")
            images = self.view.teacher_images(self.volumes, item, rows)
            jobs.setdefault(tuple(images.shape[1:]), []).append((i, rows, images))  # type: ignore[arg-type]
        for shape, group in jobs.items():
            images = torch.cat([g[2] for g in group])
            size = self.view.input_size(shape)
            if size != shape and not self._said_resize:
                log.info("teacher targets (%s view): images of %s px seen at %s px", self.view.name, shape, size)
                self._said_resize = True
            tokens = torch.cat([self.teacher.forward_slices(images[k:k + self.batch_size], input_size=size)  # type: ignore[union-attr]
                                for k in range(0, images.shape[0], self.batch_size)])
            start = 0
            for i, rows, _ in group:
                item = items[i]
                grid = self.view.recomputed(item, tokens[start:start + rows.size])
                slices[i][rows] = grid.cells(tuple(item.unlabeled.size[1:]), (False, False), self.mapping)  # type: ignore[arg-type]
                start += rows.size


class OnlineTargets(TargetPolicy):
    """The teacher on every slice of x_mix in the run's view (the reference); recomputed = 1.0."""

    name = "online"
    reads_cache = False

    def recompute_mask(self, item: MixedCrop) -> np.ndarray:
        return np.ones(item.unlabeled.size[0], dtype=bool)


class CacheTargets(TargetPolicy):
    """Everything from the store, no teacher in memory; recomputed = 0.0."""

    name = "cache"

    def recompute_mask(self, item: MixedCrop) -> np.ndarray:
        return np.zeros(item.unlabeled.size[0], dtype=bool)


class HybridTargets(TargetPolicy):
    """The store for unaltered slices; the teacher for slices holding the pasted box and for crops
    flipped in-plane (a z flip only reorders slices: cached exactly). The default policy."""

    name = "hybrid"

    def recompute_mask(self, item: MixedCrop) -> np.ndarray:
        depth = item.unlabeled.size[0]
        if item.unlabeled.flips[1] or item.unlabeled.flips[2]:
            return np.ones(depth, dtype=bool)
        mask = np.zeros(depth, dtype=bool)
        if item.mixed and item.box is not None:
            mask[item.box[0]] = True
        return mask


_CLASSES: dict[str, type[TargetPolicy]] = {"online": OnlineTargets, "cache": CacheTargets, "hybrid": HybridTargets}


def _checked_teacher(teacher: Teacher, store: FeatureStore) -> Teacher:
    """The teacher, if it is the store's (sizes and weights)."""
    meta = store.attrs.teacher
    for key, have in (("hidden_size", teacher.hidden_size), ("patch_size", teacher.patch_size)):
        if getattr(meta, key) != have:
            raise TargetsError(f"the teacher's {key} is {have} but the store's is {getattr(meta, key)}: load the "
                               f"store's teacher ({meta.source}) to recompute targets")
    if meta.weights_sha256 and teacher.weights_sha256() != meta.weights_sha256:
        raise TargetsError(f"the teacher's weights differ from those the store was made with ({meta.source}): "
                           "recomputed targets would not match the cached ones; load the store's teacher")
    return teacher


def make_policy(
    name: str,
    store: FeatureStore,
    volumes: VolumeCache | None,
    teacher: Teacher | None,
    mapping: str = DEFAULT_MAPPING,
    view: str = "slice",
) -> TargetPolicy:
    """The target policy ``online``, ``cache`` or ``hybrid`` in the teacher view ``slice`` or ``crop``.

    Raises:
        ValueError (a :class:`~dinomix_cache.errors.UserError` too): an unknown name, view or
            mapping; online/hybrid without a teacher or without volumes; a teacher other than the
            store's; the crop view's cache on a store without crop windows.
    """
    if name not in _CLASSES:
        raise TargetsError(f"unknown target policy {name!r}: use one of {', '.join(POLICIES)}")
    if view not in TEACHER_VIEWS:
        raise TargetsError(f"unknown teacher view {view!r}: use one of {', '.join(TEACHER_VIEWS)}")
    if name != "cache":
        if teacher is None:
            raise TargetsError(f"--targets {name} needs the teacher to recompute targets and none is loaded; "
                               "use --targets cache to train from the store alone")
        if volumes is None:
            raise TargetsError(f"--targets {name} needs the preprocessed volumes to recompute targets; "
                               "use --targets cache to train from the store's features alone")
    if mapping not in MAPPINGS:
        raise TargetsError(f"unknown mapping {mapping!r}: use one of {', '.join(MAPPINGS)}")
    try:
        return _CLASSES[name](store, volumes, teacher if name != "cache" else None, mapping, view)
    except UserError as exc:
        raise TargetsError(str(exc)) from None
