"""dinomix-cache: DINO-Mix 3D CT segmentation with a shareable teacher-feature store.

The package holds what both stages share: datasets and preprocessing, the feature-store format,
settings and the command line. ``stage1_extract`` and ``stage2_train`` import from here; this
package never imports them, except :mod:`dinomix_cache.cli`, whose verbs call them.
"""

__version__ = "0.1.0"
