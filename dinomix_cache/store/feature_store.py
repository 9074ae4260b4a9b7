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
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.errors import ZarrUserWarning
from zarr.storage import ZipStore

from dinomix_cache.errors import SettingsError, UserError, check_choice, writing
from dinomix_cache.store.checks import check_array, checked_read, fill_value
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
from dinomix_cache.store.lock import ReaderLock, exclusive_or_refuse
from dinomix_cache.store.schema import FORMAT_NAME, FORMAT_VERSION, StoreAttrs, check_store_attrs, parse_store_attrs

ATTRS_KEY = "dinomix"
CASE_KEY = "dinomix_case"
FEATURE_DIMS = ("slice", "token_row", "token_col", "channel")
VOLUME_DIMS = ("slice", "row", "col")
WINDOW_DIMS = ("slice", "window_row", "window_col", "token_row", "token_col", "channel")
# zarr warns on every array using a numcodecs filter (BitRound, the lossy mode) that other Zarr
# implementations may not read it; the README says so once, the warning would say it per chunk read.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=ZarrUserWarning)


Compression = Literal["lossless", "lossy", "none"]
COMPRESSIONS: tuple[Compression, ...] = get_args(Compression)


@dataclass(frozen=True)
class StoreSettings:
    """How arrays are laid out and compressed. Recorded in the store as ``storage``.

    Attributes:
        compression: ``"lossless"`` (Blosc with byte shuffle: LZ4 for features, which barely compress
            at any level, zstd for volumes, ≈ 3.4× on CT),
            ``"lossy"`` (bit rounding to ``keepbits`` mantissa bits before Blosc: relative error
            at most 2^-(keepbits+1), 0.39 % for keepbits 7), or ``"none"``.
        keepbits: mantissa bits kept by the lossy mode (1..9; float16 has 10).
        chunk_slices: slices per chunk; a chunk spans the whole plane and all channels, so a
            crop of Z slices reads about Z / chunk_slices + 1 chunks.
        volumes: also store the preprocessed image and label volumes (training then needs
            nothing else). Off where images may not be shared.
    """

    compression: Compression = "lossless"
    keepbits: int = 7
    chunk_slices: int = 16
    volumes: bool = True

    def __post_init__(self) -> None:
        check_choice(self.compression, COMPRESSIONS, "--compression", "compression")
        if not 1 <= self.keepbits <= 9:
            raise SettingsError(f"keepbits {self.keepbits} out of range (--keepbits): use 1..9 (float16 has 10 "
                                "mantissa bits)")
        if self.chunk_slices < 1:
            raise SettingsError(f"chunk_slices must be >= 1 (--chunk-slices), got {self.chunk_slices}")


def _codecs(settings: StoreSettings, features: bool) -> dict[str, Any]:
    """Codec chain of an array: Blosc with byte shuffle, then a CRC-32C checksum.

    Features use LZ4: float16 tokens barely compress (zstd level 1 gains 9 % for 30 ms per case,
    level 5 16 % for 56 ms), and writing must hide behind the teacher. Volumes use zstd level 1
    (3.4× on CT at 29 ms per case).
    """
    # A CRC-32C checksum on every chunk lets `verify` detect a flipped byte, compressed or not.
    if settings.compression == "none":
        return {"compressors": [Crc32cCodec()]}
    lossy = settings.compression == "lossy" and features
    if lossy:  # the rounded-off mantissa bits are zeros that zstd removes
        blosc = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    else:
        blosc = BloscCodec(cname="lz4" if features else "zstd", clevel=5 if features else 1, shuffle="shuffle")
    out: dict[str, Any] = {"compressors": [blosc, Crc32cCodec()]}
    if lossy:
        from zarr.codecs.numcodecs import BitRound

        out["filters"] = [BitRound(keepbits=settings.keepbits)]
    return out


def load_attrs(attrs: Mapping[str, Any], where: str) -> tuple[dict[str, Any], StoreAttrs]:
    """The ``dinomix`` group attribute as stored (its canonical JSON is the store's identity) and in
    its typed, validated form.

    Raises:
        UserError: not a dinomix store, a newer format version, or a field missing, unknown,
            mistyped or out of bounds (see :func:`~dinomix_cache.store.schema.check_store_attrs`).
    """
    meta = attrs.get(ATTRS_KEY)
    return meta, check_store_attrs(meta, where, ATTRS_KEY)  # type: ignore[return-value]


def validate_attrs(attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """:func:`load_attrs`, returning the validated ``dinomix`` dictionary only."""
    return load_attrs(attrs, where)[0]


def is_store(path: Path) -> bool:
    """True if ``path`` is a directory holding a Zarr group with the dinomix attribute."""
    meta_file = Path(path) / "zarr.json"
    if not meta_file.is_file():
        return False
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("node_type") == "group" and isinstance(meta.get("attributes", {}).get(ATTRS_KEY), dict)


def remove_store(path: Path) -> None:
    """Delete a store (for ``--overwrite``); refuses to delete anything that is not a store.

    Raises:
        UserError: ``path`` exists and is not a dinomix store, is a symbolic link (the store it
            points to is not deleted through it), is being read by another process (``train``,
            ``evaluate``, ``pack``: named), or cannot be deleted. Nothing is deleted then.
    """
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link to {path.resolve()}; --overwrite does not delete through a link: "
                        "pass the store's own path as --out")
    if not path.exists():
        return
    with exclusive_or_refuse(path):
        try:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
                return
            if not is_store(path):
                raise UserError(f"{path} is not a dinomix feature store; refusing to delete it. Choose another --out")
            shutil.rmtree(path)
        except OSError as exc:
            raise UserError(f"cannot delete {path} for --overwrite ({exc.strerror or exc}); it may be partly deleted: "
                            "fix the permissions and rerun with --overwrite") from None


class FeatureStore:
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

    def __init__(self, group: zarr.Group, path: Path | str, meta: dict[str, Any], kind: str = "folder",
                 storage_options: dict[str, Any] | None = None, attrs: StoreAttrs | None = None) -> None:
        self.group = group
        self.path = path
        self.location = str(path)
        self.kind = kind
        self._storage_options = storage_options
        self._meta = meta
        self._attrs = attrs if attrs is not None else parse_store_attrs(meta, self.location)
        self._reader_lock: ReaderLock | None = None
        self._complete: set[str] = set()
        # Opening a node re-reads its metadata (about 2 ms locally, a round trip remotely); complete
        # cases never change, so the training hot path keeps their handles, and the sub-groups'.
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._zero_fill_checked: set[tuple[str, str]] = set()
        self._groups: dict[str, zarr.Group] = {}

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

    def consolidate(self) -> None:
        """Copy every node's metadata into the root ``zarr.json`` (Zarr's consolidated metadata).

        A reader then opens the store and any case with one request in all, instead of two or
        three per case (worth it over HTTP). For finished stores: opening the store with
        ``mode="r+"`` drops the copy again, since new cases would not be in it.
        """
        with warnings.catch_warnings(), writing(self.location):  # "consolidated metadata is not in the v3 spec" (yet)
            warnings.simplefilter("ignore", ZarrUserWarning)
            zarr.consolidate_metadata(self.group.store, path=self.group.path, zarr_format=3)

    # ----------------------------------------------------------------------------- attributes
    @property
    def meta(self) -> dict[str, Any]:
        """The validated ``dinomix`` group attribute (teacher, preprocessing, dataset, ...) as stored."""
        return self._meta

    @property
    def attrs(self) -> StoreAttrs:
        """The same attribute, typed: ``store.attrs.teacher.hidden_size``, ``store.attrs.dataset.cases``."""
        return self._attrs

    def update_meta(self, **sections: Any) -> None:
        """Replace top-level sections of the ``dinomix`` attribute (written atomically).

        Raises:
            UserError: the result does not validate, or the write fails (naming the store).
        """
        meta = {**self._meta, **sections}
        attrs = load_attrs({ATTRS_KEY: meta}, self.location)[1]
        with writing(self.location):
            self.group.attrs[ATTRS_KEY] = meta
        self._meta, self._attrs = meta, attrs

    @property
    def class_names(self) -> list[str]:
        return self._attrs.class_names

    @property
    def crop_windows(self) -> dict[str, list[int]] | None:
        """``{"size": [H, W], "positions": [ny, nx], "token_grid": [h', w']}`` of a store that holds the
        tokens of every token-aligned crop window (``extract --crop-windows HxW``), else None."""
        return self._meta.get("crop_windows")

    @property
    def storage(self) -> StoreSettings:
        return StoreSettings(**self._attrs.storage.model_dump())

    def roles(self) -> dict[str, str]:
        """Case id → role (labeled / unlabeled / eval / test) for every case the dataset lists."""
        return self._attrs.roles()

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
                    **_codecs(settings, features=is_features),
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
