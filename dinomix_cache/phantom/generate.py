"""A deterministic synthetic abdominal CT data set in the Synapse layout ("the phantom").

It stands in for the 30 labelled Synapse cases where no real data exist (tests, demos, offline
runs) and is read by exactly the same code as real data::

    ROOT/imagesTr/img0001.nii.gz     int16 HU, portal-venous-like contrast
    ROOT/labelsTr/label0001.nii.gz   uint8 labels 0..13 in SYNAPSE_CLASSES order
    ROOT/phantom.json                settings + version, written last

Each case is an adult abdomen (about 350 x 250 mm body, 220-250 mm from the liver dome to L3/L4)
with the 13 Synapse organs plus unlabelled bowel, muscle, bone, lung and vessels; sizes, positions
and a smooth warp vary per case. Geometry follows the scanner conventions of real data: square
in-plane field of view of 360-460 mm, slices 2.5-5 mm (both scaled up for small ``matrix``), a
non-zero origin, and RAS-ordered (odd ids) or LPS-ordered (even ids) voxel axes, so readers must
use the affine. World coordinates are NIfTI RAS+: +x is the patient's right.

Everything is a pure function of ``(settings, case id)``: the same case is bit-identical whether
generated alone or in a full run, and the ``.nii.gz`` bytes do not depend on time or machine (for
one zlib build; gzip header fields are fixed by hand).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from scipy.ndimage import gaussian_filter

from dinomix_cache.atomic import write_atomic
from dinomix_cache.data.classes import SYNAPSE_CASE_IDS, SYNAPSE_CLASSES
from dinomix_cache.errors import UserError
from dinomix_cache.phantom.anatomy import sample_body
from dinomix_cache.phantom.render import render_tissues
from dinomix_cache.phantom.tissues import N_TISSUES, TISSUE_TABLE, TISSUE_TO_LABEL
from dinomix_cache.settings_codec import settings_to_json

PHANTOM_VERSION: int = 1
_CASE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TEXTURE_STEP_MM = 12.0  # grid of the smooth texture; correlation length ~ 2 steps


@dataclass(frozen=True)
class PhantomSettings:
    """How the phantom is generated; recorded in ``phantom.json``.

    Attributes:
        case_ids: case ids, written as ``img<id>.nii.gz`` / ``label<id>.nii.gz``.
        seed: base seed (>= 0); each case draws from ``(seed, case id)`` only.
        matrix: in-plane voxels per side, 32..1024. 512 is Synapse-like (~1.5-2 s per case);
            small values (32-96) keep the physical field of view and scale the spacing up (tests:
            matrix 64 gives about 64 x 64 x 7-17 voxels in ~20 ms).
        spacing_mm: in-plane spacing range (mm) at matrix 512; multiplied by ``512 / matrix``.
        thickness_mm: slice thickness range (mm) at matrix 512; multiplied by
            ``min(512 / matrix, max_thickness_scale)``.
        max_thickness_scale: cap on the thickness scale factor for small matrices.
        scan_length_mm: superior-inferior coverage range (mm).
        noise_hu: range of the per-case white-noise standard deviation (HU).
        deformation_mm: largest displacement (mm, per axis) of the smooth random organ warp.

    Raises:
        UserError: a setting is out of range.
    """

    case_ids: tuple[str, ...] = SYNAPSE_CASE_IDS
    seed: int = 0
    matrix: int = 512
    spacing_mm: tuple[float, float] = (0.7, 0.9)
    thickness_mm: tuple[float, float] = (2.5, 5.0)
    max_thickness_scale: float = 6.0
    scan_length_mm: tuple[float, float] = (220.0, 250.0)
    noise_hu: tuple[float, float] = (10.0, 20.0)
    deformation_mm: float = 6.0

    def __post_init__(self) -> None:
        for name in ("case_ids", "spacing_mm", "thickness_mm", "scan_length_mm", "noise_hu"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        ids = self.case_ids
        if not ids or len(set(ids)) != len(ids) or not all(isinstance(c, str) and _CASE_ID.match(c) for c in ids):
            raise UserError(f"phantom case_ids must be unique, non-empty strings of [A-Za-z0-9_-]; got {ids!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"phantom seed must be an integer >= 0; got {self.seed!r}")
        if not isinstance(self.matrix, int) or not 32 <= self.matrix <= 1024:
            raise UserError(f"phantom matrix must be an integer in 32..1024; got {self.matrix!r}")
        for name in ("spacing_mm", "thickness_mm", "scan_length_mm", "noise_hu"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] or (name != "noise_hu" and lo_hi[0] <= 0):
                raise UserError(f"phantom {name} must be a range (low, high) with 0 < low <= high; got {lo_hi!r}")
        if self.scan_length_mm[0] < 200.0:
            raise UserError("phantom scan_length_mm must start at >= 200 mm to cover all 13 organs")
        if not self.max_thickness_scale >= 1.0 or not 0.0 <= self.deformation_mm <= 20.0:
            raise UserError("phantom max_thickness_scale must be >= 1 and deformation_mm in 0..20")

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values (tuples become lists)."""
        return settings_to_json(self)


@dataclass(frozen=True)
class _Geometry:
    shape: tuple[int, int, int]
    spacing: float  # in-plane (mm)
    thickness: float  # slice (mm)
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]  # voxel centres, patient frame (mm), RAS order
    affine: np.ndarray  # 4x4 of the *stored* array (flipped in x and y if lps)
    lps: bool


def _case_rng(case_id: str, settings: PhantomSettings) -> np.random.Generator:
    digest = hashlib.sha256(case_id.encode()).digest()
    return np.random.default_rng([settings.seed, int.from_bytes(digest[:8], "little"), PHANTOM_VERSION])


def _is_lps(case_id: str) -> bool:
    """Even numeric ids are stored LPS-ordered, odd ones RAS-ordered (other ids: by hash parity)."""
    if case_id.isdigit():
        return int(case_id) % 2 == 0
    return hashlib.sha256(case_id.encode()).digest()[0] % 2 == 0


def _geometry(rng: np.random.Generator, case_id: str, settings: PhantomSettings, half_width: float,
              depth: tuple[float, float]) -> _Geometry:
    f = 512.0 / settings.matrix
    lo, hi = settings.spacing_mm
    s512 = max(float(rng.uniform(lo, hi)), min((2.0 * half_width + 20.0) / 512.0, hi))
    spacing = s512 * f
    thickness = float(rng.uniform(*settings.thickness_mm)) * min(f, settings.max_thickness_scale)
    nz = max(round(float(rng.uniform(*settings.scan_length_mm)) / thickness), 3)
    fov = spacing * settings.matrix
    front, back = depth
    cx = float(rng.uniform(-10.0, 10.0))
    cy = (front - back - 12.0) / 2.0 + float(rng.uniform(-10.0, 10.0))
    z_top = float(rng.uniform(115.0, 135.0))
    n = settings.matrix
    xs = cx - fov / 2.0 + (np.arange(n) + 0.5) * spacing
    ys = cy - fov / 2.0 + (np.arange(n) + 0.5) * spacing
    zs = z_top - (nz - np.arange(nz) - 0.5) * thickness
    offset = np.array([rng.uniform(-25.0, 25.0), rng.uniform(-180.0, -120.0), rng.uniform(-700.0, -300.0)])
    lps = _is_lps(case_id)
    affine = np.eye(4)
    if lps:
        affine[:3, :3] = np.diag([-spacing, -spacing, thickness])
        affine[:3, 3] = offset + np.array([xs[-1], ys[-1], zs[0]])
    else:
        affine[:3, :3] = np.diag([spacing, spacing, thickness])
        affine[:3, 3] = offset + np.array([xs[0], ys[0], zs[0]])
    return _Geometry((n, n, nz), spacing, thickness, (xs, ys, zs), affine, lps)


def _texture(rng: np.random.Generator, geo: _Geometry, out: np.ndarray) -> None:
    """Fill ``out`` with a smooth unit-variance field (correlation ~ 25 mm), made coarse and upsampled."""
    steps = (geo.spacing, geo.spacing, geo.thickness)
    coarse_shape = tuple(math.ceil(n * s / _TEXTURE_STEP_MM) + 4 for n, s in zip(geo.shape, steps, strict=True))
    field = gaussian_filter(rng.standard_normal(coarse_shape), sigma=1.0, mode="wrap", truncate=3.0)
    w = [math.exp(-0.5 * k * k) for k in range(-3, 4)]
    gain = math.fsum(v * v for v in w) / math.fsum(w) ** 2  # variance kept by one 1-D pass
    field *= 1.0 / math.sqrt(gain**3)
    for axis in (2, 1, 0):  # separable linear interpolation onto voxel centres
        pos = 2.0 + (np.arange(geo.shape[axis]) + 0.5) * (steps[axis] / _TEXTURE_STEP_MM)
        i0 = np.floor(pos).astype(np.intp)
        frac = (pos - i0).astype(np.float64 if axis else np.float32)
        shape = [1, 1, 1]
        shape[axis] = -1
        frac = frac.reshape(shape)
        if axis == 0:
            field = field.astype(np.float32)
            np.multiply(field[i0], 1.0 - frac, out=out)
            out += field[i0 + 1] * frac
        else:
            field = np.take(field, i0, axis=axis) * (1.0 - frac) + np.take(field, i0 + 1, axis=axis) * frac


def _blur_inplane(a: np.ndarray, tmp: np.ndarray) -> None:
    """[1, 2, 1] / 4 smoothing along axes 0 and 1 (edges replicated); result in ``a``."""
    for axis in (0, 1):
        src, dst = (a, tmp) if axis == 0 else (tmp, a)
        src *= 0.25
        np.add(src, src, out=dst)
        lo = (slice(None),) * axis
        dst[(*lo, slice(1, None))] += src[(*lo, slice(None, -1))]
        dst[(*lo, slice(None, -1))] += src[(*lo, slice(1, None))]
        dst[(*lo, 0)] += src[(*lo, 0)]
        dst[(*lo, -1)] += src[(*lo, -1)]


def phantom_case(case_id: str, settings: PhantomSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case, deterministic in ``(settings.seed, case_id)`` and the other settings.

    Args:
        case_id: case id, e.g. ``"0001"`` (need not be in ``settings.case_ids``).
        settings: generator settings.

    Returns:
        ``(image, label, affine)``: image int16 HU and label uint8 (0..13, SYNAPSE_CLASSES order),
        both shaped ``(matrix, matrix, slices)`` in stored voxel order (RAS- or LPS-ordered, see
        the module docstring), and the float64 4x4 voxel-to-world (RAS+ mm) affine.

    Raises:
        UserError: the case id is not a valid file-name id.
    """
    if not _CASE_ID.match(case_id):
        raise UserError(f"phantom case id {case_id!r} must match [A-Za-z0-9_-]")
    rng = _case_rng(case_id, settings)
    body = sample_body(rng)
    geo = _geometry(rng, case_id, settings, body.half_width, body.half_depth)
    tissue = render_tissues(rng, body, *geo.axes, settings.deformation_mm)
    hu_lut = np.zeros(N_TISSUES, dtype=np.float32)
    amp_lut = np.zeros(N_TISSUES, dtype=np.float32)
    for t, (lo, hi, amp, _) in TISSUE_TABLE.items():
        hu_lut[int(t)] = rng.uniform(lo, hi)
        amp_lut[int(t)] = amp
    hu = hu_lut[tissue]
    buf = np.empty(geo.shape, dtype=np.float32)
    _texture(rng, geo, buf)
    buf *= amp_lut[tissue]
    hu += buf
    if geo.spacing <= 1.5:  # scanner blur; coarse test volumes stay sharp
        _blur_inplane(hu, buf)
    rng.standard_normal(out=buf, dtype=np.float32)
    buf *= float(rng.uniform(*settings.noise_hu))
    hu += buf
    np.rint(hu, out=hu)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    image, label = hu.astype(np.int16), TISSUE_TO_LABEL[tissue]
    if geo.lps:
        image, label = np.ascontiguousarray(image[::-1, ::-1]), np.ascontiguousarray(label[::-1, ::-1])
    return image, label, geo.affine


def voxel_fractions(label: np.ndarray, num_classes: int = len(SYNAPSE_CLASSES)) -> np.ndarray:
    """Fraction of voxels of each class.

    Args:
        label: integer label array of any shape, values in ``0..num_classes-1``.
        num_classes: number of classes, background included (14 for Synapse).

    Returns:
        float64 array ``(num_classes,)`` summing to 1.

    Raises:
        ValueError: empty or non-integer array, or a value outside ``0..num_classes-1``.
    """
    lab = np.asarray(label)
    if lab.size == 0 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"label must be a non-empty integer array; got {lab.dtype} of size {lab.size}")
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"label values must lie in 0..{num_classes - 1}; found {lo}..{hi}")
    counts = np.bincount(lab.ravel(), minlength=num_classes)
    return counts / lab.size


def _gzip(raw: bytes) -> bytes:
    """gzip member (RFC 1952) with fixed header fields: mtime 0, no name, OS 'unknown', level 1."""
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x04\xff"
    trailer = struct.pack("<II", zlib.crc32(raw) & 0xFFFFFFFF, len(raw) & 0xFFFFFFFF)
    return header + zlib.compress(raw, 1, wbits=-15) + trailer


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    """Write ``data`` as a gzipped NIfTI-1 with qform = sform = affine (scanner); returns its sha256."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = f"dinomix phantom v{PHANTOM_VERSION}".encode()
    blob = _gzip(img.to_bytes())
    write_atomic(path, blob)
    return hashlib.sha256(blob).hexdigest()


def _case_paths(root: Path, case_id: str) -> tuple[Path, Path]:
    return root / "imagesTr" / f"img{case_id}.nii.gz", root / "labelsTr" / f"label{case_id}.nii.gz"


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def generate_phantom(root: Path, settings: PhantomSettings = PhantomSettings(), progress: bool = True) -> Path:
    """Write the phantom data set under ``root`` (created if needed).

    Nothing is done if ``root/phantom.json`` already records the same settings and
    :data:`PHANTOM_VERSION` and all case files exist. Otherwise that record is removed first,
    files of cases the old record listed but the new settings do not are deleted, every case is
    (re)written atomically, and the record is written last, so an interrupted run is redone.

    Args:
        root: data-set directory; receives ``imagesTr/``, ``labelsTr/`` and ``phantom.json``.
        settings: generator settings.
        progress: show a rich progress bar (cases done / total) on stderr.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        UserError: ``root`` cannot be created or written.
    """
    root = Path(root)
    meta = root / "phantom.json"
    wanted = {"version": PHANTOM_VERSION, "settings": settings.to_json()}
    old = _read_record(meta)
    if old is not None and all(old.get(k) == v for k, v in wanted.items()) and all(
            p.is_file() for c in settings.case_ids for p in _case_paths(root, c)):
        return root
    try:
        meta.unlink(missing_ok=True)
        if old is not None and isinstance(old.get("cases"), dict):
            for stale in set(old["cases"]) - set(settings.case_ids):
                if isinstance(stale, str) and _CASE_ID.match(stale):
                    for p in _case_paths(root, stale):
                        p.unlink(missing_ok=True)
        for sub in ("imagesTr", "labelsTr"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        cases = _write_cases(root, settings, progress)
        record = {**wanted, "generator": "dinomix_cache.phantom", "classes": list(SYNAPSE_CLASSES),
                  "zlib": zlib.ZLIB_RUNTIME_VERSION, "cases": cases}
        write_atomic(meta, json.dumps(record, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the phantom under {root}: {exc}") from exc
    return root


def _write_cases(root: Path, settings: PhantomSettings, progress: bool) -> dict[str, dict[str, str]]:
    """Render cases on this thread while a second thread compresses and writes the previous one."""
    cases: dict[str, dict[str, str]] = {}
    bar = Progress(TextColumn("[bold]phantom[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), disable=not progress)
    with bar, ThreadPoolExecutor(max_workers=2) as pool:
        task = bar.add_task("phantom", total=len(settings.case_ids))
        pending: list[tuple[str, Future[str], Future[str]]] = []

        def finish(case_id: str, img: Future[str], lab: Future[str]) -> None:
            ip, lp = _case_paths(root, case_id)
            cases[case_id] = {"image": ip.relative_to(root).as_posix(), "label": lp.relative_to(root).as_posix(),
                              "image_sha256": img.result(), "label_sha256": lab.result()}
            bar.advance(task)

        for case_id in settings.case_ids:
            image, label, affine = phantom_case(case_id, settings)
            ip, lp = _case_paths(root, case_id)
            while pending:
                finish(*pending.pop(0))
            pending.append((case_id, pool.submit(_write_nifti, ip, image, affine),
                            pool.submit(_write_nifti, lp, label, affine)))
            del image, label
        while pending:
            finish(*pending.pop(0))
    return cases
