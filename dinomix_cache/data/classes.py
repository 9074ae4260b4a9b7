"""Class lists of the supported datasets, index = label value (0 is background)."""

SYNAPSE_CLASSES: tuple[str, ...] = (
    "background",
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_splenic_veins",
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
)

# Abbreviations used by the paper's tables (Sp RK LK Ga Es Li St Ao IVC PSV Pa RAG LAG).
SYNAPSE_ABBREVIATIONS: tuple[str, ...] = (
    "BG", "Sp", "RK", "LK", "Ga", "Es", "Li", "St", "Ao", "IVC", "PSV", "Pa", "RAG", "LAG",
)

AMOS_CLASSES: tuple[str, ...] = (
    "background",
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
    "duodenum",
    "bladder",
    "prostate_uterus",
)

AMOS_ABBREVIATIONS: tuple[str, ...] = (
    "BG", "Sp", "RK", "LK", "Ga", "Es", "Li", "St", "Ao", "IVC", "Pa", "RAG", "LAG", "Du", "Bl", "P/U",
)

# The 30 labelled Synapse cases (the phantom uses the same ids so the shipped splits apply).
SYNAPSE_CASE_IDS: tuple[str, ...] = tuple(f"{i:04d}" for i in [*range(1, 11), *range(21, 41)])


def class_abbreviations(class_names: list[str] | tuple[str, ...]) -> list[str]:
    """Table labels of the foreground classes: the paper's for Synapse and AMOS, else initials.

    ``["background", "spleen", "left_kidney"]`` (not a known list) gives ``["S", "LK"]``; repeated
    initials get the next letters of the last word (``"Sp"``, ``"St"``) until they are unique.
    """
    names = tuple(class_names)
    for known, abbreviations in ((SYNAPSE_CLASSES, SYNAPSE_ABBREVIATIONS), (AMOS_CLASSES, AMOS_ABBREVIATIONS)):
        if names == known:
            return list(abbreviations[1:])
    out: list[str] = []
    for name in names[1:]:
        words = [w for w in name.replace("-", "_").split("_") if w] or ["?"]
        base = "".join(w[0].upper() for w in words)
        label, extra = base, 1
        while label in out and extra < len(words[-1]):
            label = base + words[-1][1:extra + 1]
            extra += 1
        out.append(label if label not in out else f"{base}{len(out)}")
    return out
