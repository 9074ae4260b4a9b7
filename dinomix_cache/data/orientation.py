"""Voxel-array orientation: bring a file's voxel order to the canonical array axes and back.

Only axis permutations and flips happen (nibabel's ``io_orientation`` picks the nearest axes of an
oblique affine): no resampling. The default ``"SPL"`` is SimpleITK's array order for a DICOM-LPS image.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from dinomix_cache.errors import UserError


def check_axcodes(code: str) -> tuple[str, str, str]:
    """The three axcodes of ``code`` (e.g. ``"SPL"``), upper case.

    Raises:
        UserError: not one direction letter per axis.
    """
    letters = tuple(str(code).upper())
    axis_of = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    if len(letters) != 3 or sorted(axis_of.get(c, -1) for c in letters) != [0, 1, 2]:
        raise UserError(f"orientation {code!r} must name one direction per axis, e.g. SPL or RAS")
    return letters  # type: ignore[return-value]


def reorient_to_array(volume: np.ndarray, affine: np.ndarray, orientation: str = "SPL") -> np.ndarray:
    """Reorient a file voxel array so that its axes point along ``orientation``.

    Uses nibabel's ``io_orientation`` (nearest axes for oblique affines), so only axis permutations
    and flips happen: no resampling.

    Args:
        volume: array in file voxel order (i, j, k), any dtype; extra trailing axes are kept.
        affine: 4×4 voxel → world (RAS+ mm) affine of ``volume``.
        orientation: axcodes of the output axes; ``"SPL"`` (default) gives (D, H, W) =
            (inferior→superior, anterior→posterior, right→left), i.e. SimpleITK's array order for
            a DICOM-LPS image.

    Returns:
        The reoriented array, a view of ``volume`` where possible (may have negative strides).
    """
    target = axcodes2ornt(check_axcodes(orientation))
    return apply_orientation(volume, ornt_transform(io_orientation(affine), target))


def permuted_view(volume: np.ndarray, affine: np.ndarray, orientation: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """:func:`reorient_to_array` split in two: the axis permutation (a view, usually contiguous for
    axial CT) and the output axes still to flip. Flips commute with linear/area resizing, so the
    caller flips the small resized volume instead of copying the full-resolution one strided."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(check_axcodes(orientation)))
    flips = tuple(int(new_axis) for new_axis, sign in transform if sign < 0)
    transform[:, 1] = 1
    return apply_orientation(volume, transform), flips


def reorient_to_file(array: np.ndarray, affine: np.ndarray, orientation: str = "SPL") -> np.ndarray:
    """Inverse of :func:`reorient_to_array`: canonical array → the file's voxel order.

    Args:
        array: array whose axes point along ``orientation`` (e.g. a prediction at source resolution).
        affine: the source file's 4×4 affine.
        orientation: axcodes of ``array``'s axes.

    Returns:
        A view of ``array`` in the file's voxel order, ready for ``nib.Nifti1Image(out, affine)``.
    """
    start = axcodes2ornt(check_axcodes(orientation))
    return apply_orientation(array, ornt_transform(start, io_orientation(affine)))
