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
