"""A store's cases: writing one case's arrays, reading complete cases, the nodes readers need,
the class statistics and finishing an extraction.

A case exists for readers only once ``features/<case>`` carries the attribute
``dinomix_case.complete = true``, written last, after every array of the case (see
:mod:`dinomix_cache.store.feature_store`). Each array's shape and dtype are checked against the
attributes when a case is first read, and every read refuses damaged or missing chunks
(:mod:`dinomix_cache.store.checks`). :class:`CaseArrays` is that part of
:class:`~dinomix_cache.store.feature_store.FeatureStore`.
"""

from __future__ import annotations

import contextlib
import errno
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dinomix_cache.errors import UserError, writing
from dinomix_cache.store.attributes import StoreAttributes
from dinomix_cache.store.checks import check_array, checked_read, fill_value
from dinomix_cache.store.schema import StoreAttrs
from dinomix_cache.store.storage import FEATURE_DIMS, VOLUME_DIMS, WINDOW_DIMS, array_codecs

__all__ = ["CASE_KEY", "CaseArrays"]

CASE_KEY = "dinomix_case"


class CaseArrays(StoreAttributes):
    """Case arrays of an open store (see :class:`~dinomix_cache.store.feature_store.FeatureStore`)."""

    def __init__(self, group: zarr.Group, path: Path | str, meta: dict[str, Any], kind: str = "folder",
                 storage_options: dict[str, Any] | None = None, attrs: StoreAttrs | None = None) -> None:
        super().__init__(group, path, meta, kind, storage_options, attrs)
        self._complete: set[str] = set()
        # Opening a node re-reads its metadata (about 2 ms locally, a round trip remotely); complete
        # cases never change, so the training hot path keeps their handles, and the sub-groups'.
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._zero_fill_checked: set[tuple[str, str]] = set()
        self._groups: dict[str, zarr.Group] = {}

    # ----------------------------------------------------------------------------- cases
    def _subgroup(self, name: str) -> zarr.Group:
        """``features``, ``volumes`` or ``stats``, opened once (their members are looked up by name,
        never listed, so a held handle sees cases written later)."""
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = self.group[name]  # type: ignore[assignment]
        return group  # type: ignore[return-value]

    def _feature_array(self, case_id: str) -> zarr.Array | None:
        try:
            node = self._subgroup("features")[case_id]
        except (KeyError, FileNotFoundError, ValueError):
            return None
        except Exception:  # a torn metadata file of an unfinished case reads as "not there"
            return None
        return node if isinstance(node, zarr.Array) else None

    def case_attrs(self, case_id: str) -> dict[str, Any] | None:
        """The ``dinomix_case`` attribute of a case, or None if the case has none yet."""
        array = self._feature_array(case_id)
        if array is None:
            return None
        attrs = array.attrs.get(CASE_KEY)
        return attrs if isinstance(attrs, dict) else None

    def case_source(self, case_id: str) -> dict[str, Any]:
        """What a case records of its source files: paths relative to the dataset folder, their
        sha256, the image's affine (see ``stage1_extract.pipeline.case_meta``); ``{}`` when it records none."""
        source = (self.case_attrs(case_id) or {}).get("source")
        return source if isinstance(source, dict) else {}

    def is_complete(self, case_id: str) -> bool:
        if case_id in self._complete:
            return True
        array = self._feature_array(case_id)
        attrs = array.attrs.get(CASE_KEY) if array is not None else None
        if isinstance(attrs, dict) and attrs.get("complete") is True:
            # A complete case never becomes incomplete in an open store (rebuilding makes a new
            # store), so reads in training loops do not re-read its metadata every time.
            check_array(self.location, case_id, "features", array, self._attrs)
            self._complete.add(case_id)
            self._arrays[(case_id, "features")] = array  # type: ignore[assignment]
            return True
        return False

    def complete_cases(self) -> list[str]:
        """Ids of the dataset's cases that are complete, in dataset order."""
        return [cid for cid in self.roles() if self.is_complete(cid)]

    def incomplete_cases(self) -> list[str]:
        """Ids of the dataset's cases not (yet) complete, in dataset order."""
        return [cid for cid in self.roles() if not self.is_complete(cid)]

    def _require_complete(self, case_id: str) -> None:
        if not self.is_complete(case_id):
            raise UserError(f"case {case_id} is not complete in {self.location}; rerun extract to finish it")

    def write_case(
        self,
        case_id: str,
        features: np.ndarray,
        image: np.ndarray | None,
        label: np.ndarray | None,
        case_meta: dict[str, Any],
        windows: np.ndarray | None = None,
    ) -> None:
        """Write one case's arrays, then mark it complete (last).

        Args:
            case_id: the case id (no ``/``).
            features: (D, h, w, C) teacher features; stored as float16.
            windows: (D, ny, nx, h', w', C) crop-window tokens (a store with ``crop_windows``; required
                there, refused elsewhere); stored as float16.
            image: (D, H, W) float16 or float32 preprocessed image (stored as given), or None.
            label: (D, H, W) uint8 label, or None.
            case_meta: JSON-able provenance of the case (source hashes, geometry, class voxels).

        Raises:
            UserError: the write failed (e.g. disk full). The case stays incomplete and a rerun
                of extract resumes it.
            ValueError: an array's shape disagrees with the store's attributes (a caller's bug).
        """
        settings = self.storage
        for name, data in (("features", features), ("image", image), ("label", label)):
            want = self._attrs.array_spec(name).shape
            if data is not None and tuple(data.shape) != want:
                raise ValueError(f"case {case_id}: {name} shape {tuple(data.shape)}, the store's attributes say {want}")
        depth = features.shape[0]
        chunk = min(settings.chunk_slices, depth)
        if (windows is None) != (self.crop_windows is None):
            raise ValueError(f"case {case_id}: crop-window tokens are written exactly when the store has crop windows")
        try:
            arrays: list[tuple[zarr.Group, str, np.ndarray, tuple[str, ...], bool]] = []
            if settings.volumes and image is not None:
                vgroup = self._subgroup("volumes").require_group(case_id)
                arrays.append((vgroup, "image", image, VOLUME_DIMS, False))
                if label is not None:
                    arrays.append((vgroup, "label", label.astype(np.uint8, copy=False), VOLUME_DIMS, False))
            if windows is not None:
                arrays.append((self._subgroup("windows"), case_id, windows.astype(np.float16, copy=False),
                               WINDOW_DIMS, True))
            feats = features.astype(np.float16, copy=False)
            arrays.append((self._subgroup("features"), case_id, feats, FEATURE_DIMS, True))
            for parent, name, data, dims, is_features in arrays:
                target = parent.create_array(
                    name,
                    shape=data.shape,
                    chunks=(chunk, *data.shape[1:]),
                    dtype=data.dtype,
                    dimension_names=list(dims),
                    overwrite=True,
                    # Every chunk is written, even an all-background label chunk (zarr skips those by
                    # default): a missing chunk then always means damage, which `verify` reports.
                    config={"write_empty_chunks": True},
                    # A value no write produces: a read that meets it has found a missing chunk.
                    fill_value=fill_value(data.dtype),
                    **array_codecs(settings, features=is_features),
                )
                target[...] = data
            array = self._subgroup("features")[case_id]
            array.attrs[CASE_KEY] = {**case_meta, "shape": list(feats.shape), "complete": True}
        except OSError as exc:
            reason = "no space left on device" if exc.errno == errno.ENOSPC else str(exc)
            raise UserError(
                f"writing case {case_id} into {self.location} failed ({reason}); the case stays incomplete. "
                "Fix the cause (free disk space) and rerun the same extract command to resume"
            ) from exc

    def read_features(self, case_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Features of slices ``start:stop`` of a complete case, (stop-start, h, w, C) float16.

        Raises:
            UserError: the case is incomplete, or a chunk read is damaged or missing (naming the
                case and ``dinomix-cache verify``).
        """
        array = self._complete_array(case_id, "features")
        self._check_zero_fill(case_id, "features", array)
        return checked_read(self.location, case_id, "features", array, slice(start, stop), self._attrs.num_classes)

    def _check_zero_fill(self, case_id: str, name: str, array: zarr.Array) -> None:
        """Stores written before fill values that cannot be data read a deleted chunk as zeros: in a
        local folder, count the chunks of such an array once, the first time it is read.

        Raises:
            UserError: chunks are missing (naming the case and ``dinomix-cache verify``).
        """
        key = (case_id, name)
        if self.kind != "folder" or key in self._zero_fill_checked:
            return
        fill = np.asarray(array.fill_value)
        if fill.dtype.kind == "f" and not np.isnan(fill).any() and array.nchunks_initialized < array.nchunks:
            raise UserError(f"{self.location}: case {case_id} {name} lacks "
                            f"{array.nchunks - array.nchunks_initialized} of {array.nchunks} chunks (deleted or never "
                            f"written; this store reads them as zeros); run `dinomix-cache verify {self.location}` to "
                            "list the damage, then re-extract the store")
        self._zero_fill_checked.add(key)

    def feature_shape(self, case_id: str) -> tuple[int, ...]:
        return tuple(self._complete_array(case_id, "features").shape)

    def windows_shape(self, case_id: str) -> tuple[int, ...]:
        """(D, ny, nx, h', w', C) of a complete case's crop-window tokens (see :meth:`read_windows`)."""
        if self.crop_windows is None:
            raise UserError(f"{self.location} holds no crop windows; extract it with --crop-windows HxW")
        return tuple(self._complete_array(case_id, "windows").shape)

    def read_windows(self, case_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Crop-window tokens of slices ``start:stop`` of a complete case, (stop-start, ny, nx, h', w', C)
        float16: window ``(i, j)`` starts at slice pixel ``(i, j) · token size``.

        Raises:
            UserError: the case is incomplete, or the store holds no crop windows.
        """
        if self.crop_windows is None:
            raise UserError(f"{self.location} holds no crop windows; extract it with --crop-windows HxW")
        return checked_read(self.location, case_id, "windows", self._complete_array(case_id, "windows"),
                            slice(start, stop), self._attrs.num_classes)

    def _complete_array(self, case_id: str, name: str) -> zarr.Array:
        """The features (``name="features"``) or a volume array of a complete case, opened once."""
        array = self._arrays.get((case_id, name))
        if array is None:
            self._require_complete(case_id)  # also keeps the features' handle
            array = self._arrays.get((case_id, name))
            if array is None and name != "features":
                array = self._windows_array(case_id) if name == "windows" else self._volume_array(case_id, name)
                if array is not None:
                    check_array(self.location, case_id, name, array, self._attrs)
            if array is None:
                raise KeyError(f"{self.location}: case {case_id} has no {name} array")
        return array

    def _volume_array(self, case_id: str, name: str) -> zarr.Array | None:
        """A case's ``image`` or ``label`` array, or None; kept open once the case is known complete."""
        array = self._arrays.get((case_id, name))
        if array is not None:
            return array
        try:
            node = self._subgroup("volumes")[case_id][name]  # type: ignore[index]
        except (KeyError, FileNotFoundError):
            return None
        if not isinstance(node, zarr.Array):
            return None
        if case_id in self._complete:
            self._arrays[(case_id, name)] = node
        return node

    def _windows_array(self, case_id: str) -> zarr.Array | None:
        """A case's crop-window tokens, or None; kept open once the case is known complete."""
        try:
            node = self._subgroup("windows")[case_id]
        except (KeyError, FileNotFoundError):
            return None
        if not isinstance(node, zarr.Array):
            return None
        if case_id in self._complete:
            self._arrays[(case_id, "windows")] = node
        return node

    def has_volume(self, case_id: str, name: str = "image") -> bool:
        return self._volume_array(case_id, name) is not None

    def read_volume(self, case_id: str, name: str = "image", start: int = 0, stop: int | None = None) -> np.ndarray:
        """Slices ``start:stop`` of a case's preprocessed ``image`` (float16) or ``label`` (uint8).

        Raises:
            UserError: the case is incomplete, the store holds no volumes (made with
                ``--no-volumes``: pass ``--data`` to read the sources instead), or a chunk read is
                damaged or missing.
        """
        self._require_complete(case_id)
        if not self.has_volume(case_id, name):
            raise UserError(f"{self.location} holds no {name} volume for case {case_id} (made with --no-volumes?)")
        return checked_read(self.location, case_id, name, self._complete_array(case_id, name), slice(start, stop),
                            self._attrs.num_classes)

    def nodes(self) -> list[tuple[str, zarr.Group | zarr.Array]]:
        """Every group and array a reader needs, as (path relative to the store root, node): the root,
        ``features``/``volumes``/``stats``, each complete case's arrays, the statistics.

        Found from the attributes and the format's layout, never by listing the store (HTTP servers
        cannot list), so incomplete cases and anything foreign in the folder are left out.
        """
        windows = self.crop_windows is not None
        out: list[tuple[str, zarr.Group | zarr.Array]] = [("", self.group)]
        out += [(name, self._subgroup(name)) for name in ("features", "volumes", "stats") + (("windows",) * windows)]
        for cid in self.complete_cases():
            out.append((f"features/{cid}", self._complete_array(cid, "features")))
            if windows:
                out.append((f"windows/{cid}", self._complete_array(cid, "windows")))
            volumes = [(name, self._volume_array(cid, name)) for name in ("image", "label")]
            held = [(name, array) for name, array in volumes if array is not None]
            if held:
                out.append((f"volumes/{cid}", self._subgroup("volumes")[cid]))  # type: ignore[arg-type]
                out += [(f"volumes/{cid}/{name}", array) for name, array in held]  # type: ignore[misc]
        with contextlib.suppress(KeyError, FileNotFoundError):
            out.append(("stats/class_voxels", self._subgroup("stats")["class_voxels"]))  # type: ignore[arg-type]
        return out

    # ----------------------------------------------------------------------------- statistics
    def write_class_voxels(self, counts: np.ndarray) -> None:
        """Store voxel counts per class over the labeled cases, (num_classes,) int64."""
        counts = np.asarray(counts, dtype=np.int64)
        with writing(self.location):
            arr = self._subgroup("stats").create_array(
                "class_voxels", shape=counts.shape, dtype="int64", dimension_names=["class"], overwrite=True
            )
            arr[...] = counts

    def class_voxels(self) -> np.ndarray | None:
        """(num_classes,) int64 voxel counts per class over labeled cases, or None if not written.

        Raises:
            UserError: the array is unreadable, or not one non-negative count per class.
        """
        try:
            array = self._subgroup("stats")["class_voxels"]
        except (KeyError, FileNotFoundError):
            return None
        counts = np.asarray(checked_read(self.location, "statistics", "class_voxels", array, Ellipsis,
                                         self._attrs.num_classes))
        if counts.shape != (self._attrs.num_classes,) or counts.dtype.kind not in "iu" or (counts < 0).any():
            raise UserError(f"{self.location}: stats/class_voxels holds {counts.shape} {counts.dtype}, not one count "
                            f"per class ({self._attrs.num_classes}); run `dinomix-cache verify {self.location}`")
        return counts

    def finalize(self) -> bool:
        """Record each complete case's source hashes in ``dataset.cases`` and whether every case is
        complete; once all are, also the statistics (voxels per class over the labeled cases, from
        the cases' own counts), the finishing time, and the consolidated metadata (a later writer
        opening the store drops that copy again).

        Returns:
            True if every case of the dataset is complete (the store is then marked complete).

        Raises:
            UserError: a write fails (naming the store).
        """
        cases = []
        totals = np.zeros(self._attrs.num_classes, dtype=np.int64)
        all_complete = True
        for entry in self._attrs.dataset.cases:
            attrs = self.case_attrs(entry.id)
            if not (attrs and attrs.get("complete")):
                all_complete = False
                cases.append({"id": entry.id, "role": entry.role})
                continue
            src = attrs.get("source", {})
            cases.append({"id": entry.id, "role": entry.role, "image_sha256": src.get("image_sha256"),
                          "label_sha256": src.get("label_sha256")})
            if entry.role == "labeled" and "class_voxels" in attrs:
                totals += np.asarray(attrs["class_voxels"], dtype=np.int64)
        # Spread over the sections as stored: their key order is part of the store's identity.
        dataset = {**self._meta["dataset"], "cases": cases}
        extraction = {**self._meta["extraction"], "complete": all_complete}
        if all_complete:
            self.write_class_voxels(totals)
            extraction["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.update_meta(dataset=dataset, extraction=extraction)
        if all_complete:
            self.consolidate()  # one request opens the finished store and all its cases (over HTTP too)
        return all_complete
