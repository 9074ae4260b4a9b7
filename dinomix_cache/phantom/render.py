"""The tissue renderer of the synthetic abdominal CT phantom: one case's uint8 tissue map.

The map covers the patient frame (mm, RAS+, z = 0 at the centre of L1); its voxel ``[i, j, k]`` sits at
``(xs[i], ys[j], zs[k])``. The scanner affine (orientation, origin) is added by
:mod:`dinomix_cache.phantom.generate`. Drawing order: body wall layers and table, spine and ribs, lung
bases and heart, unlabelled viscera, the labelled organs (later ones win overlaps), the diaphragm; then
every labelled organ is given at least :data:`MIN_VOXELS` voxels.
"""

from __future__ import annotations

import numpy as np

from dinomix_cache.phantom.anatomy import Body, Layout, Organ, sample_organs, sample_viscera
from dinomix_cache.phantom.shapes import F32, FAR, Box, Canvas, Ellipsoid
from dinomix_cache.phantom.tissues import FAT_ONLY, ORGAN_PAINTABLE, TISSUE_TO_LABEL, VISCERA_PAINTABLE, Tissue

MIN_VOXELS = 4  # every labelled organ keeps at least this many voxels, whatever the resolution


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
    cv.paint(box, above & heart, Tissue.HEART, FAT_ONLY)
    cv.paint(box, above, Tissue.LUNG, FAT_ONLY)


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
    cv.paint(box, sheet, Tissue.MUSCLE, FAT_ONLY)


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
        if organ.gas is not None and organ.gas[0] < FAR:
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
