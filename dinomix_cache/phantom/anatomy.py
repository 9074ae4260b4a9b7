"""Anatomy of the synthetic abdominal CT phantom: tissues, shape primitives and the tissue renderer.

Everything here works in the *patient frame*: millimetres, RAS+ (x towards the patient's right,
y anterior, z superior), x = y = 0 on the body axis, z = 0 at the centre of the L1 vertebra. The
scanner affine (orientation, origin) is added by :mod:`dinomix_cache.phantom.generate`; this module only
fills a uint8 tissue map whose voxel ``[i, j, k]`` sits at ``(xs[i], ys[j], zs[k])``.

Organs are unions of ellipsoids and tapered capsules described by signed distances (mm, negative
inside), evaluated only inside each primitive's bounding box, at coordinates bent by one smooth
random warp per case. Determinism: only IEEE-exact float32 arithmetic (``+ - * /``, ``sqrt``,
comparisons) touches volume-sized arrays; the few transcendental calls act on scalars or short
1-D axis arrays in float64, so results do not depend on the CPU's SIMD paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

F32 = np.float32
_FAR = 1.0e4  # signed distance of "nowhere near" (mm)
MIN_VOXELS = 4  # every labelled organ keeps at least this many voxels, whatever the resolution


class Tissue(IntEnum):
    """Tissue ids of the internal map; organs map onto Synapse labels via :data:`TISSUE_TABLE`."""

    AIR = 0
    SUBCUT_FAT = 1
    MUSCLE = 2
    FAT = 3
    LUNG = 4
    HEART = 5
    PSOAS = 6
    CORTICAL_BONE = 7
    TRABECULAR_BONE = 8
    DISC = 9
    CSF = 10
    RIB = 11
    BOWEL_WALL = 12
    BOWEL_FLUID = 13
    GAS = 14
    FECES = 15
    ARTERY = 16
    VEIN = 17
    TABLE = 18
    SPLEEN = 20
    RK_CORTEX = 21
    RK_MEDULLA = 22
    LK_CORTEX = 23
    LK_MEDULLA = 24
    GALLBLADDER = 25
    ESOPHAGUS = 26
    LIVER = 27
    HEPATIC_VEIN = 28
    STOMACH_WALL = 29
    STOMACH_FLUID = 30
    STOMACH_GAS = 31
    AORTA = 32
    IVC = 33
    PORTAL_SPLENIC = 34
    PANCREAS = 35
    R_ADRENAL = 36
    L_ADRENAL = 37


# tissue: (HU low, HU high, texture amplitude HU, Synapse label). Each case draws its HU uniformly.
TISSUE_TABLE: dict[Tissue, tuple[float, float, float, int]] = {
    Tissue.AIR: (-1000.0, -1000.0, 0.0, 0),
    Tissue.SUBCUT_FAT: (-115.0, -85.0, 12.0, 0),
    Tissue.MUSCLE: (40.0, 60.0, 6.0, 0),
    Tissue.FAT: (-110.0, -80.0, 14.0, 0),
    Tissue.LUNG: (-870.0, -820.0, 25.0, 0),
    Tissue.HEART: (110.0, 150.0, 8.0, 0),
    Tissue.PSOAS: (40.0, 60.0, 6.0, 0),
    Tissue.CORTICAL_BONE: (700.0, 1200.0, 60.0, 0),
    Tissue.TRABECULAR_BONE: (300.0, 380.0, 40.0, 0),
    Tissue.DISC: (80.0, 100.0, 5.0, 0),
    Tissue.CSF: (0.0, 15.0, 3.0, 0),
    Tissue.RIB: (400.0, 700.0, 50.0, 0),
    Tissue.BOWEL_WALL: (60.0, 90.0, 6.0, 0),
    Tissue.BOWEL_FLUID: (0.0, 25.0, 5.0, 0),
    Tissue.GAS: (-1000.0, -990.0, 0.0, 0),
    Tissue.FECES: (-150.0, -40.0, 70.0, 0),
    Tissue.ARTERY: (150.0, 200.0, 4.0, 0),
    Tissue.VEIN: (120.0, 150.0, 4.0, 0),
    Tissue.TABLE: (150.0, 300.0, 5.0, 0),
    Tissue.SPLEEN: (110.0, 130.0, 6.0, 1),
    Tissue.RK_CORTEX: (150.0, 200.0, 6.0, 2),
    Tissue.RK_MEDULLA: (110.0, 140.0, 6.0, 2),
    Tissue.LK_CORTEX: (150.0, 200.0, 6.0, 3),
    Tissue.LK_MEDULLA: (110.0, 140.0, 6.0, 3),
    Tissue.GALLBLADDER: (0.0, 20.0, 3.0, 4),
    Tissue.ESOPHAGUS: (40.0, 60.0, 5.0, 5),
    Tissue.LIVER: (100.0, 120.0, 7.0, 6),
    Tissue.HEPATIC_VEIN: (140.0, 170.0, 4.0, 6),
    Tissue.STOMACH_WALL: (80.0, 100.0, 6.0, 7),
    Tissue.STOMACH_FLUID: (0.0, 20.0, 4.0, 7),
    Tissue.STOMACH_GAS: (-1000.0, -990.0, 0.0, 7),
    Tissue.AORTA: (150.0, 200.0, 4.0, 8),
    Tissue.IVC: (110.0, 140.0, 4.0, 9),
    Tissue.PORTAL_SPLENIC: (150.0, 180.0, 4.0, 10),
    Tissue.PANCREAS: (90.0, 110.0, 8.0, 11),
    Tissue.R_ADRENAL: (40.0, 60.0, 5.0, 12),
    Tissue.L_ADRENAL: (40.0, 60.0, 5.0, 13),
}
N_TISSUES = 64


def _lut(values: dict[int, object], dtype: type, default: object = 0) -> np.ndarray:
    out = np.full(N_TISSUES, default, dtype=dtype)
    for key, value in values.items():
        out[int(key)] = value
    return out


TISSUE_TO_LABEL = _lut({t: spec[3] for t, spec in TISSUE_TABLE.items()}, np.uint8)
_ORGAN_TISSUES = [t for t in Tissue if t >= Tissue.SPLEEN]
_SOFT = [Tissue.FAT, Tissue.LUNG, Tissue.HEART, Tissue.PSOAS, Tissue.BOWEL_WALL, Tissue.BOWEL_FLUID,
         Tissue.GAS, Tissue.FECES, Tissue.ARTERY, Tissue.VEIN]
# Where organs may paint (never over bone, the body wall, paraspinal muscle or outside the body).
ORGAN_PAINTABLE = _lut({t: True for t in [*_SOFT, *_ORGAN_TISSUES]}, np.bool_, False)
# Where unlabelled viscera (bowel, small vessels) may paint.
VISCERA_PAINTABLE = _lut({Tissue.FAT: True, Tissue.BOWEL_WALL: True, Tissue.BOWEL_FLUID: True,
                          Tissue.GAS: True, Tissue.FECES: True}, np.bool_, False)


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz(yaw) @ Ry(pitch) @ Rx(roll), angles in degrees; columns = local axes."""
    a, b, c = (math.radians(v) for v in (yaw, pitch, roll))
    rz = [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]]
    ry = [[math.cos(b), 0.0, math.sin(b)], [0.0, 1.0, 0.0], [-math.sin(b), 0.0, math.cos(b)]]
    rx = [[1.0, 0.0, 0.0], [0.0, math.cos(c), -math.sin(c)], [0.0, math.sin(c), math.cos(c)]]
    return _matmul(_matmul(rz, ry), rx)


# 3x3 algebra in plain Python floats: no BLAS kernels or fused multiply-adds, so organ parameters
# are bit-identical on every CPU.
def _matmul(a: np.ndarray | list, b: np.ndarray | list) -> np.ndarray:
    return np.array([[sum(float(a[i][k]) * float(b[k][j]) for k in range(3)) for j in range(3)] for i in range(3)])


def _matvec(a: np.ndarray, v: np.ndarray | tuple) -> np.ndarray:
    return np.array([sum(float(a[i][k]) * float(v[k]) for k in range(3)) for i in range(3)])


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid with semi-axes ``radii`` (mm) along the columns of ``axes`` (orthonormal 3x3)."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    axes: np.ndarray = field(default_factory=lambda: np.eye(3))

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.axes * np.asarray(self.radii)) ** 2).sum(axis=1))
        return np.asarray(self.center) - half, np.asarray(self.center) + half

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm): (sqrt(q) - 1) * smallest radius."""
        d = (x - float(self.center[0]), y - float(self.center[1]), z - float(self.center[2]))
        shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
        q = np.zeros(shape, dtype=F32)
        u = np.empty(shape, dtype=F32)
        for j in range(3):
            coef = [float(self.axes[k, j] / self.radii[j]) for k in range(3)]
            np.multiply(d[0], coef[0], out=u)
            u += d[1] * coef[1]
            u += d[2] * coef[2]
            u *= u
            q += u
        np.sqrt(q, out=q)
        q -= 1.0
        q *= float(min(self.radii))
        return q


@dataclass(frozen=True)
class Segment:
    """Capsule from ``p0`` to ``p1`` whose radius tapers linearly from ``r0`` to ``r1`` (mm)."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.r0, self.r1)
        p0, p1 = np.asarray(self.p0), np.asarray(self.p1)
        return np.minimum(p0, p1) - r, np.maximum(p0, p1) + r

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        a = [float(self.p1[k] - self.p0[k]) for k in range(3)]
        inv = 1.0 / max(sum(v * v for v in a), 1e-6)
        d = (x - float(self.p0[0]), y - float(self.p0[1]), z - float(self.p0[2]))
        t = np.empty(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=F32)
        np.multiply(d[0], a[0] * inv, out=t)
        t += d[1] * (a[1] * inv)
        t += d[2] * (a[2] * inv)
        np.clip(t, 0.0, 1.0, out=t)
        dist = None
        for k in range(3):
            e = d[k] - t * a[k]
            e *= e
            dist = e if dist is None else np.add(dist, e, out=dist)
        np.sqrt(dist, out=dist)
        t *= float(self.r1 - self.r0)
        t += float(self.r0)
        dist -= t
        return dist


def tube(points: list[tuple[float, float, float]], radii: list[float]) -> list[Segment]:
    """A tapered tube through ``points`` as a chain of capsules."""
    return [Segment(points[i], points[i + 1], radii[i], radii[i + 1]) for i in range(len(points) - 1)]


Primitive = Ellipsoid | Segment
Box = tuple[slice, slice, slice]


class Canvas:
    """The tissue map of one case plus its patient-frame axes and warped organ coordinates.

    Args:
        xs, ys, zs: voxel-centre coordinates (mm, patient frame) along the three array axes.
        warp: six 1-D displacement profiles (mm): ``warp["xy"]`` is added to x as a function of y,
            etc. (keys ``xy xz yx yz zx zy``), each sampled on the matching axis.
        region: in-plane index bounds ``(i0, i1, j0, j1)`` inside which organs may be drawn.
        margin: mm added around every primitive's bounding box (covers the warp).
    """

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, warp: dict[str, np.ndarray],
                 region: tuple[int, int, int, int], margin: float) -> None:
        self.xs, self.ys, self.zs = (np.asarray(v, dtype=F32) for v in (xs, ys, zs))
        self.shape = (len(xs), len(ys), len(zs))
        self.tissue = np.zeros(self.shape, dtype=np.uint8)
        self.margin = margin
        i0, i1, j0, j1 = region
        self.region = (slice(i0, i1), slice(j0, j1), slice(0, self.shape[2]))
        x, y, z = self.xs[i0:i1, None, None], self.ys[None, j0:j1, None], self.zs[None, None, :]
        w = {k: np.asarray(v, dtype=F32) for k, v in warp.items()}
        self.wx = (x + w["xy"][None, j0:j1, None]) + w["xz"][None, None, :]
        self.wy = (y + w["yx"][i0:i1, None, None]) + w["yz"][None, None, :]
        self.wz = (z + w["zx"][i0:i1, None, None]) + w["zy"][None, j0:j1, None]

    def box(self, lo: np.ndarray, hi: np.ndarray, margin: float | None = None, full: bool = False) -> Box | None:
        """Index box of the patient-frame box [lo, hi] grown by ``margin`` (default: the warp margin),
        clipped to the drawing region (or to the whole volume if ``full``); None if empty."""
        m = self.margin if margin is None else margin
        out = []
        for k, axis in enumerate((self.xs, self.ys, self.zs)):
            step = float(axis[1] - axis[0]) if len(axis) > 1 else 1.0
            a = math.floor((lo[k] - m - float(axis[0])) / step)
            b = math.ceil((hi[k] + m - float(axis[0])) / step) + 1
            reg = slice(0, self.shape[k]) if full else self.region[k]
            a, b = max(a, reg.start), min(b, reg.stop)
            if a >= b:
                return None
            out.append(slice(a, b))
        return (out[0], out[1], out[2])

    def warped(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Warped patient coordinates (views) inside ``box``."""
        rel = tuple(slice(s.start - r.start, s.stop - r.start) for s, r in zip(box, self.region, strict=True))
        return self.wx[rel], self.wy[rel], self.wz[rel]

    def plain(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unwarped patient coordinates inside ``box``, as broadcastable 1-D views."""
        return (self.xs[box[0], None, None], self.ys[None, box[1], None], self.zs[None, None, box[2]])

    def evaluate(self, prims: list[Primitive], cut: list[Primitive] = ()) -> tuple[Box, np.ndarray] | None:
        """Signed distance (mm) of the union of ``prims`` minus ``cut`` over its bounding box."""
        boxes = [self.box(*p.bounds()) for p in prims]
        live = [(p, b) for p, b in zip(prims, boxes, strict=True) if b is not None]
        if not live:
            return None
        union = tuple(slice(min(b[k].start for _, b in live), max(b[k].stop for _, b in live))
                      for k in range(3))
        sd = np.full(tuple(s.stop - s.start for s in union), _FAR, dtype=F32)
        for sign, group in ((1, live), (-1, [(p, self.box(*p.bounds())) for p in cut])):
            for p, b in group:
                if b is None:
                    continue
                b = tuple(slice(max(b[k].start, union[k].start), min(b[k].stop, union[k].stop))
                          for k in range(3))
                if any(s.start >= s.stop for s in b):
                    continue
                rel = tuple(slice(s.start - u.start, s.stop - u.start) for s, u in zip(b, union, strict=True))
                val = p.sd(*self.warped(b))
                if sign > 0:
                    np.minimum(sd[rel], val, out=sd[rel])
                else:
                    np.maximum(sd[rel], -val, out=sd[rel])
        return union, sd

    def paint(self, box: Box, mask: np.ndarray, tissue: int, where: np.ndarray) -> None:
        """Set ``tissue`` at ``mask`` inside ``box`` where the current tissue is allowed by ``where``."""
        sub = self.tissue[box]
        sub[mask & where[sub]] = tissue


@dataclass
class Organ:
    """A structure to draw (labelled organ or unlabelled viscus): primitives and inner tissues."""

    tissue: Tissue
    prims: list[Primitive]
    cut: list[Primitive] = field(default_factory=list)
    shell: tuple[float, Tissue] | None = None  # (thickness mm, tissue of the inner part)
    gas: tuple[float, Tissue] | None = None  # (y level mm, tissue above it) for hollow organs
    below_diaphragm: bool = False
    where: np.ndarray | None = None  # tissues it may paint over; default ORGAN/VISCERA_PAINTABLE


@dataclass(frozen=True)
class Body:
    """Body outline of one case (mm): abdominal-cavity semi-axes at z = 0 plus wall layers.

    ``cavity`` = (lateral, anterior, posterior) semi-axes of the inner muscle boundary measured
    from the body axis; ``fat`` and ``muscle`` = thickness of the subcutaneous fat and of the muscle
    wall at the lateral, anterior and posterior sides.
    """

    cavity: tuple[float, float, float]
    fat: tuple[float, float, float]
    muscle: tuple[float, float, float]

    @property
    def half_width(self) -> float:
        """Largest lateral half-width of the skin outline (mm) inside the scanned range."""
        return (self.cavity[0] + self.fat[0] + self.muscle[0]) * 1.06

    @property
    def half_depth(self) -> tuple[float, float]:
        """Anterior and posterior extent of the skin outline from the body axis (mm)."""
        return (self.cavity[1] + self.fat[1] + self.muscle[1]) * 1.08, self.cavity[2] + self.fat[2] + self.muscle[2]


def sample_body(rng: np.random.Generator) -> Body:
    """Draw a body outline: cavity 240-290 mm wide and 160-190 mm deep, fat 8-40 mm, muscle 6-14 mm."""
    cavity = (rng.uniform(120.0, 145.0), rng.uniform(80.0, 97.0), rng.uniform(80.0, 93.0))
    fat = (rng.uniform(10.0, 35.0), rng.uniform(10.0, 40.0), rng.uniform(8.0, 22.0))
    muscle = (rng.uniform(8.0, 14.0), rng.uniform(8.0, 12.0), rng.uniform(6.0, 10.0))
    return Body(tuple(map(float, cavity)), tuple(map(float, fat)), tuple(map(float, muscle)))


@dataclass(frozen=True)
class Layout:
    """Maps the nominal anatomy (designed for a 264 x 175 mm cavity) onto one case's body."""

    sx: float
    sa: float
    sp: float
    dz: float
    dome_top: tuple[float, float]  # right / left diaphragm dome apex z (mm)

    @classmethod
    def of(cls, body: Body, rng: np.random.Generator) -> Layout:
        return cls(body.cavity[0] / 132.0, body.cavity[1] / 88.0, body.cavity[2] / 87.0,
                   float(rng.uniform(-8.0, 8.0)),
                   (float(rng.uniform(112.0, 124.0)), float(rng.uniform(98.0, 110.0))))

    def p(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        return (x * self.sx, y * (self.sa if y >= 0 else self.sp), z + self.dz)

    def dome(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (mm) of the diaphragm over the patient-frame points (x, y); lung lies above."""
        xn = x / self.sx
        yn = np.where(y >= 0, y / self.sa, y / self.sp).astype(F32) + 5.0
        yt = np.where(yn > 0, (yn / 160.0) ** 2, (yn / 85.0) ** 2).astype(F32) * 100.0
        right = (self.dome_top[0] + self.dz) - 100.0 * ((xn - 50.0) / 140.0) ** 2 - yt
        left = (self.dome_top[1] + self.dz) - 100.0 * ((xn + 55.0) / 140.0) ** 2 - yt
        return np.maximum(right, left)


def _place(rng: np.random.Generator, lay: Layout, prims: list[Primitive], anchor: tuple[float, float, float],
           scale: float, shift: float, yaw: float, radius_factor: float = 1.0) -> list[Primitive]:
    """Lay nominal primitives onto the case and jitter them as one rigid-ish organ."""
    s = 1.0 + float(rng.uniform(-scale, scale))
    t = rng.uniform(-shift, shift, 3)
    rot = rotation(float(rng.uniform(-yaw, yaw)))
    a = np.asarray(lay.p(*anchor))

    def tp(p: tuple[float, float, float]) -> tuple[float, float, float]:
        q = a + s * _matvec(rot, np.asarray(lay.p(*p)) - a) + t
        return (float(q[0]), float(q[1]), float(q[2]))

    rs = s * radius_factor
    out: list[Primitive] = []
    for p in prims:
        if isinstance(p, Ellipsoid):
            out.append(Ellipsoid(tp(p.center), tuple(float(r * rs) for r in p.radii), _matmul(rot, p.axes)))
        else:
            out.append(Segment(tp(p.p0), tp(p.p1), p.r0 * rs, p.r1 * rs))
    return out


def _limbs(apex: tuple[float, float, float], dirs: list[tuple[float, float]], radii: tuple[float, float, float]
           ) -> list[Primitive]:
    """Thin plates leaving ``apex`` along in-plane directions: an adrenal's Y / V shape."""
    out: list[Primitive] = []
    for dx, dy in dirs:
        n = math.hypot(dx, dy)
        d = np.array([dx / n, dy / n, 0.0])
        axes = np.stack([d, np.array([-d[1], d[0], 0.0]), np.array([0.0, 0.0, 1.0])], axis=1)
        c = np.asarray(apex) + (radii[0] - 1.0) * d
        out.append(Ellipsoid((float(c[0]), float(c[1]), float(c[2])), radii, axes))
    return out


def sample_organs(rng: np.random.Generator, lay: Layout) -> list[Organ]:
    """The 13 Synapse organs of one case, in painting order (later ones win overlaps)."""
    E = Ellipsoid  # noqa: N806
    liver = _place(rng, lay, [
        E((66.0, 2.0, 52.0), (61.0, 77.0, 77.0), rotation(-10.0)),
        E((-12.0, 48.0, 68.0), (58.0, 30.0, 42.0), rotation(15.0)),
        E((25.0, 25.0, 55.0), (38.0, 42.0, 50.0)),
        E((85.0, 0.0, -10.0), (40.0, 50.0, 40.0)),
    ], (50.0, 10.0, 40.0), 0.05, 6.0, 5.0)
    hepatic_veins = _place(rng, lay, [
        *tube([(26.0, 8.0, 100.0), (80.0, 12.0, 72.0)], [5.0, 2.5]),
        *tube([(26.0, 8.0, 100.0), (42.0, 45.0, 70.0)], [4.5, 2.5]),
        *tube([(26.0, 8.0, 100.0), (-15.0, 42.0, 78.0)], [4.0, 2.5]),
    ], (26.0, 8.0, 100.0), 0.05, 3.0, 5.0)
    stomach = _place(rng, lay, tube(
        [(-45.0, -5.0, 88.0), (-66.0, 18.0, 55.0), (-56.0, 48.0, 15.0), (-20.0, 58.0, -10.0),
         (15.0, 48.0, -15.0), (32.0, 36.0, -12.0)],
        [30.0, 33.0, 28.0, 22.0, 15.0, 12.0]), (-40.0, 30.0, 30.0), 0.05, 6.0, 5.0,
        radius_factor=float(rng.uniform(0.85, 1.3)))
    top_y = max(max(s.p0[1] + s.r0, s.p1[1] + s.r1) for s in stomach)
    stomach_gas = top_y - float(rng.uniform(3.0, 30.0)) if rng.uniform() < 0.6 else _FAR
    spleen = _place(rng, lay, [E((-90.0, -30.0, 60.0), (24.0, 48.0, 42.0), rotation(54.0))],
                    (-90.0, -30.0, 60.0), 0.10, 6.0, 8.0)
    kidneys = []
    for side in (1.0, -1.0):
        c = (70.0 * side, -48.0 if side > 0 else -46.0, -27.0 if side > 0 else -7.0)
        rot = rotation(-30.0 * side, -10.0 * side, 8.0)
        # local axis 0 points laterally (right kidney) or medially (left kidney); the hilum is medial
        hilum = np.asarray(c) + 24.0 * (-rot[:, 0] if side > 0 else rot[:, 0])
        kidneys.append(_place(rng, lay, [E(c, (28.0, 24.0, 58.0), rot),
                                         E(tuple(float(v) for v in hilum), (13.0, 10.0, 20.0), rot)],
                              c, 0.07, 4.0, 6.0))
    gallbladder = _place(rng, lay, [E((55.0, 45.0, -8.0), (16.0, 16.0, 33.0), rotation(0.0, 0.0, 27.0))],
                         (55.0, 45.0, -8.0), 0.15, 5.0, 8.0)
    esophagus = _place(rng, lay, tube([(-6.0, 6.0, 160.0), (-12.0, 10.0, 110.0), (-24.0, 12.0, 90.0),
                                       (-34.0, 10.0, 76.0)], [10.0, 10.0, 9.5, 9.0]),
                       (-20.0, 10.0, 100.0), 0.05, 3.0, 3.0)
    aorta = _place(rng, lay, tube([(-18.0, -16.0, 160.0), (-13.0, -9.0, 60.0), (-10.0, -7.0, -40.0),
                                   (-6.0, -4.0, -160.0)], [10.5, 10.0, 9.0, 8.0]),
                   (-10.0, -7.0, 0.0), 0.05, 3.0, 1.0)
    ivc_path = [(21.0, -4.0, -160.0), (22.0, -2.0, -20.0), (25.0, 4.0, 60.0), (28.0, 8.0, 105.0),
                (24.0, 10.0, 160.0)]
    ivc = _place(rng, lay, [*tube([(x - 3.2, y, z) for x, y, z in ivc_path], [6.8] * 5),
                            *tube([(x + 3.2, y, z) for x, y, z in ivc_path], [6.8] * 5)],
                 (22.0, 0.0, 0.0), 0.05, 3.0, 1.0)
    veins = _place(rng, lay, [
        *tube([(-72.0, -20.0, 38.0), (-60.0, -12.0, 22.0), (-30.0, 2.0, 8.0), (8.0, 8.0, -6.0)],
              [4.5, 4.5, 4.5, 5.5]),
        *tube([(8.0, 8.0, -6.0), (30.0, 18.0, 18.0), (45.0, 16.0, 35.0)], [6.5, 7.0, 6.5]),
        *tube([(45.0, 16.0, 35.0), (80.0, 8.0, 45.0)], [5.0, 3.5]),
        *tube([(45.0, 16.0, 35.0), (10.0, 35.0, 48.0)], [4.5, 3.0]),
    ], (10.0, 8.0, 10.0), 0.06, 4.0, 4.0)
    pancreas = _place(rng, lay, tube([(20.0, 12.0, -45.0), (38.0, 18.0, -25.0), (12.0, 22.0, -8.0),
                                      (-25.0, 16.0, 5.0), (-58.0, -2.0, 18.0), (-78.0, -16.0, 28.0)],
                                     [9.0, 15.0, 12.0, 12.0, 10.0, 8.0]), (0.0, 15.0, 0.0), 0.08, 5.0, 5.0)
    r_adrenal = _place(rng, lay, _limbs((36.0, -20.0, 42.0), [(-0.35, -1.0), (0.7, -0.7)], (13.0, 3.0, 17.0)),
                       (36.0, -20.0, 42.0), 0.07, 3.0, 8.0)
    l_adrenal = _place(rng, lay, _limbs((-34.0, -14.0, 24.0), [(0.35, -1.0), (-0.7, -0.7)], (13.0, 3.0, 18.0)),
                       (-34.0, -14.0, 24.0), 0.07, 3.0, 8.0)
    return [
        Organ(Tissue.LIVER, liver, below_diaphragm=True),
        Organ(Tissue.HEPATIC_VEIN, hepatic_veins, where=_lut({Tissue.LIVER: True}, np.bool_, False)),
        Organ(Tissue.STOMACH_WALL, stomach, shell=(float(rng.uniform(3.0, 5.0)), Tissue.STOMACH_FLUID),
              gas=(stomach_gas, Tissue.STOMACH_GAS), below_diaphragm=True),
        Organ(Tissue.SPLEEN, spleen, below_diaphragm=True),
        Organ(Tissue.RK_CORTEX, kidneys[0][:1], cut=kidneys[0][1:], shell=(7.0, Tissue.RK_MEDULLA)),
        Organ(Tissue.LK_CORTEX, kidneys[1][:1], cut=kidneys[1][1:], shell=(7.0, Tissue.LK_MEDULLA)),
        Organ(Tissue.PANCREAS, pancreas),
        Organ(Tissue.GALLBLADDER, gallbladder),
        Organ(Tissue.ESOPHAGUS, esophagus),
        Organ(Tissue.PORTAL_SPLENIC, veins),
        Organ(Tissue.IVC, ivc),
        Organ(Tissue.AORTA, aorta),
        Organ(Tissue.R_ADRENAL, r_adrenal),
        Organ(Tissue.L_ADRENAL, l_adrenal),
    ]


_FAT_ONLY = _lut({Tissue.FAT: True}, np.bool_, False)


def sample_viscera(rng: np.random.Generator, lay: Layout) -> list[Organ]:
    """Unlabelled structures (label 0): psoas, bowel, colon, duodenum and the smaller vessels."""
    out: list[Organ] = []
    for side in (1.0, -1.0):
        psoas = tube([(30.0 * side, -32.0, 10.0), (40.0 * side, -24.0, -60.0), (50.0 * side, -14.0, -170.0)],
                     [5.0, 15.0, 22.0])
        out.append(Organ(Tissue.PSOAS, _place(rng, lay, psoas, (40.0 * side, -24.0, -60.0), 0.06, 3.0, 2.0),
                         where=_FAT_ONLY))
    for _ in range(int(rng.integers(9, 14))):  # small-bowel loops in the lower anterior abdomen
        p = rng.uniform((-75.0, 5.0, -170.0), (70.0, 75.0, -45.0))
        pts = [tuple(p)]
        for _ in range(2):
            step = rng.normal(size=3)
            p = np.clip(p + rng.uniform(30.0, 60.0) * step / math.sqrt(sum(float(v) ** 2 for v in step)),
                        (-80.0, 0.0, -175.0), (75.0, 80.0, -40.0))
            pts.append(tuple(p))
        r = float(rng.uniform(9.0, 13.0))
        gas = -_FAR if rng.uniform() < 0.2 else _FAR
        out.append(Organ(Tissue.BOWEL_WALL, _place(rng, lay, tube(pts, [r, r, r]), tuple(pts[1]), 0.0, 0.0, 0.0),
                         shell=(2.5, Tissue.BOWEL_FLUID), gas=(gas, Tissue.GAS)))
    colon = tube([(95.0, 0.0, -170.0), (92.0, 10.0, -80.0), (88.0, 30.0, -35.0), (50.0, 70.0, -45.0),
                  (0.0, 78.0, -50.0), (-50.0, 72.0, -35.0), (-92.0, 35.0, 5.0), (-100.0, 5.0, -40.0),
                  (-98.0, 0.0, -170.0)], [24.0, 24.0, 22.0, 20.0, 20.0, 20.0, 20.0, 18.0, 18.0])
    colon_gas = float(rng.uniform(-30.0, 100.0))
    out.append(Organ(Tissue.BOWEL_WALL, _place(rng, lay, colon, (0.0, 40.0, -50.0), 0.05, 6.0, 3.0),
                     shell=(3.0, Tissue.FECES), gas=(colon_gas, Tissue.GAS)))
    duodenum = tube([(32.0, 36.0, -12.0), (55.0, 20.0, -15.0), (58.0, 8.0, -45.0), (45.0, 14.0, -72.0),
                     (0.0, 18.0, -74.0), (-25.0, 12.0, -60.0)], [12.0, 13.0, 13.0, 12.0, 11.0, 10.0])
    out.append(Organ(Tissue.BOWEL_WALL, _place(rng, lay, duodenum, (35.0, 15.0, -45.0), 0.05, 4.0, 3.0),
                     shell=(2.5, Tissue.BOWEL_FLUID),
                     gas=(float(rng.uniform(10.0, 60.0)) if rng.uniform() < 0.5 else _FAR, Tissue.GAS)))
    arteries = [
        *tube([(-11.0, 0.0, -2.0), (-10.0, 18.0, -14.0), (-8.0, 28.0, -45.0), (-6.0, 32.0, -170.0)],
              [4.0, 4.0, 3.5, 3.0]),  # superior mesenteric artery
        *tube([(-12.0, -2.0, 18.0), (-8.0, 16.0, 22.0)], [3.5, 3.5]),  # coeliac trunk
        *tube([(-8.0, 16.0, 22.0), (-40.0, 8.0, 24.0), (-70.0, -14.0, 38.0)], [3.0, 3.0, 2.5]),  # splenic a.
        *tube([(-8.0, 16.0, 22.0), (25.0, 22.0, 24.0), (42.0, 20.0, 33.0)], [3.0, 2.5, 2.5]),  # hepatic a.
        *tube([(-9.0, -10.0, -20.0), (10.0, -14.0, -22.0), (48.0, -38.0, -24.0)], [3.0, 3.0, 3.0]),  # renal
        *tube([(-16.0, -10.0, -12.0), (-50.0, -36.0, -8.0)], [3.0, 3.0]),
    ]
    veins = [
        *tube([(8.0, 8.0, -6.0), (12.0, 26.0, -45.0), (15.0, 34.0, -170.0)], [5.0, 5.0, 4.5]),  # SMV
        *tube([(-52.0, -32.0, -5.0), (-25.0, 4.0, -13.0), (-10.0, 8.0, -15.0), (18.0, 0.0, -16.0)],
              [5.0, 5.0, 5.0, 5.0]),  # left renal vein, between aorta and SMA
        *tube([(46.0, -36.0, -22.0), (24.0, -6.0, -20.0)], [5.0, 5.0]),
    ]
    out.append(Organ(Tissue.ARTERY, _place(rng, lay, arteries, (0.0, 0.0, 0.0), 0.03, 2.0, 1.0)))
    out.append(Organ(Tissue.VEIN, _place(rng, lay, veins, (0.0, 0.0, 0.0), 0.03, 2.0, 1.0)))
    return out


def _warp_profiles(rng: np.random.Generator, axes: dict[str, np.ndarray], amplitude: float
                   ) -> dict[str, np.ndarray]:
    """Six smooth 1-D displacement profiles (mm), two sine waves each, wavelengths 120-300 mm."""
    out = {}
    for key in ("xy", "xz", "yx", "yz", "zx", "zy"):
        coord = np.asarray(axes[key[1]], dtype=np.float64)
        f = np.zeros_like(coord)
        for _ in range(2):
            a, lam, ph = rng.uniform(0.0, amplitude / 4.0), rng.uniform(120.0, 300.0), rng.uniform(0.0, 2 * np.pi)
            f += a * np.sin(coord * (2 * np.pi / lam) + ph)
        out[key] = f
    return out


def _body_layers(cv: Canvas, body: Body) -> None:
    """Air / subcutaneous fat / muscle wall / cavity fat: three nested per-slice ellipses, plus the table."""
    xs, ys, zs = cv.xs, cv.ys, cv.zs
    zf = zs / 150.0
    fx, fa = 1.0 - 0.04 * zf, 1.0 - 0.06 * zf
    buf = np.empty(cv.shape, dtype=F32)
    inside = np.empty(cv.shape, dtype=np.bool_)
    for k in range(3):
        add = [sum(layer[side] for layer in (body.fat, body.muscle)[k:]) for side in range(3)]
        a = (body.cavity[0] + add[0]) * fx
        by = np.where(ys[:, None] >= 0, ((body.cavity[1] + add[1]) * fa)[None, :],
                      np.float32(body.cavity[2] + add[2])).astype(F32)
        qx = (xs[:, None] / a[None, :]) ** 2
        qy = (ys[:, None] / by) ** 2
        np.add(qx[:, None, :], qy[None, :, :], out=buf)
        np.less_equal(buf, 1.0, out=inside)
        cv.tissue += inside.view(np.uint8)
    back = body.half_depth[1]
    top = -back - 2.0 + 0.0012 * xs[:, None] ** 2
    table = (ys[None, :] <= top) & (ys[None, :] > top - 8.0) & (np.abs(xs[:, None]) < 220.0)
    if table.any():
        sub = cv.tissue[:, :, :]
        sub[table[:, :, None] & (sub == Tissue.AIR)] = Tissue.TABLE


def _ribs(cv: Canvas, body: Body, lay: Layout, pitch: float, phase0: float) -> None:
    """Ribs 7-12: partial rings in the muscle wall, sloping down from the spine towards the front.

    The position around the body is a pseudo-angle ``pa`` (0 posterior midline, 0.5 lateral, 1
    anterior midline) made from arithmetic only; rib n runs from its vertebra T_n at ``pa`` 0.06 down
    by 110 mm per unit of ``pa`` and ends at ``pa_end`` (the floating ribs early).
    """
    wall = np.nonzero(cv.tissue == Tissue.MUSCLE)
    if not len(wall[0]):
        return
    x, y = cv.xs[wall[0]] / body.cavity[0], cv.ys[wall[1]]
    y = np.where(y >= 0, y / body.cavity[1], y / body.cavity[2]).astype(F32)
    pa = 0.5 + 0.5 * y / (np.abs(x) + np.abs(y) + 1e-3)
    z = cv.zs[wall[2]]
    rib = np.zeros(len(pa), dtype=np.bool_)
    for n, pa_end in ((7, 0.95), (8, 0.95), (9, 0.8), (10, 0.65), (11, 0.45), (12, 0.3)):
        zc = (pitch * (13 - n) + phase0 + 5.0) - 110.0 * pa
        rib |= (np.abs(z - zc) <= 5.5) & (pa >= 0.06) & (pa <= pa_end)
    cv.tissue[wall[0][rib], wall[1][rib], wall[2][rib]] = Tissue.RIB


def _spine(cv: Canvas, body: Body, lay: Layout, rng: np.random.Generator) -> None:
    """Ribs, paraspinal muscles and vertebrae (body, disc, canal, arch, spinous and transverse processes)."""
    pitch, phase0 = float(rng.uniform(30.5, 33.5)), float(rng.uniform(-3.0, 3.0))
    _ribs(cv, body, lay, pitch, phase0)
    yvb = -38.0 * lay.sp
    box = cv.box(np.array([-80.0 * lay.sx, yvb - 75.0, -1e4]), np.array([80.0 * lay.sx, yvb + 30.0, 1e4]),
                 margin=0.0, full=True)
    if box is None:
        return
    x, y, z = cv.plain(box)
    w = np.clip((40.0 - z) / 100.0, 0.0, 1.0)
    ax, ay = 19.0 + 5.0 * w, 15.0 + 3.0 * w
    yc = yvb - 0.05 * z
    ph = np.remainder(z - phase0, pitch) - pitch / 2.0
    half = (pitch - (5.0 + 3.0 * w)) / 2.0
    in_body = np.abs(ph) <= half
    sub = cv.tissue[box]
    para = ((np.abs(x) - 40.0 * lay.sx) / 32.0) ** 2 + ((y - (yc - 45.0)) / 24.0) ** 2 <= 1.0
    sub[para & ((sub == Tissue.FAT) | (sub == Tissue.MUSCLE))] = Tissue.MUSCLE
    qb = (x / ax) ** 2 + ((y - yc) / ay) ** 2
    vb = qb <= 1.0
    sub[vb & ~in_body] = Tissue.DISC
    sub[vb & in_body] = Tissue.TRABECULAR_BONE
    sub[vb & in_body & (qb > (1.0 - 2.5 / ay) ** 2)] = Tissue.CORTICAL_BONE
    ycan = yc - ay - 8.5
    rc = x**2 + (y - ycan) ** 2
    arch = (rc > 8.5**2) & (rc <= 15.0**2) & (y - ycan < 3.0) & (np.abs(ph) <= half + 2.0)
    spinous = ((x / 4.0) ** 2 + ((y - (ycan - 22.0)) / 12.0) ** 2 <= 1.0) & (np.abs(ph + 6.0) <= 11.0)
    transverse = (((np.abs(x) - 27.0) / 14.0) ** 2 + ((y - (ycan + 2.0)) / 4.5) ** 2 <= 1.0) & (np.abs(ph) <= 6.0)
    sub[(arch | spinous | transverse) & (sub != Tissue.AIR)] = Tissue.CORTICAL_BONE
    sub[rc <= 8.5**2] = Tissue.CSF


def _thorax(cv: Canvas, lay: Layout) -> None:
    """Lung bases above the diaphragm dome, and the heart above its central part."""
    full = (slice(cv.region[0].start, cv.region[0].stop), slice(cv.region[1].start, cv.region[1].stop))
    x, y = cv.xs[full[0], None, None], cv.ys[None, full[1], None]
    dome = lay.dome(x, y)
    ks = np.flatnonzero(cv.zs > float(dome.min()))
    if not len(ks):
        return
    box = (full[0], full[1], slice(int(ks[0]), len(cv.zs)))
    above = cv.zs[None, None, box[2]] > dome
    heart = Ellipsoid(lay.p(-10.0, 45.0, 165.0), (75.0, 55.0, 60.0)).sd(x, y, cv.zs[None, None, box[2]]) < 0
    cv.paint(box, above & heart, Tissue.HEART, _FAT_ONLY)
    cv.paint(box, above, Tissue.LUNG, _FAT_ONLY)


def _diaphragm(cv: Canvas, lay: Layout, thickness: float = 5.0) -> None:
    """A muscle sheet just under the dome wherever fat is left there."""
    full = (slice(cv.region[0].start, cv.region[0].stop), slice(cv.region[1].start, cv.region[1].stop))
    dome = lay.dome(cv.xs[full[0], None, None], cv.ys[None, full[1], None])
    ks = np.flatnonzero(cv.zs > float(dome.min()) - thickness)
    if not len(ks):
        return
    box = (full[0], full[1], slice(int(ks[0]), len(cv.zs)))
    z = cv.zs[None, None, box[2]]
    sheet = (z <= dome) & (z > dome - thickness)
    cv.paint(box, sheet, Tissue.MUSCLE, _FAT_ONLY)


def _draw(cv: Canvas, lay: Layout, organ: Organ, where: np.ndarray) -> tuple[Box, np.ndarray] | None:
    res = cv.evaluate(organ.prims, organ.cut)
    if res is None:
        return None
    box, sd = res
    inside = sd < 0.0
    x, y, z = cv.plain(box)
    if organ.below_diaphragm:
        inside &= z <= lay.dome(x, y)
    where = organ.where if organ.where is not None else where
    cv.paint(box, inside, organ.tissue, where)
    if organ.shell is not None:
        inner = inside & (sd < -organ.shell[0])
        if organ.gas is not None and organ.gas[0] < _FAR:
            gas = inner & (y > organ.gas[0])
            inner &= ~gas
            cv.paint(box, gas, organ.gas[1], where)
        cv.paint(box, inner, organ.shell[1], where)
    return box, sd


def _ensure_presence(cv: Canvas, drawn: list[tuple[Organ, tuple[Box, np.ndarray] | None]]) -> None:
    """Give every labelled organ at least MIN_VOXELS voxels: its deepest voxels (smallest signed
    distance), never taking voxels from another organ that is itself at the minimum."""
    counts: dict[int, int] = {}
    for organ, res in drawn:
        label = int(TISSUE_TO_LABEL[organ.tissue])
        if res is not None and label not in counts:
            counts[label] = int(np.count_nonzero(TISSUE_TO_LABEL[cv.tissue[res[0]]] == label))
    for organ, res in drawn:
        label = int(TISSUE_TO_LABEL[organ.tissue])
        if res is None or counts.get(label, 0) >= MIN_VOXELS or organ.tissue == Tissue.HEPATIC_VEIN:
            continue
        box, sd = res
        sub = cv.tissue[box]
        for flat in np.argsort(sd, axis=None, kind="stable"):
            idx = np.unravel_index(flat, sd.shape)
            other = int(TISSUE_TO_LABEL[sub[idx]])
            if other == label or (other and counts.get(other, 0) <= MIN_VOXELS):
                continue
            sub[idx] = organ.tissue
            counts[label] += 1
            if other:
                counts[other] -= 1
            if counts[label] >= MIN_VOXELS:
                break


def render_tissues(rng: np.random.Generator, body: Body, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray,
                   deformation_mm: float) -> np.ndarray:
    """Tissue map of one case.

    Args:
        rng: the case's generator (consumed in a fixed order).
        body: the case's body outline (see :func:`sample_body`).
        xs, ys, zs: voxel-centre coordinates (mm, patient frame, increasing) of the three axes.
        deformation_mm: largest displacement of the smooth organ warp per axis (mm).

    Returns:
        uint8 array (len(xs), len(ys), len(zs)) of :class:`Tissue` ids; every labelled organ has at
        least :data:`MIN_VOXELS` voxels.
    """
    lay = Layout.of(body, rng)
    axes = {"x": xs, "y": ys, "z": zs}
    warp = _warp_profiles(rng, axes, deformation_mm)
    lim_x = body.cavity[0] * 1.06 + 10.0
    lim = [(-lim_x, lim_x), (-body.cavity[2] - 10.0, body.cavity[1] * 1.08 + 10.0)]
    region = []
    for (lo, hi), axis in zip(lim, (xs, ys), strict=True):
        region += [int(np.searchsorted(axis, lo)), int(np.searchsorted(axis, hi, side="right"))]
    cv = Canvas(xs, ys, zs, warp, (region[0], region[1], region[2], region[3]), deformation_mm + 1.0)
    _body_layers(cv, body)
    _spine(cv, body, lay, rng)
    _thorax(cv, lay)
    viscera = sample_viscera(rng, lay)
    organs = sample_organs(rng, lay)
    for organ in viscera:
        _draw(cv, lay, organ, VISCERA_PAINTABLE)
    drawn = [(organ, _draw(cv, lay, organ, ORGAN_PAINTABLE)) for organ in organs]
    _diaphragm(cv, lay)
    _ensure_presence(cv, drawn)
    return cv.tissue
