"""Distillation targets for the PIC-mixed crop x_mix: from the feature store, from the teacher, or both.

The target of a crop of ``Z×Y×X`` voxels is the teacher's patch-token grid of each slice of the crop
as the student sees it, adaptive-average-pooled to the student's deepest grid (stride 16):
``(C_T, Z/16, Y/16, X/16)``, 16 slices per z cell and 16×16 crop pixels per in-plane cell.

Three policies (``--targets online|cache|hybrid``, :func:`make_policy`):

* :class:`OnlineTargets` runs the teacher on every slice of x_mix (weak view: the stored preprocessed
  intensities, no gamma; the PIC box pasted; flips applied). The paper's behaviour and the reference.
* :class:`CacheTargets` reads everything from the store; no teacher in memory. A student cell maps
  onto the full-slice token grid of the case (``mapping``, see :func:`cache_window`); pixels inside
  the pasted box take the labeled case's tokens, the others the unlabeled case's. Flipped crops get
  the cached map flipped, an approximation (ViT features are not flip-equivariant).
* :class:`HybridTargets` (the default policy) caches every slice that is an unaltered window of one
  case and recomputes with the teacher the slices that hold part of the pasted box, and every slice
  of a crop flipped in-plane. A flip along z only reorders whole slices, which per-slice features
  follow exactly, so it costs no recompute.

Every slice the teacher recomputes is cut from the crop, not from the full slice: even an unaltered
window then differs from the cache by its context (attention sees only the crop), so cache and
online targets never agree exactly (see ``DEFAULT_MAPPING`` for measured fidelities).

When the store's teacher input size differs from the slice size (e.g. 224×224 for 160×160 slices),
a recomputed crop is resized by the same scale, ``input_size / slice size``, with each side rounded
to a multiple of the patch size (a 128-pixel crop side at 224/160 becomes 176, not 179.2), so a
token covers about as many slice pixels as in the store. The same rounding applies to a patch size
that does not divide the crop (patch 14: 128 → 126).
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from dinomix_cache.errors import UserError
from dinomix_cache.store import FeatureStore
from dinomix_cache.teacher import Teacher
from stage2_train.sampling import Crop, VolumeCache, random_crop

__all__ = [
    "CELL",
    "DEFAULT_MAPPING",
    "FEATURE_MEMORY_BYTES",
    "MAPPINGS",
    "POLICIES",
    "TEACHER_BATCH",
    "CacheTargets",
    "HybridTargets",
    "MixedCrop",
    "OnlineTargets",
    "TargetPolicy",
    "TargetsError",
    "cache_window",
    "cosine_fidelity",
    "make_policy",
    "measure_fidelity",
    "token_pixels",
]

log = logging.getLogger("dinomix_cache.train")

CELL = 16  # crop voxels per student cell on every axis (stride of the deepest map)
TEACHER_BATCH = 64  # slices per teacher forward when recomputing
# Cached features kept in memory, whole cases, first come first kept (Synapse at ViT-S/16: 30 cases of
# 6 MB; AMOS: 360, so about half of them). Beyond it, crops read their chunks from the store.
FEATURE_MEMORY_BYTES = 1 << 30
MAPPINGS = ("area", "bilinear")
POLICIES = ("online", "cache", "hybrid")
# Cell → token mapping of the cache, chosen by measurement (measure_fidelity, mean cosine per student cell
# against online). Teacher random:vits16: the ViT-S/16 architecture with random weights, the only one
# reachable offline (layerscale 1e-5 makes it almost context-free: token-aligned unmixed windows score
# 1.0000). Phantom, 6 cases (matrix 192), store at target shape (64, 160, 160); 16 crops 64×128×128 at
# uniform random offsets (in-plane mostly not multiples of 16), each unmixed and with a box of
# U(0.25, 0.75) of the crop per axis pasted from another random crop at a random position:
#   teacher input = slice size (16 px tokens): unmixed cache-area 0.818, cache-bilinear 0.818, hybrid 0.818;
#                                              mixed   cache-area 0.822, cache-bilinear 0.822, hybrid 0.931
#     (16 px tokens on 16 px cells: area weights ARE bilinear weights; they differ only in cells the
#     box cuts, 0.8216 vs 0.8224; hybrid recomputed 50 % of the slices)
#   teacher input 224 for 160 px slices:       unmixed cache-area 0.888, cache-bilinear 0.867;
#                                              mixed   cache-area 0.894, cache-bilinear 0.872,
#                                                      hybrid-area 0.952, hybrid-bilinear 0.942
# (Target shape (32, 96, 96), 24 crops 32×64×64: the same ranking, e.g. teacher input 144: unmixed area
# 0.877 vs bilinear 0.849, hybrid 0.955 vs 0.941.) Area is at most 0.001 behind (box-cut cells) and wins
# by 0.01-0.03 whenever a token is not 16 px, so it is the default. Re-measure with real DINOv3 weights
# before quoting numbers.
DEFAULT_MAPPING = "area"


class TargetsError(UserError, ValueError):
    """A target policy that cannot work as asked (a ValueError; the CLI prints it as one line)."""


@dataclass(frozen=True)
class MixedCrop:
    """The geometry of one x_mix: an unlabeled crop, optionally with a box pasted from a labeled crop.

    Attributes:
        unlabeled: the unlabeled crop (offset, size, flips).
        labeled: the labeled crop the box came from (same size), or None (not mixed).
        box: ``(z, y, x)`` slices in crop coordinates (after flips: where the student sees the box),
            or None. ``slice(None)`` bounds are resolved against the crop size.
    """

    unlabeled: Crop
    labeled: Crop | None = None
    box: tuple[slice, slice, slice] | None = None

    def __post_init__(self) -> None:
        if (self.labeled is None) != (self.box is None):
            raise ValueError("a MixedCrop needs both labeled and box, or neither")
        if self.box is None or self.labeled is None:
            return
        if tuple(self.labeled.size) != tuple(self.unlabeled.size):
            raise ValueError(f"labeled crop size {self.labeled.size} differs from unlabeled {self.unlabeled.size}")
        if len(self.box) != 3:
            raise ValueError(f"box must be three slices (z, y, x), got {self.box!r}")
        resolved = []
        for sl, n in zip(self.box, self.unlabeled.size, strict=True):
            start, stop, step = sl.indices(int(n))
            if step != 1:
                raise ValueError(f"box slices must have step 1, got {sl!r}")
            resolved.append(slice(start, max(start, stop)))
        object.__setattr__(self, "box", tuple(resolved))

    @property
    def mixed(self) -> bool:
        """True if a non-empty box is pasted."""
        return self.box is not None and all(s.stop > s.start for s in self.box)


# --------------------------------------------------------------------------------------- mapping weights


def _axis_weights(
    size: int, offset: int, flip: bool, token_px: float, grid: int, mapping: str, part: tuple[int, int] | None = None
) -> torch.Tensor:
    """(size/16, grid) weights mapping one crop axis of student cells onto the slice's token axis.

    Crop pixel ``p`` (after the flip) is slice pixel ``offset + p`` (``offset + size - 1 - p`` flipped);
    token ``k`` covers slice pixels ``[k·token_px, (k+1)·token_px)``. Rows are normalised to the whole
    cell (sum 1 over the full crop), so restricting to ``part`` (crop pixels ``[a, b)``) gives the
    share of the cell inside that interval: full minus box part plus box part of another source is
    exact.
    """
    cells = size // CELL
    a, b = part if part is not None else (0, size)
    lo = np.clip(np.arange(cells) * CELL, a, b).astype(np.float64)
    hi = np.clip((np.arange(cells) + 1) * CELL, a, b).astype(np.float64)
    if mapping == "area":
        src_lo, src_hi = (offset + size - hi, offset + size - lo) if flip else (offset + lo, offset + hi)
        edges = np.arange(grid + 1) * token_px
        overlap = np.minimum(src_hi[:, None], edges[None, 1:]) - np.maximum(src_lo[:, None], edges[None, :-1])
        weights = np.clip(overlap, 0.0, None) / CELL
    elif mapping == "bilinear":
        centre = np.arange(cells) * CELL + CELL / 2
        src = offset + size - centre if flip else offset + centre
        q = np.clip(src / token_px - 0.5, 0.0, grid - 1)
        k0 = np.floor(q).astype(np.int64)
        k1 = np.minimum(k0 + 1, grid - 1)
        frac = q - k0
        weights = np.zeros((cells, grid))
        np.add.at(weights, (np.arange(cells), k0), 1.0 - frac)
        np.add.at(weights, (np.arange(cells), k1), frac)
        weights *= ((hi - lo) / CELL)[:, None]  # the share of the cell inside `part`
    else:
        raise ValueError(f"unknown mapping {mapping!r}: use one of {', '.join(MAPPINGS)}")
    return torch.from_numpy(weights).to(torch.float32)


def _apply(wy: torch.Tensor, wx: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """(n, h, w, C) features → (n, Y/16, X/16, C) by the separable weights."""
    return torch.einsum("yk,xl,nklc->nyxc", wy, wx, feats)


def cache_window(
    features: np.ndarray | torch.Tensor,
    offset_yx: tuple[int, int],
    size_yx: tuple[int, int],
    token_px: tuple[float, float],
    mapping: str,
) -> torch.Tensor:
    """Student-cell features of an in-plane crop window, from the full-slice token grids.

    Args:
        features: (n, h, w, C) token grids of full slices (any float dtype).
        offset_yx: (y0, x0) of the window in slice pixels.
        size_yx: (Y, X) of the window, multiples of 16.
        token_px: slice pixels per token (slice size / grid size; 16 when the teacher input is the
            slice size).
        mapping: ``"area"``: each cell (crop pixels ``[y0+16j, y0+16(j+1)) × …``) is the average of
            the tokens weighted by their pixel overlap with it (exact coverage); ``"bilinear"``: a
            bilinear sample of the token grid at the cell centre, in token-centre coordinates with
            the edges clamped.

    Returns:
        (n, Y/16, X/16, C) float32.

    Raises:
        ValueError: bad shapes, a window outside the slice, or an unknown mapping.
    """
    feats = torch.as_tensor(features).to(torch.float32)
    if feats.ndim != 4:
        raise ValueError(f"features must be (n, h, w, C), got shape {tuple(feats.shape)}")
    (y0, x0), (sy, sx) = offset_yx, size_yx
    if sy % CELL or sx % CELL or sy <= 0 or sx <= 0:
        raise ValueError(f"window size {tuple(size_yx)} must be positive multiples of {CELL}")
    _, h, w, _ = feats.shape
    if y0 < 0 or x0 < 0 or y0 + sy > h * token_px[0] + 1e-6 or x0 + sx > w * token_px[1] + 1e-6:
        raise ValueError(f"window at {tuple(offset_yx)} of size {tuple(size_yx)} lies outside the slice")
    wy = _axis_weights(sy, y0, False, float(token_px[0]), h, mapping)
    wx = _axis_weights(sx, x0, False, float(token_px[1]), w, mapping)
    return _apply(wy, wx, feats)


def _token_geometry(store: FeatureStore) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(slice (H, W), teacher input (H, W), token grid (h, w)) of the store's features."""
    meta = store.meta["teacher"]
    patch = int(meta["patch_size"])
    slice_hw = tuple(int(v) for v in store.meta["preprocessing"]["target_shape"][1:])
    input_hw = tuple(int(v) for v in meta.get("input_size") or slice_hw)
    return slice_hw, input_hw, (input_hw[0] // patch, input_hw[1] // patch)  # type: ignore[return-value]


def token_pixels(store: FeatureStore) -> tuple[float, float]:
    """Slice pixels per stored token along (y, x): 16.0 when the teacher input is the slice size
    (patch 16), ``160 / 14`` for 160-pixel slices seen at 224 by a patch-16 teacher."""
    slice_hw, _, grid_hw = _token_geometry(store)
    return slice_hw[0] / grid_hw[0], slice_hw[1] / grid_hw[1]


def cosine_fidelity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over cells (channels on axis 1) of two (B, C, z, y, x) target tensors."""
    if a.shape != b.shape:
        raise ValueError(f"target shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(F.cosine_similarity(a.double(), b.double(), dim=1).mean())


def _pool_grid(grid: torch.Tensor, cells_yx: tuple[int, int]) -> torch.Tensor:
    """(n, gh, gw, C) teacher grids → (n, Y/16, X/16, C) by adaptive average pooling."""
    if tuple(grid.shape[1:3]) == tuple(cells_yx):
        return grid
    pooled = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), cells_yx)
    return pooled.permute(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------- policies


class TargetPolicy(ABC):
    """Distillation targets for batches of :class:`MixedCrop`; see the module docstring.

    Subclasses decide which slices the teacher recomputes (:meth:`recompute_mask`); the rest come
    from the store, whose cases are kept in memory (float16) up to ``memory_bytes``. Build one with
    :func:`make_policy`.
    """

    name: str = ""

    def __init__(
        self,
        store: FeatureStore,
        volumes: VolumeCache | None = None,
        teacher: Teacher | None = None,
        mapping: str = DEFAULT_MAPPING,
        batch_size: int = TEACHER_BATCH,
        memory_bytes: int = FEATURE_MEMORY_BYTES,
    ) -> None:
        if mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping {mapping!r}: use one of {', '.join(MAPPINGS)}")
        self.store = store
        self.volumes = volumes
        self.mapping = mapping
        self.batch_size = int(batch_size)
        meta = store.meta["teacher"]
        self.hidden_size = int(meta["hidden_size"])
        self.patch_size = int(meta["patch_size"])
        self.slice_hw, self.input_hw, self.grid_hw = _token_geometry(store)
        self.token_px = token_pixels(store)
        self.teacher = _crop_teacher(teacher, meta) if teacher is not None else None
        self._said_resize = False
        self._depths: dict[str, int] = {}
        self.memory_bytes = int(memory_bytes)
        self._memo: dict[str, np.ndarray] = {}
        self._memo_bytes = 0

    @abstractmethod
    def recompute_mask(self, item: MixedCrop) -> np.ndarray:
        """(Z,) bool: which slices of the crop (after flips) the teacher recomputes."""

    def teacher_crop_size(self, crop_hw: tuple[int, int]) -> tuple[int, int]:
        """Teacher input for a crop: ``crop · input_size / slice size``, each side rounded to the patch."""
        out = []
        for n, inp, sl in zip(crop_hw, self.input_hw, self.slice_hw, strict=True):
            out.append(max(1, round(n * inp / sl / self.patch_size)) * self.patch_size)
        return out[0], out[1]

    def targets(self, items: Sequence[MixedCrop]) -> tuple[torch.Tensor, float]:
        """(B, C_T, Z/16, Y/16, X/16) float32 targets and the fraction of crop slices the teacher recomputed."""
        if not items:
            raise ValueError("targets() needs at least one crop")
        size = tuple(items[0].unlabeled.size)
        for item in items:
            if tuple(item.unlabeled.size) != size:
                raise ValueError(f"crop sizes differ within a batch: {size} vs {tuple(item.unlabeled.size)}")
        if any(n % CELL or n <= 0 for n in size):
            raise ValueError(f"crop size {size} must be positive multiples of {CELL} on every axis")
        for item in items:
            self._check_inside(item.unlabeled)
            if item.labeled is not None:
                self._check_inside(item.labeled)
        masks = [self.recompute_mask(item) for item in items]
        slices = [self._cached_slices(item, ~mask) for item, mask in zip(items, masks, strict=True)]
        self._recompute(items, masks, slices)
        z, y, x = (n // CELL for n in size)
        out = torch.stack([s.reshape(z, CELL, y, x, -1).mean(1).permute(3, 0, 1, 2) for s in slices])
        total = sum(len(m) for m in masks)
        return out.contiguous(), float(sum(int(m.sum()) for m in masks) / total)

    def _check_inside(self, crop: Crop) -> None:
        depth = self._depths.get(crop.case_id)
        if depth is None:
            depth = self._depths[crop.case_id] = int(self.store.feature_shape(crop.case_id)[0])
        shape = (depth, *self.slice_hw)
        if any(o < 0 or o + n > v for o, n, v in zip(crop.offset, crop.size, shape, strict=True)):
            raise ValueError(f"crop at {tuple(crop.offset)} of size {tuple(crop.size)} lies outside case "
                             f"{crop.case_id}'s volume {shape}")

    # ------------------------------------------------------------------------------------ cache
    def _read(self, crop: Crop, rows: np.ndarray) -> torch.Tensor:
        """Features of crop slices ``rows`` (after the crop's z flip), (len(rows), h, w, C) float32."""
        depth = crop.size[0]
        src = depth - 1 - rows if crop.flips[0] else rows
        start, stop = int(src.min()), int(src.max()) + 1
        z0 = crop.offset[0]
        case = self._memo.get(crop.case_id)
        if case is None and self._memo_bytes + self._case_bytes(crop.case_id) <= self.memory_bytes:
            # Whole cases stay in memory (float16, as stored) while they fit: every later crop of the
            # case is then a slice, not a read and decompression of 2-3 chunks.
            case = self._memo[crop.case_id] = np.asarray(self.store.read_features(crop.case_id))
            self._memo_bytes += case.nbytes
        feats = case[z0 + start:z0 + stop] if case is not None else self.store.read_features(
            crop.case_id, z0 + start, z0 + stop)
        return torch.from_numpy(np.asarray(feats, dtype=np.float32)[src - start])

    def _case_bytes(self, case_id: str) -> int:
        return int(np.prod(self.store.feature_shape(case_id))) * 2  # float16

    def _weights(self, crop: Crop, part: tuple[slice, slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ws = []
        for axis in (1, 2):
            span = None if part is None else (part[axis - 1].start, part[axis - 1].stop)
            ws.append(_axis_weights(crop.size[axis], crop.offset[axis], crop.flips[axis],
                                    self.token_px[axis - 1], self.grid_hw[axis - 1], self.mapping, span))
        return ws[0], ws[1]

    def _cached_slices(self, item: MixedCrop, wanted: np.ndarray) -> torch.Tensor:
        """(Z, Y/16, X/16, C) per-slice cell maps from the store for the ``wanted`` slices (zeros elsewhere)."""
        depth, height, width = item.unlabeled.size
        out = torch.zeros(depth, height // CELL, width // CELL, self.hidden_size)
        rows = np.flatnonzero(wanted)
        if rows.size == 0:
            return out
        unl = item.unlabeled
        feats = self._read(unl, rows)
        out[rows] = _apply(*self._weights(unl), feats)
        if item.mixed and item.labeled is not None and item.box is not None:
            bz, by, bx = item.box
            inside = (rows >= bz.start) & (rows < bz.stop)
            if inside.any():
                # the box is a rectangle: the unlabeled case's share of it out, the labeled case's in
                box_rows = rows[inside]
                out[box_rows] -= _apply(*self._weights(unl, (by, bx)), feats[torch.from_numpy(inside)])
                out[box_rows] += _apply(*self._weights(item.labeled, (by, bx)), self._read(item.labeled, box_rows))
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
            images = self._mixed_slices(item, rows)
            shape = self.teacher_crop_size(tuple(images.shape[1:]))
            jobs.setdefault(shape, []).append((i, rows, images))
        for shape, group in jobs.items():
            images = torch.cat([g[2] for g in group])
            if tuple(images.shape[1:]) != shape:
                if not self._said_resize:
                    log.info("teacher targets: crops of %s px resized to %s px (store input %s for slices %s)",
                             tuple(images.shape[1:]), shape, self.input_hw, self.slice_hw)
                    self._said_resize = True
                images = F.interpolate(images[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
            cells = tuple(slices[group[0][0]].shape[1:3])
            pooled = torch.cat([
                _pool_grid(self.teacher.forward_slices(images[k:k + self.batch_size]), cells)  # type: ignore[union-attr]
                for k in range(0, images.shape[0], self.batch_size)
            ])
            start = 0
            for i, rows, _ in group:
                slices[i][rows] = pooled[start:start + rows.size]
                start += rows.size

    def _mixed_slices(self, item: MixedCrop, rows: np.ndarray) -> torch.Tensor:
        """Slices ``rows`` of x_mix's weak view (box pasted, flips applied), (len(rows), Y, X) float32."""
        assert self.volumes is not None
        image = self.volumes.crop_image(item.unlabeled)[0]
        if item.mixed and item.labeled is not None and item.box is not None:
            image[item.box] = self.volumes.crop_image(item.labeled)[0][item.box]
        return image[torch.from_numpy(rows)]


class OnlineTargets(TargetPolicy):
    """The teacher on every slice of x_mix as the student sees it (the reference); recomputed = 1.0."""

    name = "online"

    def recompute_mask(self, item: MixedCrop) -> np.ndarray:
        return np.ones(item.unlabeled.size[0], dtype=bool)


class CacheTargets(TargetPolicy):
    """Everything from the store, no teacher in memory; recomputed = 0.0."""

    name = "cache"

    def recompute_mask(self, item: MixedCrop) -> np.ndarray:
        return np.zeros(item.unlabeled.size[0], dtype=bool)


class HybridTargets(TargetPolicy):
    """Cache for unaltered windows; the teacher for slices holding the pasted box and for crops
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


def _crop_teacher(teacher: Teacher, meta: dict) -> Teacher:
    """The teacher, checked against the store's, running at whatever size it is given."""
    for key, have in (("hidden_size", teacher.hidden_size), ("patch_size", teacher.patch_size)):
        if int(meta.get(key, have)) != have:
            raise TargetsError(f"the teacher's {key} is {have} but the store's is {meta.get(key)}: load the "
                               f"store's teacher ({meta.get('source')}) to recompute targets")
    stored = meta.get("weights_sha256")
    if stored and teacher.weights_sha256() != stored:
        raise TargetsError(f"the teacher's weights differ from those the store was made with ({meta.get('source')}): "
                           "recomputed targets would not match the cached ones; load the store's teacher")
    if teacher.settings.input_size is None:
        return teacher
    # The policy scales crops itself (teacher_crop_size); a fixed input size would resize them again.
    crop_teacher = copy.copy(teacher)
    crop_teacher.settings = replace(teacher.settings, input_size=None)
    return crop_teacher


def make_policy(
    name: str,
    store: FeatureStore,
    volumes: VolumeCache | None,
    teacher: Teacher | None,
    mapping: str = DEFAULT_MAPPING,
) -> TargetPolicy:
    """The target policy ``online``, ``cache`` or ``hybrid`` (see the module docstring).

    Raises:
        ValueError (a :class:`~dinomix_cache.errors.UserError` too): an unknown name or mapping;
            online/hybrid without a teacher or without volumes; a teacher other than the store's.
    """
    if name not in _CLASSES:
        raise TargetsError(f"unknown target policy {name!r}: use one of {', '.join(POLICIES)}")
    if name != "cache":
        if teacher is None:
            raise TargetsError(f"--targets {name} needs the teacher to recompute targets and none is loaded; "
                               "use --targets cache to train from the store alone")
        if volumes is None:
            raise TargetsError(f"--targets {name} needs the preprocessed volumes to recompute targets; "
                               "use --targets cache to train from the store's features alone")
    if mapping not in MAPPINGS:
        raise TargetsError(f"unknown mapping {mapping!r}: use one of {', '.join(MAPPINGS)}")
    return _CLASSES[name](store, volumes, teacher if name != "cache" else None, mapping)


def measure_fidelity(
    store: FeatureStore,
    volumes: VolumeCache,
    teacher: Teacher,
    crop_size: tuple[int, int, int],
    n_crops: int,
    rng: np.random.Generator,
    box_fraction: tuple[float, float] = (0.25, 0.75),
) -> dict[str, dict[str, float]]:
    """Mean cosine per student cell of cache (area, bilinear) and hybrid targets against online ones.

    ``n_crops`` random crops (uniform offsets, so in-plane offsets are mostly not multiples of 16)
    of random cases of ``volumes``, no flips; each once unmixed and once with a box pasted from
    another random crop: per axis ``U(box_fraction)`` of the crop, at a random position.

    Returns:
        ``{"unmixed": {...}, "mixed": {...}}``, each with ``cache-area``, ``cache-bilinear``,
        ``hybrid-area``, ``hybrid-bilinear`` cosines and ``hybrid-recomputed`` (fraction of slices).
    """
    cases = volumes.case_ids
    plain, mixed = [], []
    for _ in range(n_crops):
        unl_id, lab_id = (str(rng.choice(cases)) for _ in range(2))
        unl = random_crop(unl_id, volumes.shape(unl_id), crop_size, rng)
        lab = random_crop(lab_id, volumes.shape(lab_id), crop_size, rng)
        box = []
        for n in crop_size:
            side = max(1, round(n * rng.uniform(*box_fraction)))
            start = int(rng.integers(0, n - side + 1))
            box.append(slice(start, start + side))
        plain.append(MixedCrop(unl))
        mixed.append(MixedCrop(unl, lab, tuple(box)))  # type: ignore[arg-type]
    online = OnlineTargets(store, volumes, teacher)
    result: dict[str, dict[str, float]] = {}
    for label, items in (("unmixed", plain), ("mixed", mixed)):
        ref = online.targets(items)[0]
        row: dict[str, float] = {}
        for mapping in MAPPINGS:
            row[f"cache-{mapping}"] = cosine_fidelity(CacheTargets(store, mapping=mapping).targets(items)[0], ref)
            hybrid = HybridTargets(store, volumes, teacher, mapping)
            hyb, frac = hybrid.targets(items)
            row[f"hybrid-{mapping}"] = cosine_fidelity(hyb, ref)
            row["hybrid-recomputed"] = frac
        result[label] = row
    return result
