"""What the teacher sees of x_mix (the teacher view), and where the stored tokens of a crop lie.

A real ViT's token depends on the rest of its image and on its position relative to the image's
extent, so "the teacher's target for a crop" needs a definition. Two are offered, recorded in the
run's settings (``--teacher-view``):

* :class:`SliceView` (``slice``, the default): the teacher sees whole preprocessed slices, exactly
  as stage one did. An altered slice is altered as a whole slice: in-plane flips flip the whole
  slice, and the PIC box is pasted at its place in the slice (the unlabeled crop's offset plus the
  box's offset); the crop then takes its window of the slice's tokens. An unaltered slice's target
  *is* the stored tokens, for any crop size and offset.
* :class:`CropView` (``crop``, the paper's training-time teacher): the teacher sees the crop itself,
  resized by the store's ``input size / slice size``. Stored targets exist for the crop windows of
  a store made with ``extract --crop-windows HxW`` (the crop's in-plane size), at token-aligned
  offsets; a crop between them takes the nearest window (approximate).

Each view says where a crop's cached tokens lie (:meth:`TeacherView.cached`), which images the
teacher must see to recompute slices of x_mix (:meth:`TeacherView.teacher_images`), and how its
output maps onto the crop (:meth:`TeacherView.recomputed`). The same area weights map both, so a
recomputed unaltered slice equals its cached one up to the store's float16 rounding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.teacher.model import scaled_input_size
from stage2_train.sampling.crops import Crop
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.targets.geometry import TokenGeometry, TokenGrid

__all__ = ["TEACHER_VIEWS", "CropView", "MixedCrop", "SliceView", "TeacherView", "ViewName", "make_view"]

ViewName = Literal["slice", "crop"]
TEACHER_VIEWS: tuple[ViewName, ...] = get_args(ViewName)
# Cached features kept in memory, whole cases, first come first kept (Synapse at ViT-S/16: 30 cases of
# 6 MB; AMOS: 360, so about half of them). Beyond it, crops read their chunks from the store.
FEATURE_MEMORY_BYTES = 1 << 30


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


def _source_rows(crop: Crop, rows: np.ndarray) -> np.ndarray:
    """Volume slice index of each crop row (after the crop's z flip)."""
    return crop.offset[0] + (crop.size[0] - 1 - rows if crop.flips[0] else rows)


def mixed_rows(volumes: VolumeCache, item: MixedCrop, rows: np.ndarray) -> torch.Tensor:
    """Rows ``rows`` of x_mix's weak view as the student sees it (flips applied, box pasted),
    (len(rows), Y, X) float32 (the stored intensities: the teacher never sees gamma)."""
    image = volumes.crop_image(item.unlabeled)[0]
    if item.mixed and item.labeled is not None and item.box is not None:
        image[item.box] = volumes.crop_image(item.labeled)[0][item.box]
    return image[torch.from_numpy(rows)]


class TeacherView(ABC):
    """One definition of what the teacher sees; see the module docstring. Build with :func:`make_view`."""

    name: str = ""

    def __init__(self, store: FeatureStore, geometry: TokenGeometry, memory_bytes: int = FEATURE_MEMORY_BYTES):
        self.store = store
        self.geometry = geometry
        self.memory_bytes = int(memory_bytes)
        self._memo: dict[tuple[str, str], np.ndarray] = {}
        self._memo_bytes = 0

    def check_crop(self, size: tuple[int, int, int]) -> None:  # noqa: B027 (optional hook; the slice view needs none)
        """Raise ValueError if crops of ``size`` cannot have cached targets in this view."""

    @abstractmethod
    def cached(self, crop: Crop, rows: np.ndarray) -> TokenGrid:
        """The stored tokens under crop rows ``rows`` (after the crop's z flip), and where the crop lies on them."""

    @abstractmethod
    def teacher_images(self, volumes: VolumeCache, item: MixedCrop, rows: np.ndarray) -> torch.Tensor:
        """(n, H, W) float32 images the teacher sees for rows ``rows`` of x_mix."""

    @abstractmethod
    def input_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The teacher input (H', W') for images of ``image_hw`` pixels."""

    @abstractmethod
    def recomputed(self, item: MixedCrop, tokens: torch.Tensor) -> TokenGrid:
        """The teacher's (n, h, w, C) tokens of :meth:`teacher_images`, placed under the crop (no flip:
        the teacher saw the images flipped already)."""

    def _case(self, name: str, case_id: str) -> np.ndarray | None:
        """A whole case's ``features`` or ``windows`` from memory, read on first use while they fit
        (float16, as stored): every later crop of the case is then a slice, not a read and
        decompression of chunks. None when it does not fit."""
        key = (name, case_id)
        case = self._memo.get(key)
        if case is None:
            features = name == "features"
            shape = self.store.feature_shape(case_id) if features else self.store.windows_shape(case_id)
            if self._memo_bytes + int(np.prod(shape)) * 2 <= self.memory_bytes:
                case = np.asarray(self.store.read_features(case_id) if features else self.store.read_windows(case_id))
                self._memo[key] = case
                self._memo_bytes += case.nbytes
        return case


class SliceView(TeacherView):
    """The teacher sees whole preprocessed slices (stage one's input); altered slices are altered whole."""

    name = "slice"

    def cached(self, crop: Crop, rows: np.ndarray) -> TokenGrid:
        src = _source_rows(crop, rows)
        start, stop = int(src.min()), int(src.max()) + 1
        case = self._case("features", crop.case_id)
        feats = case[start:stop] if case is not None else self.store.read_features(crop.case_id, start, stop)
        tokens = torch.from_numpy(np.asarray(feats, dtype=np.float32)[src - start])
        return TokenGrid(tokens, (float(crop.offset[1]), float(crop.offset[2])), self.geometry.token_px)

    def _origin(self, crop: Crop) -> tuple[int, int]:
        """Where the crop lies in its slice once the slice is flipped as the crop is."""
        out = []
        for axis in (1, 2):
            n, o, s = crop.size[axis], crop.offset[axis], self.geometry.slice_hw[axis - 1]
            out.append(s - o - n if crop.flips[axis] else o)
        return out[0], out[1]

    def teacher_images(self, volumes: VolumeCache, item: MixedCrop, rows: np.ndarray) -> torch.Tensor:
        unl = item.unlabeled
        full = torch.from_numpy(np.asarray(volumes.image(unl.case_id)[_source_rows(unl, rows)], dtype=np.float32))
        dims = [d for d, f in ((1, unl.flips[1]), (2, unl.flips[2])) if f]
        if dims:
            full = torch.flip(full, dims)
        (y0, x0), (_, height, width) = self._origin(unl), unl.size
        full[:, y0:y0 + height, x0:x0 + width] = mixed_rows(volumes, item, rows)
        return full

    def input_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return self.geometry.input_hw

    def recomputed(self, item: MixedCrop, tokens: torch.Tensor) -> TokenGrid:
        y0, x0 = self._origin(item.unlabeled)
        return TokenGrid(tokens, (float(y0), float(x0)), self.geometry.token_px)


class CropView(TeacherView):
    """The teacher sees the crop; cached tokens come from the store's crop windows."""

    name = "crop"

    def check_crop(self, size: tuple[int, int, int]) -> None:
        window = self.geometry.window_hw
        if window is None:
            raise ValueError(f"{self.store.location} holds no crop windows: the crop view's cache needs a store made "
                             f"with extract --crop-windows {size[1]}x{size[2]}")
        if tuple(size[1:]) != tuple(window):
            raise ValueError(f"crop {size[1]}x{size[2]} in-plane differs from the store's crop windows "
                             f"{window[0]}x{window[1]} (crop_windows.size)")

    def window_index(self, crop: Crop) -> tuple[int, int]:
        """The window nearest to the crop's offset (exact when the offset is on the token grid)."""
        assert self.geometry.window_positions is not None
        step = self.geometry.token_px
        return tuple(int(min(max(round(crop.offset[a] / step[a - 1]), 0), n - 1))  # type: ignore[return-value]
                     for a, n in zip((1, 2), self.geometry.window_positions, strict=True))

    def cached(self, crop: Crop, rows: np.ndarray) -> TokenGrid:
        g = self.geometry
        assert g.window_hw is not None and g.window_grid is not None
        ky, kx = self.window_index(crop)
        src = _source_rows(crop, rows)
        start, stop = int(src.min()), int(src.max()) + 1
        case = self._case("windows", crop.case_id)
        wins = case[start:stop] if case is not None else self.store.read_windows(crop.case_id, start, stop)
        tokens = torch.from_numpy(np.asarray(wins[src - start, ky, kx], dtype=np.float32))
        step = g.token_px
        origin = (crop.offset[1] - ky * step[0], crop.offset[2] - kx * step[1])
        return TokenGrid(tokens, origin, (g.window_hw[0] / g.window_grid[0], g.window_hw[1] / g.window_grid[1]))

    def teacher_images(self, volumes: VolumeCache, item: MixedCrop, rows: np.ndarray) -> torch.Tensor:
        return mixed_rows(volumes, item, rows)

    def input_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        g = self.geometry
        return scaled_input_size(image_hw, g.slice_hw, g.input_hw, g.patch)

    def recomputed(self, item: MixedCrop, tokens: torch.Tensor) -> TokenGrid:
        _, height, width = item.unlabeled.size
        return TokenGrid(tokens, (0.0, 0.0), (height / tokens.shape[1], width / tokens.shape[2]))


def make_view(name: str, store: FeatureStore, need_windows: bool) -> TeacherView:
    """The view ``slice`` or ``crop`` on ``store``.

    Args:
        need_windows: the policy reads cached tokens (``cache``, ``hybrid``): the crop view then
            needs a store with crop windows.

    Raises:
        UserError: an unknown view, or the crop view's cache on a store without crop windows.
    """
    if name not in TEACHER_VIEWS:
        raise UserError(f"unknown teacher view {name!r}: use one of {', '.join(TEACHER_VIEWS)}")
    geometry = TokenGeometry.of(store)
    if name == "crop" and need_windows and geometry.window_hw is None:
        raise UserError(f"{store.location} holds no crop windows, which --teacher-view crop needs for cached targets: "
                        "make the store with `dinomix-cache extract ... --crop-windows HxW` (the training crop's "
                        "in-plane size, e.g. 128x128), or train with --targets online or --teacher-view slice")
    return (SliceView if name == "slice" else CropView)(store, geometry)
