"""A complete, valid ``dinomix`` attribute for stores written by hand in tests (no extraction)."""

from __future__ import annotations

from typing import Any

from dinomix_cache.settings_codec import settings_to_json
from dinomix_cache.store.feature_store import StoreSettings

SHA = "0" * 64


def toy_meta(storage: StoreSettings | None = None, cases=(("0001", "labeled"), ("0002", "unlabeled")),
             hidden: int = 8, shape=(12, 32, 32), image_dtype: str = "float32") -> dict[str, Any]:
    """Store attributes of a toy dataset: 3 classes, a 2 x 2 token grid (patch 16 on 32 x 32 slices)."""
    return {
        "teacher": {"source": "random:tiny", "label": "random, not pretrained", "family": "dinov3",
                    "model_type": "dinov3_vit", "model_class": "DINOv3ViTModel", "revision": None,
                    "weights_sha256": SHA, "config_sha256": SHA, "hidden_size": hidden, "patch_size": 16,
                    "num_prefix_tokens": 5, "input_size": list(shape[1:]), "mean": [0.5, 0.5, 0.5],
                    "std": [0.25, 0.25, 0.25], "dtype": "float32", "layer": "last_hidden_state"},
        "preprocessing": {"target_shape": list(shape), "hu_window": [-75.0, 275.0], "normalisation": "minmax",
                          "orientation": "SPL", "image_interpolation": "trilinear", "label_interpolation": "nearest",
                          "image_dtype": image_dtype, "align_corners": False, "order": "reorient, clip, normalise, "
                          "resize", "resize": "monai.transforms.Resize (torch interpolate)"},
        "dataset": {"name": "toy", "class_names": ["background", "a", "b"], "split": {"source": "seeded"},
                    "cases": [{"id": c, "role": r} for c, r in cases]},
        "producer": {k: "test" for k in ("package", "version", "python", "torch", "transformers", "zarr",
                                          "numcodecs", "created")},
        "storage": settings_to_json(storage or StoreSettings(chunk_slices=4)),
        "extraction": {"complete": False},
    }
