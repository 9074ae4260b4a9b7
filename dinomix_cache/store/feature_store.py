"""The feature store, format v1: one Zarr v3 group holding teacher features, volumes and provenance.

Layout (see the README's "Store format")::

    STORE/                      group; attribute "dinomix" = provenance (validated on open)
      features/<case>           float16 (D, h, w, C): slice, token row, token column, channel
      volumes/<case>/image      float16 (D, H, W), preprocessed intensities in [0, 1]
      volumes/<case>/label      uint8   (D, H, W) (labelled cases only)
      stats/class_voxels        int64   (num_classes,), voxels per class over the labeled cases
      windows/<case>            float16 (D, ny, nx, h', w', C), only in a store with crop windows:
                                the teacher's tokens of each token-aligned window the training crop
                                can take (the ``crop`` teacher view; attribute ``crop_windows``)

A case exists for readers only once ``features/<case>`` carries the attribute
``dinomix_case.complete = true``, written last, after every array of the case. Zarr's local store
writes each file atomically, so a killed writer leaves either an incomplete case (redone on
resume) or a complete one, never a torn one. A store holds arrays and JSON attributes only, and
attributes are validated as a whole against the schema of the declared format version before use
(:mod:`dinomix_cache.store.schema`): opening a store from someone else never runs code. Each
array's shape and dtype are checked against the attributes when a case is first read, and every
read refuses damaged or missing chunks (:mod:`dinomix_cache.store.checks`).

Where a store lives (:func:`as_location`): a local ``.zarr`` folder (read and write), a ``.zip``
of one (read-only, see :mod:`dinomix_cache.store.pack`), or an fsspec URL (``http(s)://``, ``s3://``,
``gs://``, ...; read-only over HTTP, writable where the filesystem is). Readers never list a
folder: group members are known from the attributes (HTTP servers cannot list reliably).

The class is assembled from one module per concern: the attribute
(:mod:`~dinomix_cache.store.attributes`), the case arrays (:mod:`~dinomix_cache.store.case_arrays`),
storage settings and codecs (:mod:`~dinomix_cache.store.storage`), deleting a store
(:mod:`~dinomix_cache.store.removal`); this module opens and creates stores, and re-exports what
the others define.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import TracebackType
from typing import Any

import zarr
from zarr.storage import ZipStore

from dinomix_cache.errors import UserError, writing
from dinomix_cache.store.attributes import ATTRS_KEY, attrs_mismatches, load_attrs, preprocess_settings, validate_attrs
from dinomix_cache.store.case_arrays import CASE_KEY, CaseArrays
from dinomix_cache.store.locations import (
    READ_ONLY_PROTOCOLS,
    as_location,
    fsspec_du,
    fsspec_store,
    is_zip,
    open_zarr_group,
    url_protocols,
    zip_root,
)
from dinomix_cache.store.lock import ReaderLock
from dinomix_cache.store.removal import is_store, remove_store
from dinomix_cache.store.schema import FORMAT_NAME, FORMAT_VERSION
from dinomix_cache.store.storage import FEATURE_DIMS, VOLUME_DIMS, WINDOW_DIMS, StoreSettings

__all__ = ["ATTRS_KEY", "CASE_KEY", "FEATURE_DIMS", "VOLUME_DIMS", "WINDOW_DIMS", "FeatureStore", "StoreSettings",
           "as_location", "attrs_mismatches", "is_store", "load_attrs", "preprocess_settings", "remove_store",
           "validate_attrs"]


class FeatureStore(CaseArrays):
    """Read and write a dinomix feature store (format v1).

    Create one with :meth:`create`, open an existing one with :meth:`open`. Read access never
    returns an incomplete case unless asked for one explicitly.

    Attributes:
        group: the root Zarr group.
        path: where the store lives: a :class:`Path` (folder or zip) or a URL ``str``.
        location: ``str(path)``, for messages and run folders.
        kind: ``"folder"``, ``"zip"`` or ``"url"``.

    Example::

        store = FeatureStore.open("storage/synapse.zarr")    # or "synapse.zip", "https://host/synapse.zarr"
        feats = store.read_features("0001", 16, 80)   # (64, h, w, C) float16
    """

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: Path | str, meta: dict[str, Any],
               storage_options: dict[str, Any] | None = None) -> FeatureStore:
        """Create a new, empty store at ``path`` (a local folder or a writable fsspec URL) with the
        given ``dinomix`` attribute.

        Raises:
            UserError: ``path`` exists and is not an empty directory, holds a Zarr store already, or
                cannot be written (a zip, an HTTP URL).
        """
        where = as_location(path)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta}
        if isinstance(where, str):
            if url_protocols(where) & READ_ONLY_PROTOCOLS:
                raise UserError(f"cannot create a store at {where}: HTTP and zip locations are read-only; "
                                "extract into a local .zarr folder (or an s3://, gs://, ... URL) instead")
            attrs = load_attrs({ATTRS_KEY: meta}, where)[1]
            zstore = fsspec_store(where, read_only=False, storage_options=storage_options)
            try:
                group = zarr.open_group(store=zstore, mode="w-", zarr_format=3)
            except Exception as exc:  # ContainsGroupError, permissions, transport
                raise UserError(f"cannot create a store at {where} ({type(exc).__name__}: {exc}); "
                                "choose another location or remove what is there") from None
        else:
            if is_zip(where):
                raise UserError(f"cannot create a store inside the zip {where}: extract into a .zarr folder, "
                                "then `dinomix-cache pack` it")
            if where.exists() and not (where.is_dir() and not any(where.iterdir())):
                raise UserError(f"{where} already exists; open it instead or remove it first")
            attrs = load_attrs({ATTRS_KEY: meta}, str(where))[1]
            with writing(where):
                where.parent.mkdir(parents=True, exist_ok=True)
                group = zarr.open_group(str(where), mode="w", zarr_format=3)
        with writing(where):
            group.attrs[ATTRS_KEY] = meta
            for name in ("features", "volumes", "stats") + (("windows",) if meta.get("crop_windows") else ()):
                group.require_group(name)
        return cls(group, where, meta, "url" if isinstance(where, str) else "folder", storage_options, attrs)

    @classmethod
    def open(cls, path: Path | str, mode: str = "r", storage_options: dict[str, Any] | None = None) -> FeatureStore:
        """Open an existing store, read-only by default (``mode="r+"`` to write cases).

        Args:
            path: a ``.zarr`` folder, a ``.zip`` of one (read-only), or an fsspec URL (``https://``,
                ``s3://``, ...; read-only over HTTP). See :func:`as_location`.
            mode: ``"r"`` or ``"r+"``.
            storage_options: passed to fsspec for a URL (credentials, ``anon=True``, ...).

        Raises:
            UserError: the location is missing or unreachable, not a Zarr v3 group, not a valid
                dinomix store, or read-only while ``mode="r+"``.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        where = as_location(path)
        if isinstance(where, str):
            if mode != "r" and url_protocols(where) & READ_ONLY_PROTOCOLS:
                raise UserError(f"{where} is read-only (HTTP servers and zips take no writes); write into a "
                                "local .zarr folder instead")
            zstore = fsspec_store(where, read_only=mode == "r", storage_options=storage_options)
            group = open_zarr_group(zstore, "", mode, where)
            return cls._validated(group, where, "url", storage_options)
        if is_zip(where):
            if mode != "r":
                raise UserError(f"{where} is a zip, which is read-only; write into the .zarr folder it was "
                                "packed from, then pack it again")
            if not where.exists():
                raise UserError(f"cannot open {where}: not found (no such zip file)")
            root = zip_root(where)
            zip_store = ZipStore(where, mode="r")
            try:
                return cls._validated(open_zarr_group(zip_store, root, "r", str(where)), where, "zip")
            except UserError:
                zip_store.close()
                raise
        if not where.exists():
            raise UserError(f"store {where} does not exist; create it with `dinomix-cache extract --out {where}`")
        if not (where / "zarr.json").is_file():
            raise UserError(f"{where} is not a feature store (no zarr.json); pass the .zarr folder made by extract")
        group = open_zarr_group(str(where), "", mode, str(where))
        if mode == "r+" and "consolidated_metadata" in json.loads((where / "zarr.json").read_text()):
            # A writer adds cases the consolidated copy does not know: drop it (`consolidate` rewrites it).
            group.update_attributes({})
        return cls._validated(group, where, "folder")

    @classmethod
    def _validated(cls, group: zarr.Group, where: Path | str, kind: str,
                   storage_options: dict[str, Any] | None = None) -> FeatureStore:
        meta, attrs = load_attrs(group.attrs, str(where))
        return cls(group, where, meta, kind, storage_options, attrs)

    @property
    def writable(self) -> bool:
        return not self.group.store.read_only

    def close(self) -> None:
        """Release the store (a zip's open file, the reader lock); the object must not be used afterwards."""
        if self._reader_lock is not None:
            self._reader_lock.release()
            self._reader_lock = None
        if self.kind == "zip":
            self.group.store.close()

    def hold_reader_lock(self) -> FeatureStore:
        """Hold a shared lock on the store folder until :meth:`close` (or the process ends), so that
        ``extract --overwrite`` refuses to delete it meanwhile. Returns the store.

        Raises:
            UserError: the store is being deleted by ``extract --overwrite`` right now.
        """
        if self._reader_lock is None and self.kind == "folder":
            self._reader_lock = ReaderLock(Path(self.path)).__enter__()
        return self

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ----------------------------------------------------------------------------- sizes
    def bytes_on_disk(self, sub: str = "") -> int | None:
        """Bytes stored under ``STORE/sub``: file sizes of a folder; the zip file's size (``sub=""``) or
        its members' stored sizes; object sizes for a URL. None where they cannot be known without
        listing, which HTTP servers do not do reliably."""
        if self.kind == "url":
            return fsspec_du(self.location, sub, self._storage_options)
        path = Path(self.path)
        if self.kind == "zip":
            if not sub:
                return path.stat().st_size
            prefix = "/".join(p for p in (self.group.path, sub) if p) + "/"
            with zipfile.ZipFile(path) as zf:
                return sum(i.compress_size for i in zf.infolist() if i.filename.startswith(prefix))
        root = path / sub
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0

