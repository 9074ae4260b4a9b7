"""Read one case, validate it, and bring it to the canonical preprocessed grid.

The steps follow the DHC/SKCDF "80×160×160" Synapse protocol (see docs/protocol.md, preprocessing):

1. read the NIfTI with nibabel (:mod:`dinomix_cache.data.volume_files`), keeping the source
   geometry (affine, spacing, axcodes) in :attr:`PreprocessedCase.source`;
2. reorient the voxel array (:mod:`dinomix_cache.data.orientation`) so that array axes (D, H, W) run
   towards Superior, Posterior and patient Left (``"SPL"``), which is what SimpleITK's
   ``GetArrayFromImage`` returns for a DICOM-LPS image:
   ``image[d]`` is an axial slice shown in radiological convention by a plain ``imshow`` (anterior
   up, patient right on the left of the picture) and ``d`` grows towards the head;
3. clip the intensities to the HU window and min–max the clipped volume to [0, 1];
4. resize the whole volume to ``target_shape`` with :class:`monai.transforms.Resize` (trilinear,
   ``align_corners=False`` for the image; ``"nearest"`` for the label, which is torch's
   ``F.interpolate(mode="nearest")`` as the peers used, not ``"nearest-exact"``).

Preprocessed ``.npy`` volumes (DHC's ``npy/XXXX_image.npy``) are already (D, H, W) in SimpleITK
order and carry no geometry: only step 3 applies, and step 4 when their shape differs.

Float work is float32 and the heavy parts run in numpy / torch kernels that release the GIL, so
several cases can load in background threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Resize
from nibabel.orientations import aff2axcodes

from dinomix_cache.data.datasets import CaseSource
from dinomix_cache.data.orientation import check_axcodes, permuted_view, reorient_to_array
from dinomix_cache.data.volume_files import check_label_values, file_sha256, load_npy, read_nifti, same_grid
from dinomix_cache.errors import UserError
from dinomix_cache.store.schema import IMAGE_MODES, LABEL_MODES, MAX_CLASSES, NORMALISATIONS

_IMAGE_MODES = IMAGE_MODES
_LABEL_MODES = LABEL_MODES
_NORMALISATIONS = NORMALISATIONS
# Resize modes symmetric under flips (align_corners False): flipping after resizing is exact.
# Legacy "nearest" (floor) is not symmetric, so labels and nearest images are flipped first.
_FLIP_COMMUTING_MODES = ("trilinear", "area")


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes the preprocessed arrays (recorded in the feature store).

    Attributes:
        target_shape: (D, H, W) voxels of the whole volume after resizing.
        hu_window: (low, high) HU clip window.
        normalisation: ``"minmax"`` (min–max of the clipped volume → [0, 1], the peers' choice) or
            ``"window"`` (the window itself mapped to [0, 1]).
        orientation: axcodes of the output array axes (D, H, W); ``"SPL"`` = SimpleITK's array of a
            DICOM-LPS image.
        image_interpolation: MONAI/torch mode for the image (``"trilinear"``, ``"area"``, ...).
        label_interpolation: ``"nearest"`` (torch's legacy nearest, as the peers) or ``"nearest-exact"``.
        image_dtype: dtype of the preprocessed image, ``"float16"`` (default) or ``"float32"``. The
            teacher sees exactly the stored values, so a recompute in stage two matches the cache.
            float16 steps are ≤ 2^-11 on [0, 1], under 0.2 HU in the default 350 HU window, finer
            than the 1 HU of the source; it halves the stored volumes.

    Raises:
        UserError: a setting out of range.
    """

    target_shape: tuple[int, int, int] = (80, 160, 160)
    hu_window: tuple[float, float] = (-75.0, 275.0)
    normalisation: str = "minmax"
    orientation: str = "SPL"
    image_interpolation: str = "trilinear"
    label_interpolation: str = "nearest"
    image_dtype: str = "float16"

    def __post_init__(self) -> None:
        shape = tuple(self.target_shape)
        if len(shape) != 3 or not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
            raise UserError(f"target shape {self.target_shape} must be three positive integers (D, H, W)")
        object.__setattr__(self, "target_shape", tuple(int(s) for s in shape))
        lo, hi = (float(v) for v in self.hu_window)
        if not lo < hi:
            raise UserError(f"HU window {self.hu_window} must be (low, high) with low < high")
        object.__setattr__(self, "hu_window", (lo, hi))
        if self.normalisation not in _NORMALISATIONS:
            raise UserError(f"normalisation {self.normalisation!r}: choose one of "
                            f"{', '.join(_NORMALISATIONS)}")
        object.__setattr__(self, "orientation", "".join(check_axcodes(self.orientation)))
        if self.image_interpolation not in _IMAGE_MODES:
            raise UserError(f"image interpolation {self.image_interpolation!r}: choose one of "
                            f"{', '.join(_IMAGE_MODES)}")
        if self.label_interpolation not in _LABEL_MODES:
            raise UserError(f"label interpolation {self.label_interpolation!r}: choose one of "
                            f"{', '.join(_LABEL_MODES)}")
        if self.image_dtype not in ("float16", "float32"):
            raise UserError(f"image dtype {self.image_dtype!r}: choose float16 or float32")

    @classmethod
    def from_json(cls, data: dict) -> PreprocessSettings:
        """The settings a store recorded (:meth:`to_json`; the fixed choices it adds are ignored)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("target_shape", "hu_window"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_json(self) -> dict:
        """Return the settings as a JSON-able dict (plus the fixed choices they imply)."""
        return {
            "target_shape": list(self.target_shape),
            "hu_window": list(self.hu_window),
            "normalisation": self.normalisation,
            "orientation": self.orientation,
            "image_interpolation": self.image_interpolation,
            "label_interpolation": self.label_interpolation,
            "image_dtype": self.image_dtype,
            "align_corners": False,
            "order": "reorient, clip, normalise, resize",
            "resize": "monai.transforms.Resize (torch interpolate)",
        }


@dataclass
class PreprocessedCase:
    """One preprocessed case.

    Attributes:
        case_id: the case id.
        image: (D, H, W) in [0, 1], of ``settings.image_dtype`` (float16 by default).
        label: (D, H, W) uint8 label map, or ``None`` where the case has no label file.
        source: JSON-able record of the inputs: ``image``, ``label`` (path strings), ``image_sha256``,
            ``label_sha256``, ``shape`` (source voxel shape, file axis order), ``spacing`` (mm, file
            axis order), ``affine`` (4×4 list, the source affine) and ``orientation`` (source
            axcodes, e.g. ``"LPS"``); for npy, geometry fields are ``None`` and orientation reads
            ``"as stored (npy, no geometry)"``.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    source: dict


def _clip_and_range(image: np.ndarray, settings: PreprocessSettings, path: Path) -> tuple[torch.Tensor, float, float]:
    """Clip to the HU window in place; return the clipped tensor (sharing memory) and the (min, max)
    that map it to [0, 1]: the clipped volume's own range for min–max, the window for ``window``."""
    lo, hi = settings.hu_window
    t = torch.from_numpy(image).clamp_(lo, hi)
    if settings.normalisation == "window":
        vmin, vmax = lo, hi
        if torch.isnan(t).any():
            raise UserError(f"{path} contains NaN intensities: not a valid CT volume; re-export it")
    else:
        vmin, vmax = (float(v) for v in torch.aminmax(t))
        if math.isnan(vmin) or math.isnan(vmax):
            raise UserError(f"{path} contains NaN intensities: not a valid CT volume; re-export it")
        if vmax <= vmin:
            raise UserError(f"{path} is constant ({vmin:g}) after clipping to HU {list(settings.hu_window)}: "
                            "not a CT volume in HU, or the wrong file")
    return t, vmin, vmax


def _require_finite(image: np.ndarray, path: Path) -> None:
    """Refuse NaN and ±inf alike (clipping would silently turn inf into the window's edge)."""
    if not bool(torch.isfinite(torch.from_numpy(image)).all()):
        raise UserError(f"{path} contains NaN or infinite intensities: not a valid CT volume; re-export it")


def _resize(volume: torch.Tensor, shape: tuple[int, int, int], mode: str) -> torch.Tensor:
    """Resize a (D, H, W) tensor with MONAI; returns float32 (unchanged if already at ``shape``)."""
    if tuple(volume.shape) == tuple(shape):
        return volume
    linear = mode in ("trilinear", "linear", "bilinear", "bicubic")
    resize = Resize(spatial_size=shape, mode=mode, align_corners=False if linear else None,
                    dtype=torch.float32 if linear or volume.is_floating_point() else volume.dtype)
    out = resize(volume[None])[0]
    return out.as_tensor() if isinstance(out, MetaTensor) else out


def load_case(case: CaseSource, settings: PreprocessSettings, num_classes: int) -> PreprocessedCase:
    """Read, validate and preprocess one case.

    Args:
        case: where the files are (:class:`~dinomix_cache.data.datasets.CaseSource`).
        settings: the preprocessing settings.
        num_classes: classes including background; label values must lie in 0..num_classes-1.

    Returns:
        The :class:`PreprocessedCase`: image (D, H, W) in [0, 1] (``settings.image_dtype``), label (D, H, W) uint8 or
        ``None``, and the ``source`` record (paths, sha256, source geometry).

    Raises:
        UserError: unreadable, corrupt or truncated file; not 3D; image/label shape or affine
            (> 1e-3 mm) mismatch; label values not integer or outside 0..num_classes-1; degenerate
            affine; constant or NaN image.
    """
    if not 1 < num_classes <= MAX_CLASSES:
        raise UserError(f"num_classes {num_classes} must be in 2..{MAX_CLASSES} (labels are stored as uint8, "
                        f"and {MAX_CLASSES} marks missing data)")
    image_path, label_path = Path(case.image), None if case.label is None else Path(case.label)
    source: dict = {"image": str(image_path), "label": None if label_path is None else str(label_path),
                    "image_sha256": None, "label_sha256": None}
    label, flips = None, ()
    if case.fmt == "nifti":
        raw, affine, shape, slope, inter, source["image_sha256"] = read_nifti(image_path, unscaled=True)
        if label_path is not None:
            lbl, lbl_affine, lbl_shape, _, _, source["label_sha256"] = read_nifti(label_path, unscaled=False)
            same_grid(image_path, label_path, shape, lbl_shape, affine, lbl_affine)
            lbl = check_label_values(lbl, num_classes, label_path)
            label = np.ascontiguousarray(reorient_to_array(lbl, affine, settings.orientation))
        if settings.image_interpolation in _FLIP_COMMUTING_MODES:
            view, flips = permuted_view(raw, affine, settings.orientation)
        else:
            view = reorient_to_array(raw, affine, settings.orientation)
        image = np.empty(view.shape, np.float32)  # reorder and cast in one pass
        np.copyto(image, view, casting="unsafe")
        if slope != 1.0 or inter != 0.0:
            torch.from_numpy(image).mul_(slope).add_(inter)
        if raw.dtype.kind == "f" or slope != 1.0 or inter != 0.0:  # integers without scaling are finite
            _require_finite(image, image_path)
        source |= {"shape": list(shape), "spacing": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
                   "affine": affine.tolist(), "orientation": "".join(aff2axcodes(affine))}
    elif case.fmt == "npy":
        source["image_sha256"] = file_sha256(image_path)
        source["label_sha256"] = None if label_path is None else file_sha256(label_path)
        raw = load_npy(image_path)
        if raw.dtype.kind not in "biuf":
            raise UserError(f"{image_path} holds {raw.dtype} values: a CT volume needs real-valued voxels")
        image = raw.astype(np.float32, copy=True)  # a copy: normalisation works in place
        if raw.dtype.kind == "f":
            _require_finite(image, image_path)
        if label_path is not None:
            lbl = load_npy(label_path)
            same_grid(image_path, label_path, raw.shape, lbl.shape, None, None)
            label = check_label_values(lbl, num_classes, label_path)
        source |= {"shape": list(raw.shape), "spacing": None, "affine": None,
                   "orientation": "as stored (npy, no geometry)"}
    else:
        raise UserError(f"case {case.case_id}: unknown file format {case.fmt!r} (expected nifti or npy)")

    clipped, vmin, vmax = _clip_and_range(image, settings, image_path)
    # Resizing is a convex combination of voxels (weights sum to 1), so it commutes with the linear
    # map to [0, 1]: mapping the small resized volume equals resizing the mapped one, at a tenth of
    # the memory traffic (reading must hide behind the teacher).
    t = _resize(clipped, settings.target_shape, settings.image_interpolation)
    if flips:
        t = torch.flip(t, flips)
    t = t.sub_(vmin).div_(vmax - vmin)
    out_image = t.numpy().astype(settings.image_dtype, copy=False)
    out_label = None
    if label is not None:
        lt = _resize(torch.from_numpy(label), settings.target_shape, settings.label_interpolation)
        out_label = lt.numpy().astype(np.uint8, copy=False)
    return PreprocessedCase(case.case_id, out_image, out_label, source)
