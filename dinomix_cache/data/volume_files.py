"""Reading CT and label volume files (NIfTI, npy) and checking what they hold.

A NIfTI is read wholly into memory once, for its sha256 and its voxels (which detects truncation); its
header is checked before anything is inflated (real-valued voxels, no more data than a deflate stream
of that size can hold), and its affine must not be degenerate. Label maps must hold integer class ids,
and an image and its label must share one voxel grid. Every failure the user can fix is a
:class:`~dinomix_cache.errors.UserError` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from dinomix_cache.errors import UserError

_READ_ERRORS = (EOFError, zlib.error, isal_zlib.error, OSError, ImageFileError, ValueError, HeaderDataError)
# Deflate inflates at most about 1032:1; a header promising more data than that is not the file's.
_MAX_DEFLATE_RATIO = 1100
AFFINE_TOLERANCE_MM = 1e-3


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


def read_nifti(
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
        raise read_error(path, exc, "re-download or re-export it") from exc
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or norms.min() < 1e-6 or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError(f"{path} has a degenerate affine (spacing {np.round(norms, 6).tolist()} mm): "
                        "fix the header's pixdim / sform / qform")
    return data.reshape(shape), affine, shape, slope, inter, sha256


def check_label_values(label: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Check a label map holds integers in 0..num_classes-1; return it as uint8.

    Raises:
        UserError: non-integer values (NaN included), a non-numeric dtype, or values out of range.
    """
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


def same_grid(img_path: Path, lbl_path: Path, img_shape: tuple, lbl_shape: tuple,
              img_affine: np.ndarray | None, lbl_affine: np.ndarray | None) -> None:
    """Check an image and its label share one voxel grid (shape, and affine within
    :data:`AFFINE_TOLERANCE_MM`; affines None for npy).

    Raises:
        UserError: different shapes or affines.
    """
    if tuple(img_shape) != tuple(lbl_shape):
        raise UserError(f"{img_path} has shape {tuple(img_shape)} but {lbl_path} has {tuple(lbl_shape)}: "
                        "image and label must share one voxel grid; re-export the label on the image grid")
    if img_affine is not None and lbl_affine is not None:
        diff = float(np.abs(img_affine - lbl_affine).max())
        if diff > AFFINE_TOLERANCE_MM:
            raise UserError(f"{img_path} and {lbl_path} have different affines (max difference "
                            f"{diff:.4g} mm > {AFFINE_TOLERANCE_MM} mm): "
                            "re-export the label with the image's geometry")


def read_error(path: Path, exc: BaseException, fix: str) -> UserError:
    """One-line error for a file that is missing or cannot be decoded."""
    if isinstance(exc, FileNotFoundError):
        return UserError(f"{path} does not exist; check --data or re-run discovery")
    reason = " ".join(str(exc).split())  # some readers put newlines in their messages
    return UserError(f"cannot read {path} ({type(exc).__name__}: {reason}): the file is corrupt or truncated; {fix}")


def load_npy(path: Path) -> np.ndarray:
    """A (D, H, W) ``.npy`` volume (never unpickled).

    Raises:
        UserError: unreadable, or not 3D.
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise read_error(path, exc, "regenerate it") from exc
    if not isinstance(arr, np.ndarray) or arr.ndim != 3:
        raise UserError(f"{path} has shape {getattr(arr, 'shape', '?')}: a 3D (D, H, W) volume is needed")
    return arr
