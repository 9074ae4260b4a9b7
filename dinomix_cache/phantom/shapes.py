"""Shape primitives of the phantom (ellipsoids, tapered capsules) and the canvas they are drawn on.

Everything here works in the *patient frame*: millimetres, RAS+ (x towards the patient's right,
y anterior, z superior), x = y = 0 on the body axis, z = 0 at the centre of the L1 vertebra.
Shapes are signed distances (mm, negative inside), evaluated only inside each primitive's bounding box,
at coordinates bent by one smooth random warp per case. Determinism: only IEEE-exact float32 arithmetic
(``+ - * /``, ``sqrt``, comparisons) touches volume-sized arrays, and the 3x3 algebra runs in plain
Python floats, so results do not depend on the CPU's SIMD paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

F32 = np.float32
FAR = 1.0e4  # signed distance of "nowhere near" (mm)


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix Rz(yaw) @ Ry(pitch) @ Rx(roll), angles in degrees; columns = local axes."""
    a, b, c = (math.radians(v) for v in (yaw, pitch, roll))
    rz = [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]]
    ry = [[math.cos(b), 0.0, math.sin(b)], [0.0, 1.0, 0.0], [-math.sin(b), 0.0, math.cos(b)]]
    rx = [[1.0, 0.0, 0.0], [0.0, math.cos(c), -math.sin(c)], [0.0, math.sin(c), math.cos(c)]]
    return matmul(matmul(rz, ry), rx)


# 3x3 algebra in plain Python floats: no BLAS kernels or fused multiply-adds, so organ parameters
# are bit-identical on every CPU.
def matmul(a: np.ndarray | list, b: np.ndarray | list) -> np.ndarray:
    return np.array([[sum(float(a[i][k]) * float(b[k][j]) for k in range(3)) for j in range(3)] for i in range(3)])


def matvec(a: np.ndarray, v: np.ndarray | tuple) -> np.ndarray:
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
        sd = np.full(tuple(s.stop - s.start for s in union), FAR, dtype=F32)
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
