"""Where teacher tokens lie under the student's cells: token grids, area weights, the store's geometry.

The student's deepest map has one cell per ``16×16×16`` crop voxels. A token grid covers an image
(a whole slice, or a crop window) of ``grid × token_px`` pixels; a crop lies at some ``origin`` in
that image. :func:`axis_weights` gives, per crop axis, the share of each token in each cell, so
that ``cells = Wy · tokens · Wxᵀ`` (:func:`apply_weights`). The same weights serve every policy and
both teacher views, so a cached and a recomputed target of the same image agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dinomix_cache.store.feature_store import FeatureStore

__all__ = [
    "CELL",
    "DEFAULT_MAPPING",
    "MAPPINGS",
    "TokenGeometry",
    "TokenGrid",
    "apply_weights",
    "axis_weights",
    "cache_window",
    "token_pixels",
]

CELL = 16  # crop voxels per student cell on every axis (stride of the deepest map)
MAPPINGS = ("area", "bilinear")
# Area weights cover each cell exactly; bilinear samples the token grid at the cell centre. They
# agree for 16-pixel tokens and area is closer whenever a token is not 16 pixels (docs/measurements.md).
DEFAULT_MAPPING = "area"


def axis_weights(size: int, origin: float, flip: bool, token_px: float, grid: int, mapping: str,
                 part: tuple[int, int] | None = None) -> torch.Tensor:
    """(size/16, grid) weights mapping one crop axis of student cells onto a token axis.

    Crop pixel ``p`` (after the flip) is image pixel ``origin + p`` (``origin + size - 1 - p``
    flipped); token ``k`` covers image pixels ``[k·token_px, (k+1)·token_px)``. Rows are normalised
    to the whole cell (sum 1 where the cell lies inside the image), so restricting to ``part`` (crop
    pixels ``[a, b)``) gives the share of the cell inside that interval: full minus box part plus
    box part of another source is exact.

    Raises:
        ValueError: an unknown mapping.
    """
    cells = size // CELL
    a, b = part if part is not None else (0, size)
    lo = np.clip(np.arange(cells) * CELL, a, b).astype(np.float64)
    hi = np.clip((np.arange(cells) + 1) * CELL, a, b).astype(np.float64)
    if mapping == "area":
        src_lo, src_hi = (origin + size - hi, origin + size - lo) if flip else (origin + lo, origin + hi)
        edges = np.arange(grid + 1) * token_px
        overlap = np.minimum(src_hi[:, None], edges[None, 1:]) - np.maximum(src_lo[:, None], edges[None, :-1])
        weights = np.clip(overlap, 0.0, None) / CELL
    elif mapping == "bilinear":
        centre = np.arange(cells) * CELL + CELL / 2
        src = origin + size - centre if flip else origin + centre
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


def apply_weights(wy: torch.Tensor, wx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(n, h, w, C) tokens → (n, Y/16, X/16, C) by the separable weights."""
    return torch.einsum("yk,xl,nklc->nyxc", wy, wx, tokens)


@dataclass(frozen=True)
class TokenGrid:
    """Tokens over an image, and where a crop lies on it.

    Attributes:
        tokens: (n, h, w, C) float32, one grid per crop slice.
        origin: (y, x) of the crop in the image's pixels (may be negative or fractional).
        token_px: (y, x) image pixels per token.
    """

    tokens: torch.Tensor
    origin: tuple[float, float]
    token_px: tuple[float, float]

    def weights(self, size_yx: tuple[int, int], flips_yx: tuple[bool, bool], mapping: str,
                part: tuple[slice, slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Wy, Wx) of a crop of ``size_yx`` (flipped per ``flips_yx``), optionally of the box ``part``."""
        out = []
        for axis in (0, 1):
            span = None if part is None else (part[axis].start, part[axis].stop)
            out.append(axis_weights(size_yx[axis], self.origin[axis], flips_yx[axis], self.token_px[axis],
                                    int(self.tokens.shape[1 + axis]), mapping, span))
        return out[0], out[1]

    def cells(self, size_yx: tuple[int, int], flips_yx: tuple[bool, bool], mapping: str,
              part: tuple[slice, slice] | None = None) -> torch.Tensor:
        """(n, Y/16, X/16, C) cell features of the crop (of its box ``part`` only, if given)."""
        return apply_weights(*self.weights(size_yx, flips_yx, mapping, part), self.tokens)


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
        token_px: slice pixels per token (slice size / grid size).
        mapping: ``"area"`` (each cell the token average weighted by pixel overlap) or
            ``"bilinear"`` (a bilinear sample at the cell centre, edges clamped).

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
    grid = TokenGrid(feats, (float(y0), float(x0)), (float(token_px[0]), float(token_px[1])))
    return grid.cells((sy, sx), (False, False), mapping)


@dataclass(frozen=True)
class TokenGeometry:
    """The store's token geometry: what stage one fed the teacher and what came out.

    Attributes:
        slice_hw: (H, W) of a preprocessed slice.
        input_hw: (H', W') teacher input per slice.
        grid_hw: (h, w) tokens per slice.
        patch: the teacher's patch size.
        hidden: channels per token.
        window_hw: (H, W) of the crop windows in slice pixels, or None (a store without them).
        window_positions: (ny, nx) windows per slice, or None.
        window_grid: (h', w') tokens per window, or None.
    """

    slice_hw: tuple[int, int]
    input_hw: tuple[int, int]
    grid_hw: tuple[int, int]
    patch: int
    hidden: int
    window_hw: tuple[int, int] | None = None
    window_positions: tuple[int, int] | None = None
    window_grid: tuple[int, int] | None = None

    @classmethod
    def of(cls, store: FeatureStore) -> TokenGeometry:
        """Read from the store's (validated) attributes."""
        teacher, windows = store.attrs.teacher, store.attrs.crop_windows
        slice_hw = tuple(store.attrs.preprocessing.target_shape[1:])
        return cls(slice_hw, tuple(teacher.input_size), teacher.token_grid, teacher.patch_size,  # type: ignore[arg-type]
                   teacher.hidden_size, *((windows.size, windows.positions, windows.token_grid) if windows else ()))

    @property
    def token_px(self) -> tuple[float, float]:
        """Slice pixels per stored token along (y, x): 16.0 when the teacher saw the slice at its own
        size (patch 16); ``160 / 14`` for 160-pixel slices seen at 224."""
        return self.slice_hw[0] / self.grid_hw[0], self.slice_hw[1] / self.grid_hw[1]


def token_pixels(store: FeatureStore) -> tuple[float, float]:
    """Slice pixels per stored token along (y, x) (see :attr:`TokenGeometry.token_px`)."""
    return TokenGeometry.of(store).token_px
