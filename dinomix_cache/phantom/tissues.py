"""Tissues of the synthetic abdominal CT phantom: their ids, HU ranges, Synapse labels, and where
organs and unlabelled viscera may paint over them.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


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


def lut(values: dict[int, object], dtype: type, default: object = 0) -> np.ndarray:
    """A lookup table over tissue ids (length :data:`N_TISSUES`): ``values`` at their ids, ``default`` elsewhere."""
    out = np.full(N_TISSUES, default, dtype=dtype)
    for key, value in values.items():
        out[int(key)] = value
    return out


TISSUE_TO_LABEL = lut({t: spec[3] for t, spec in TISSUE_TABLE.items()}, np.uint8)
_ORGAN_TISSUES = [t for t in Tissue if t >= Tissue.SPLEEN]
_SOFT = [Tissue.FAT, Tissue.LUNG, Tissue.HEART, Tissue.PSOAS, Tissue.BOWEL_WALL, Tissue.BOWEL_FLUID,
         Tissue.GAS, Tissue.FECES, Tissue.ARTERY, Tissue.VEIN]
# Where organs may paint (never over bone, the body wall, paraspinal muscle or outside the body).
ORGAN_PAINTABLE = lut({t: True for t in [*_SOFT, *_ORGAN_TISSUES]}, np.bool_, False)
# Where unlabelled viscera (bowel, small vessels) may paint.
VISCERA_PAINTABLE = lut({Tissue.FAT: True, Tissue.BOWEL_WALL: True, Tissue.BOWEL_FLUID: True,
                          Tissue.GAS: True, Tissue.FECES: True}, np.bool_, False)
# Where muscle sheets (psoas, diaphragm) and the thorax may paint: over cavity fat only.
FAT_ONLY = lut({Tissue.FAT: True}, np.bool_, False)
