"""Organ colours of the evaluation figures, fixed per class *name*.

Synapse and AMOS share names but not indices, and a liver should look the same in every figure:
:func:`organ_colour` gives a conventional, saturated colour for the organs of both datasets (liver
reddish brown, aorta red, IVC blue, ...) and a fallback palette by index for any other name. All named
colours are pairwise far apart in RGB and far from grey, so they stay distinct as half-transparent
overlays on a CT slice. Colours are RGB floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinomix_cache.data.classes import AMOS_ABBREVIATIONS, AMOS_CLASSES, SYNAPSE_ABBREVIATIONS, SYNAPSE_CLASSES

__all__ = ["ORGAN_COLOURS", "RGB", "colour_table", "organ_colour"]

RGB = tuple[float, float, float]


def _rgb(r: int, g: int, b: int) -> RGB:
    return (r / 255.0, g / 255.0, b / 255.0)


# Conventional hues where anatomy atlases agree (liver brown, arteries red, veins blue, gallbladder green);
# the rest chosen so that no two organs of Synapse or AMOS are closer than ~0.25 in RGB [0, 1].
ORGAN_COLOURS: dict[str, RGB] = {
    "spleen": _rgb(150, 60, 205),
    "right_kidney": _rgb(255, 127, 14),
    "left_kidney": _rgb(255, 222, 30),
    "gallbladder": _rgb(30, 170, 60),
    "esophagus": _rgb(255, 120, 190),
    "liver": _rgb(175, 80, 45),
    "stomach": _rgb(250, 170, 120),
    "aorta": _rgb(225, 20, 30),
    "inferior_vena_cava": _rgb(35, 90, 255),
    "portal_splenic_veins": _rgb(0, 215, 235),
    "pancreas": _rgb(160, 225, 80),
    "right_adrenal_gland": _rgb(0, 160, 150),
    "left_adrenal_gland": _rgb(235, 0, 235),
    "duodenum": _rgb(125, 155, 255),
    "bladder": _rgb(255, 255, 150),
    "prostate_uterus": _rgb(125, 30, 90),
}

# For names outside the table (other datasets): saturated, pairwise >= 0.25 apart in RGB, none grey.
_FALLBACK: tuple[RGB, ...] = tuple(
    _rgb(*c)
    for c in [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (160, 82, 45),
        (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 187, 120), (152, 223, 138), (0, 255, 127),
        (128, 0, 0), (255, 0, 255), (250, 0, 135), (0, 170, 120), (255, 230, 0), (120, 40, 160),
    ]
)


def _alias_table() -> dict[str, str]:
    aliases = {"ivc": "inferior_vena_cava", "portal_vein_and_splenic_vein": "portal_splenic_veins",
               "oesophagus": "esophagus", "prostate/uterus": "prostate_uterus"}
    # The paper's abbreviations resolve too, so a bar chart given only "Sp RK ..." still gets organ colours.
    for names, abbrs in ((SYNAPSE_CLASSES, SYNAPSE_ABBREVIATIONS), (AMOS_CLASSES, AMOS_ABBREVIATIONS)):
        for name, abbr in zip(names[1:], abbrs[1:], strict=True):
            aliases[abbr.lower()] = name
    for name in ORGAN_COLOURS:
        parts = name.split("_")
        if parts[0] in ("right", "left"):  # "kidney_left" / "adrenal_gland_right" (TotalSegmentator style)
            aliases["_".join([*parts[1:], parts[0]])] = name
    return aliases


_ALIASES = _alias_table()


def _canonical(name: str) -> str:
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return _ALIASES.get(key, key)


def organ_colour(name: str, index: int) -> RGB:
    """RGB colour (floats in [0, 1]) of an organ class.

    Args:
        name: class name (``"liver"``, ``"right kidney"``, ``"kidney_right"``) or a paper abbreviation
            (``"Li"``); case, spaces and hyphens are ignored.
        index: the class index (1-based for foreground); only used to pick a fallback colour for names
            that are not in :data:`ORGAN_COLOURS`.
    """
    known = ORGAN_COLOURS.get(_canonical(name))
    if known is not None:
        return known
    return _FALLBACK[(index - 1) % len(_FALLBACK)]


def colour_table(class_names: Sequence[str]) -> np.ndarray:
    """(C, 3) float array of RGB colours indexed by label value; row 0 (background) is black and unused."""
    table = np.zeros((len(class_names), 3))
    for i, name in enumerate(class_names[1:], start=1):
        table[i] = organ_colour(name, i)
    return table
