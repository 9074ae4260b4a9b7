"""Read one case, validate it, and bring it to the canonical preprocessed grid.

The steps follow the DHC/SKCDF "80×160×160" Synapse protocol (``METHOD.md``, ``PROTOCOL.md`` 1.2):

1. read the NIfTI with nibabel, keeping the source geometry (affine, spacing, axcodes) in
   :attr:`PreprocessedCase.source`;
2. reorient the voxel array so that array axes (D, H, W) run towards Superior, Posterior and patient
   Left (``"SPL"``), which is what SimpleITK's ``GetArrayFromImage`` returns for a DICOM-LPS image:
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

import hashlib
import io
import math
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from isal import igzip, isal_zlib
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from nibabel.spatialimages import HeaderDataError

from dinomix_cache.data.datasets import CaseSource
from dinomix_cache.errors import UserError
from dinomix_cache.store.schema import IMAGE_MODES, LABEL_MODES, MAX_CLASSES, NORMALISATIONS

_READ_ERRORS = (EOFError, zlib.error, isal_zlib.error, OSError, ImageFileError, ValueError, HeaderDataError)
_IMAGE_MODES = IMAGE_MODES
_LABEL_MODES = LABEL_MODES
_NORMALISATIONS = NORMALISATIONS
# Deflate inflates at most about 1032:1; a header promising more data than that is not the file's.
_MAX_DEFLATE_RATIO = 1100
# Resize modes symmetric under flips (align_corners False): flipping after resizing is exact.
# Legacy "nearest" (floor) is not symmetric, so labels and nearest images are flipped first.
_FLIP_COMMUTING_MODES = ("trilinear", "area")
AFFINE_TOLERANCE_MM = 1e-3


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
        object.__setattr__(self, "orientation", "".join(_check_axcodes(self.orientation)))
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


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file's bytes.

    Args:
        path: the file.

    Raises:
        UserError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); "
                        "check the path and permissions") from exc
    return digest.hexdigest()


def _check_axcodes(code: str) -> tuple[str, str, str]:
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
    target = axcodes2ornt(_check_axcodes(orientation))
    return apply_orientation(volume, ornt_transform(io_orientation(affine), target))


def _permuted_view(volume: np.ndarray, affine: np.ndarray, orientation: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """:func:`reorient_to_array` split in two: the axis permutation (a view, usually contiguous for
    axial CT) and the output axes still to flip. Flips commute with linear/area resizing, so the
    caller flips the small resized volume instead of copying the full-resolution one strided."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(_check_axcodes(orientation)))
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
    start = axcodes2ornt(_check_axcodes(orientation))
    return apply_orientation(array, ornt_transform(start, io_orientation(affine)))


def _axes3(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    if len(shape) < 3:
        raise UserError(f"{path} is {len(shape)}D {tuple(shape)}: a 3D CT volume is needed")
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise UserError(f"{path} has shape {tuple(shape)}: a single 3D volume is needed, "
                        "not a time series or multi-channel image; extract one volume first")
    return tuple(int(s) for s in shape[:3])  # type: ignore[return-value]


def _load_nifti(path: Path) -> tuple[nib.Nifti1Image, bytes, str]:
    """Load a NIfTI wholly into memory (which detects truncation); return (image, raw bytes, sha256).

    The file is read once, for the hash and the image. Its header is checked first, before
    anything is inflated or allocated (:func:`_check_header`). ``.nii.gz`` is inflated in one call
    with ISA-L (about 2.5× faster than zlib here): decompression is the largest cost of reading a
    CT, and reading must hide behind the teacher.

    Raises:
        UserError: voxels that are not real numbers, or a header declaring more data than the file holds.
        EOFError, zlib.error, ...: a file that is not a readable NIfTI (see ``_READ_ERRORS``).
    """
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    gz = path.name.endswith(".gz")
    prefix = zlib.decompressobj(31).decompress(data[:1 << 16], 352) if gz else data[:352]
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(prefix))
    declared = _check_header(header, path, len(data), gz)
    if gz:
        data = igzip.decompress(data)
    if len(data) < declared:
        raise EOFError(f"the header declares {declared} bytes, the file holds {len(data)}")
    return nib.Nifti1Image.from_bytes(data), data, sha256


def _check_header(header: nib.Nifti1Header, path: Path, file_bytes: int, gz: bool) -> int:
    """Check a NIfTI header before the data are read; return the bytes it declares (offset + voxels).

    Raises:
        UserError: the voxels are not real numbers (RGB, complex), or the file cannot hold the
            data the header declares (a damaged header, or a truncated file).
    """
    dtype = np.dtype(header.get_data_dtype())
    if dtype.kind not in "biuf":
        raise UserError(f"{path} holds {dtype.name if dtype.kind != 'V' else 'RGB/structured'} voxels "
                        f"(NIfTI datatype {int(header['datatype'])}): a CT volume and a label map need real-valued "
                        "voxels; convert it to int16 or float32")
    shape = tuple(int(s) for s in header.get_data_shape())
    declared = int(header.get_data_offset()) + math.prod(shape) * dtype.itemsize
    room = file_bytes * _MAX_DEFLATE_RATIO + (1 << 20) if gz else file_bytes
    if declared > room:
        raise UserError(f"{path} declares {'x'.join(map(str, shape))} voxels of {dtype.name} ({declared:,} bytes) "
                        f"but the file is {file_bytes:,} bytes{' compressed' if gz else ''}: the header is damaged "
                        "or the file truncated; re-export it")
    return declared


def _unscaled_view(img: nib.Nifti1Image, raw: bytes) -> np.ndarray:
    """The stored voxel array as a zero-copy view of the decompressed bytes (Fortran order).

    Raises:
        EOFError: the file holds fewer bytes than its header promises (truncated).
    """
    proxy = img.dataobj  # its offset is the one nibabel reads at (the header's may read 0 here)
    dtype = np.dtype(proxy.dtype)
    count = math.prod(img.shape)
    offset = int(proxy.offset)
    if len(raw) < offset + count * dtype.itemsize:
        raise EOFError(f"expected {count * dtype.itemsize} data bytes, got {max(0, len(raw) - offset)}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(img.shape, order="F")


def _read_nifti(
    path: Path, unscaled: bool
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int], float, float, str]:
    """Read a NIfTI fully (which detects truncation).

    Returns:
        (data, affine, 3D shape, slope, inter, sha256): ``data`` is the stored array with the NIfTI
        scaling applied, or, with ``unscaled``, the raw stored array with (slope, inter) still to
        apply; ``sha256`` is the file's.
    """
    try:
        img, raw, sha256 = _load_nifti(path)
        shape = _axes3(img.shape, path)
        affine = np.asarray(img.affine, dtype=np.float64)
        proxy = img.dataobj
        slope, inter = 1.0, 0.0
        if unscaled and hasattr(proxy, "slope"):
            data = _unscaled_view(img, raw)
            slope, inter = float(proxy.slope), float(proxy.inter)
            if not (math.isfinite(slope) and math.isfinite(inter)):
                raise UserError(f"{path} has a non-finite intensity scaling (scl_slope {slope}, scl_inter {inter}): "
                                "fix the header")
        else:
            data = np.asanyarray(proxy)
    except UserError:
        raise
    except _READ_ERRORS as exc:
        raise _read_error(path, exc, "re-download or re-export it") from exc
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or norms.min() < 1e-6 or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError(f"{path} has a degenerate affine (spacing {np.round(norms, 6).tolist()} mm): "
                        "fix the header's pixdim / sform / qform")
    return data.reshape(shape), affine, shape, slope, inter, sha256


def _check_label_values(label: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Check a label map holds integers in 0..num_classes-1; return it as uint8."""
    hi_ok = num_classes - 1
    if label.dtype.kind == "f":
        bad = label != np.rint(label)  # also catches NaN
        if bad.any():
            values = np.unique(label[bad])
            raise UserError(f"{path} has non-integer label values {_fmt_values(values)}: "
                            "a label map must hold integer class ids; wrong file or broken export")
    elif label.dtype.kind not in "iub":
        raise UserError(f"{path} has dtype {label.dtype}: a label map must hold integer class ids")
    lo, hi = label.min(), label.max()
    if lo < 0 or hi > hi_ok:
        values = np.unique(label[(label < 0) | (label > hi_ok)])
        raise UserError(f"{path} has values {_fmt_values(values)} outside 0..{hi_ok}: "
                        "wrong dataset or class list")
    return label.astype(np.uint8, copy=False)


def _fmt_values(values: np.ndarray, limit: int = 10) -> str:
    shown = [int(v) if np.isfinite(v) and float(v).is_integer() else float(v) for v in values[:limit]]
    return str(shown) + (f" (+{len(values) - limit} more)" if len(values) > limit else "")


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
    from monai.data import MetaTensor
    from monai.transforms import Resize

    linear = mode in ("trilinear", "linear", "bilinear", "bicubic")
    resize = Resize(spatial_size=shape, mode=mode, align_corners=False if linear else None,
                    dtype=torch.float32 if linear or volume.is_floating_point() else volume.dtype)
    out = resize(volume[None])[0]
    return out.as_tensor() if isinstance(out, MetaTensor) else out


def _same_grid(img_path: Path, lbl_path: Path, img_shape: tuple, lbl_shape: tuple,
               img_affine: np.ndarray | None, lbl_affine: np.ndarray | None) -> None:
    if tuple(img_shape) != tuple(lbl_shape):
        raise UserError(f"{img_path} has shape {tuple(img_shape)} but {lbl_path} has {tuple(lbl_shape)}: "
                        "image and label must share one voxel grid; re-export the label on the image grid")
    if img_affine is not None and lbl_affine is not None:
        diff = float(np.abs(img_affine - lbl_affine).max())
        if diff > AFFINE_TOLERANCE_MM:
            raise UserError(f"{img_path} and {lbl_path} have different affines (max difference "
                            f"{diff:.4g} mm > {AFFINE_TOLERANCE_MM} mm): "
                            "re-export the label with the image's geometry")


def _read_error(path: Path, exc: BaseException, fix: str) -> UserError:
    """One-line error for a file that is missing or cannot be decoded."""
    if isinstance(exc, FileNotFoundError):
        return UserError(f"{path} does not exist; check --data or re-run discovery")
    reason = " ".join(str(exc).split())  # some readers put newlines in their messages
    return UserError(f"cannot read {path} ({type(exc).__name__}: {reason}): the file is corrupt or truncated; {fix}")


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise _read_error(path, exc, "regenerate it") from exc
    if not isinstance(arr, np.ndarray) or arr.ndim != 3:
        raise UserError(f"{path} has shape {getattr(arr, 'shape', '?')}: a 3D (D, H, W) volume is needed")
    return arr


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
        raw, affine, shape, slope, inter, source["image_sha256"] = _read_nifti(image_path, unscaled=True)
        if label_path is not None:
            lbl, lbl_affine, lbl_shape, _, _, source["label_sha256"] = _read_nifti(label_path, unscaled=False)
            _same_grid(image_path, label_path, shape, lbl_shape, affine, lbl_affine)
            lbl = _check_label_values(lbl, num_classes, label_path)
            label = np.ascontiguousarray(reorient_to_array(lbl, affine, settings.orientation))
        if settings.image_interpolation in _FLIP_COMMUTING_MODES:
            view, flips = _permuted_view(raw, affine, settings.orientation)
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
        raw = _load_npy(image_path)
        if raw.dtype.kind not in "biuf":
            raise UserError(f"{image_path} holds {raw.dtype} values: a CT volume needs real-valued voxels")
        image = raw.astype(np.float32, copy=True)  # a copy: normalisation works in place
        if raw.dtype.kind == "f":
            _require_finite(image, image_path)
        if label_path is not None:
            lbl = _load_npy(label_path)
            _same_grid(image_path, label_path, raw.shape, lbl.shape, None, None)
            label = _check_label_values(lbl, num_classes, label_path)
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
