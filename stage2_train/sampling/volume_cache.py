"""The preprocessed volumes of a store's cases, read once into memory, and the crops cut from them.

80x160x160 float16 is 4 MB a case, a few hundred MB for AMOS. A store made with ``--no-volumes`` has its
volumes rebuilt from the dataset folder's source files (sha256 checked against the store's record).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dinomix_cache.data.source_volumes import load_source_case, recorded_case_source
from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from stage2_train.sampling.crops import Crop, Shape3

__all__ = ["VolumeCache"]


class VolumeCache:
    """Preprocessed volumes of a store's complete cases, read once into memory (80x160x160 float16 = 4 MB a case).

    Images are kept as the store holds them (float16, (D, H, W), in [0, 1]); labels as uint8
    (D, H, W). Crops are copies: changing a returned tensor never changes the cache.

    Args:
        store: an open feature store that holds volumes.
        case_ids: the cases to load (duplicates are loaded once).
        with_labels: also load the label of every case that has one. Cases without a label
            (unlabeled ones) are fine; :meth:`crop_label` on them raises ValueError.
        data: the dataset folder, for a store made with ``--no-volumes``: each case is then
            preprocessed from its source files with the store's settings (sha256 checked against
            the store's record; about 1-2 s a case).

    Raises:
        UserError: a case is incomplete, the store holds no volumes (made with ``--no-volumes``)
            and no ``data`` is given, a source file is missing or differs from the recorded one, or
            a label's shape differs from its image's (a damaged store).

    Example::

        cache = VolumeCache(store, ["0001", "0002"], with_labels=True)
        crop = random_crop("0001", cache.shape("0001"), (64, 128, 128), rng)
        image = cache.crop_image(crop)   # (1, 64, 128, 128) float32
        label = cache.crop_label(crop)   # (64, 128, 128) int64
    """

    def __init__(self, store: FeatureStore, case_ids: Sequence[str], with_labels: bool,
                 data: Path | None = None) -> None:
        self._images: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        from_sources = not store.storage.volumes
        if from_sources and data is None:
            raise UserError(f"{store.path} holds no volumes (made with --no-volumes): pass --data DIR, the "
                            "dataset folder it was extracted from, to rebuild them")
        for case_id in dict.fromkeys(case_ids):
            if from_sources:
                image, label = self._from_sources(store, case_id, with_labels, data)  # type: ignore[arg-type]
            else:
                image = np.asarray(store.read_volume(case_id, "image"))
                has = with_labels and store.has_volume(case_id, "label")
                label = np.asarray(store.read_volume(case_id, "label")) if has else None
            if image.ndim != 3:
                raise UserError(f"{store.path}: image of case {case_id} has shape {image.shape}, expected (D, H, W)")
            self._images[case_id] = image
            if label is not None:
                if label.shape != image.shape:
                    raise UserError(
                        f"{store.path}: label of case {case_id} has shape {label.shape} but its image "
                        f"{image.shape}; the store is damaged: rebuild it with extract --overwrite"
                    )
                self._labels[case_id] = label

    @staticmethod
    def _from_sources(store: FeatureStore, case_id: str, with_labels: bool,
                      data: Path) -> tuple[np.ndarray, np.ndarray | None]:
        """The case preprocessed from its source files under ``data`` (hashes checked)."""
        if not store.is_complete(case_id):
            raise UserError(f"case {case_id} is not complete in {store.path}; rerun extract to finish it")
        source = store.case_source(case_id)
        case = recorded_case_source(case_id, store.roles().get(case_id, "unlabeled"), source, data)
        loaded = load_source_case(case, store.preprocess,
                                  len(store.class_names), expected=source, with_label=with_labels)
        return loaded.image, loaded.label

    @property
    def case_ids(self) -> list[str]:
        """The cached cases, in load order."""
        return list(self._images)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by images and labels."""
        return sum(a.nbytes for a in self._images.values()) + sum(a.nbytes for a in self._labels.values())

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._images

    def __len__(self) -> int:
        return len(self._images)

    def has_label(self, case_id: str) -> bool:
        """True if the case's label was loaded."""
        return case_id in self._labels

    def _image(self, case_id: str) -> np.ndarray:
        try:
            return self._images[case_id]
        except KeyError:
            raise ValueError(f"case {case_id!r} is not in this volume cache ({len(self._images)} cases)") from None

    def image(self, case_id: str) -> np.ndarray:
        """The whole preprocessed image, (D, H, W) as stored (float16), read-only."""
        view = self._image(case_id).view()
        view.flags.writeable = False
        return view

    def label(self, case_id: str) -> np.ndarray:
        """The whole label, (D, H, W) uint8, read-only.

        Raises:
            ValueError: the case has no label in this cache.
        """
        if case_id not in self._labels:
            raise ValueError(f"case {case_id!r} has no label in this volume cache")
        view = self._labels[case_id].view()
        view.flags.writeable = False
        return view

    def shape(self, case_id: str) -> Shape3:
        """(D, H, W) of the case's preprocessed volume."""
        return tuple(int(n) for n in self._image(case_id).shape)  # type: ignore[return-value]

    def _cut(self, array: np.ndarray, crop: Crop) -> np.ndarray:
        shape = tuple(array.shape)
        if any(o < 0 or o + s > v for o, s, v in zip(crop.offset, crop.size, shape, strict=True)):
            raise ValueError(
                f"crop at offset {crop.offset} of size {crop.size} lies outside case {crop.case_id}'s volume {shape}"
            )
        part = array[crop.slices]
        axes = crop.flipped_axes
        return np.flip(part, axis=axes) if axes else part

    def crop_image(self, crop: Crop) -> torch.Tensor:
        """The crop of the case's image, flips applied.

        Returns:
            (1, D, H, W) float32 tensor (a copy), values in [0, 1].

        Raises:
            ValueError: the case is not cached or the crop lies outside the volume.
        """
        part = self._cut(self._image(crop.case_id), crop)
        return torch.from_numpy(np.array(part, dtype=np.float32, copy=True)).unsqueeze(0)

    def crop_label(self, crop: Crop) -> torch.Tensor:
        """The crop of the case's label, flips applied.

        Returns:
            (D, H, W) int64 tensor (a copy).

        Raises:
            ValueError: the case is not cached, has no label (unlabeled, or the cache was built with
                ``with_labels=False``), or the crop lies outside the volume.
        """
        self._image(crop.case_id)
        label = self._labels.get(crop.case_id)
        if label is None:
            raise ValueError(
                f"case {crop.case_id!r} has no label in this volume cache "
                "(an unlabeled case, or the cache was built with with_labels=False)"
            )
        return torch.from_numpy(np.array(self._cut(label, crop), dtype=np.int64, copy=True))
