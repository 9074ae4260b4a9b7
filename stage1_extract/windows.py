"""Crop windows: the teacher's tokens of every token-aligned window a training crop can take.

In the ``crop`` teacher view the teacher sees the training crop itself, not the whole slice. A
real ViT's tokens depend on their image's extent (context, and positions normalised to the image),
so a crop's tokens are not a window of the slice's tokens. ``extract --crop-windows HxW`` therefore
stores, for every slice, the tokens of each ``H×W`` window whose offset lies on the store's token
grid: for 128×128 windows of 160-pixel slices at 16 pixels a token, 3 × 3 windows of 8 × 8 tokens.
A training crop of that in-plane size at a token-aligned offset then reads its targets from the
store exactly as the teacher would compute them on the crop.

Each window goes through the very path a recompute in stage two takes: cut from the preprocessed
slice, resized by the store's ``input size / slice size`` (:func:`~dinomix_cache.teacher.model.scaled_input_size`)
and passed to :meth:`~dinomix_cache.teacher.model.Teacher.forward_slices`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dinomix_cache.errors import UserError
from dinomix_cache.teacher.model import Teacher, scaled_input_size

__all__ = ["WindowGeometry", "slice_forward", "window_geometry", "window_tokens"]


@dataclass(frozen=True)
class WindowGeometry:
    """Where the crop windows of a slice lie and what the teacher sees of each.

    Attributes:
        size: (H, W) of a window in slice pixels.
        step: (sy, sx) slice pixels between window offsets (one token).
        positions: (ny, nx) windows per slice along each axis.
        input_size: (H', W') teacher input of a window.
        token_grid: (h', w') tokens of a window.
    """

    size: tuple[int, int]
    step: tuple[int, int]
    positions: tuple[int, int]
    input_size: tuple[int, int]
    token_grid: tuple[int, int]

    def to_json(self) -> dict[str, list[int]]:
        """The store's ``crop_windows`` attribute."""
        return {"size": list(self.size), "positions": list(self.positions), "token_grid": list(self.token_grid)}

    def offsets(self) -> list[tuple[int, int]]:
        """(y, x) slice-pixel offsets of the windows, row-major over ``positions``."""
        ny, nx = self.positions
        return [(i * self.step[0], j * self.step[1]) for i in range(ny) for j in range(nx)]


def window_geometry(window_hw: tuple[int, int], slice_hw: tuple[int, int], input_hw: tuple[int, int],
                    patch: int) -> WindowGeometry:
    """The windows of ``window_hw`` pixels in slices of ``slice_hw`` seen by the teacher at ``input_hw``.

    Raises:
        UserError: a token that is not a whole number of slice pixels (windows could not be
            token-aligned), or a window that is not a multiple of the token size or exceeds the slice.
    """
    step = []
    for axis, (s, i) in enumerate(zip(slice_hw, input_hw, strict=True)):
        tokens = i // patch
        if s % tokens:
            raise UserError(f"--crop-windows needs tokens of whole slice pixels, but {s} slice pixels over "
                            f"{tokens} tokens (axis {'yx'[axis]}) is not; choose an --input-size whose token "
                            "count divides the slice size")
        step.append(s // tokens)
    for n, s, t in zip(window_hw, slice_hw, step, strict=True):
        if n <= 0 or n > s or n % t:
            raise UserError(f"--crop-windows {window_hw[0]}x{window_hw[1]}: each side must be a multiple of the "
                            f"token size ({step[0]}x{step[1]} slice pixels) and at most the slice "
                            f"({slice_hw[0]}x{slice_hw[1]})")
    positions = tuple((s - n) // t + 1 for n, s, t in zip(window_hw, slice_hw, step, strict=True))
    input_size = scaled_input_size(window_hw, slice_hw, input_hw, patch)
    grid = (input_size[0] // patch, input_size[1] // patch)
    return WindowGeometry(tuple(window_hw), tuple(step), positions, input_size, grid)  # type: ignore[arg-type]


def window_tokens(teacher: Teacher, slices: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
    """(B, H, W) slices in [0, 1] → (B, ny, nx, h', w', C) float32 tokens of every crop window."""
    (wh, ww), (ny, nx) = geometry.size, geometry.positions
    crops = torch.stack([slices[:, y:y + wh, x:x + ww] for y, x in geometry.offsets()], dim=1)
    flat = crops.reshape(-1, wh, ww)
    tokens = teacher.forward_slices(flat, input_size=geometry.input_size)
    return tokens.reshape(slices.shape[0], ny, nx, *tokens.shape[1:])


def slice_forward(teacher: Teacher, geometry: WindowGeometry | None
                  ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """The forward of stage one for a batch of slices: ``(slice tokens, window tokens or None)``."""

    def forward(slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = teacher.forward_slices(slices)
        return tokens, None if geometry is None else window_tokens(teacher, slices, geometry)

    return forward
