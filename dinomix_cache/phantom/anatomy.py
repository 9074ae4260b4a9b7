"""Anatomy of the synthetic abdominal CT phantom: the body outline and the organs of one case.

Everything here works in the *patient frame*: millimetres, RAS+ (x towards the patient's right,
y anterior, z superior), x = y = 0 on the body axis, z = 0 at the centre of the L1 vertebra.

Organs are unions of ellipsoids and tapered capsules (:mod:`dinomix_cache.phantom.shapes`) laid out
for a nominal body and mapped onto each case's body, with a random scale, shift and rotation per organ.
The tissue map is drawn by :mod:`dinomix_cache.phantom.render`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dinomix_cache.phantom.shapes import F32, FAR, Ellipsoid, Primitive, Segment, matmul, matvec, rotation, tube
from dinomix_cache.phantom.tissues import FAT_ONLY, Tissue, lut


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
        q = a + s * matvec(rot, np.asarray(lay.p(*p)) - a) + t
        return (float(q[0]), float(q[1]), float(q[2]))

    rs = s * radius_factor
    out: list[Primitive] = []
    for p in prims:
        if isinstance(p, Ellipsoid):
            out.append(Ellipsoid(tp(p.center), tuple(float(r * rs) for r in p.radii), matmul(rot, p.axes)))
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
    stomach_gas = top_y - float(rng.uniform(3.0, 30.0)) if rng.uniform() < 0.6 else FAR
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
        Organ(Tissue.HEPATIC_VEIN, hepatic_veins, where=lut({Tissue.LIVER: True}, np.bool_, False)),
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


def sample_viscera(rng: np.random.Generator, lay: Layout) -> list[Organ]:
    """Unlabelled structures (label 0): psoas, bowel, colon, duodenum and the smaller vessels."""
    out: list[Organ] = []
    for side in (1.0, -1.0):
        psoas = tube([(30.0 * side, -32.0, 10.0), (40.0 * side, -24.0, -60.0), (50.0 * side, -14.0, -170.0)],
                     [5.0, 15.0, 22.0])
        out.append(Organ(Tissue.PSOAS, _place(rng, lay, psoas, (40.0 * side, -24.0, -60.0), 0.06, 3.0, 2.0),
                         where=FAT_ONLY))
    for _ in range(int(rng.integers(9, 14))):  # small-bowel loops in the lower anterior abdomen
        p = rng.uniform((-75.0, 5.0, -170.0), (70.0, 75.0, -45.0))
        pts = [tuple(p)]
        for _ in range(2):
            step = rng.normal(size=3)
            p = np.clip(p + rng.uniform(30.0, 60.0) * step / math.sqrt(sum(float(v) ** 2 for v in step)),
                        (-80.0, 0.0, -175.0), (75.0, 80.0, -40.0))
            pts.append(tuple(p))
        r = float(rng.uniform(9.0, 13.0))
        gas = -FAR if rng.uniform() < 0.2 else FAR
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
                     gas=(float(rng.uniform(10.0, 60.0)) if rng.uniform() < 0.5 else FAR, Tissue.GAS)))
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
