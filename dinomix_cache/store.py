"""The feature store, format v1: one Zarr v3 group holding teacher features, volumes and provenance.

Layout (see the README's "Store format")::

    STORE/                      group; attribute "dinomix" = provenance (validated on open)
      features/<case>           float16 (D, h, w, C): slice, token row, token column, channel
      volumes/<case>/image      float16 (D, H, W), preprocessed intensities in [0, 1]
      volumes/<case>/label      uint8   (D, H, W) (labelled cases only)
      stats/class_voxels        int64   (num_classes,), voxels per class over the labeled cases

A case exists for readers only once ``features/<case>`` carries the attribute
``dinomix_case.complete = true``, written last, after every array of the case. Zarr's local store
writes each file atomically, so a killed writer leaves either an incomplete case (redone on
resume) or a complete one, never a torn one. A store holds arrays and JSON attributes only, and
attributes are validated against the declared format version before use: opening a store from
someone else never runs code.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.errors import ZarrUserWarning

from dinomix_cache.errors import UserError

FORMAT_NAME = "dinomix-feature-store"
FORMAT_VERSION = 1
ATTRS_KEY = "dinomix"
CASE_KEY = "dinomix_case"
FEATURE_DIMS = ("slice", "token_row", "token_col", "channel")
VOLUME_DIMS = ("slice", "row", "col")
# zarr warns on every array using a numcodecs filter (BitRound, the lossy mode) that other Zarr
# implementations may not read it; the README says so once, the warning would say it per chunk read.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=ZarrUserWarning)
# Sections of the group attributes; each must be present and a JSON object.
REQUIRED_SECTIONS = ("teacher", "preprocessing", "dataset", "producer", "storage", "extraction")


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

    compression: str = "lossless"
    keepbits: int = 7
    chunk_slices: int = 16
    volumes: bool = True

    def __post_init__(self) -> None:
        if self.compression not in ("lossless", "lossy", "none"):
            raise UserError(f"unknown compression {self.compression!r}: use lossless, lossy or none")
        if not 1 <= self.keepbits <= 9:
            raise UserError(f"keepbits {self.keepbits} out of range: use 1..9 (float16 has 10 mantissa bits)")
        if self.chunk_slices < 1:
            raise UserError(f"chunk_slices must be >= 1, got {self.chunk_slices}")


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


def validate_attrs(attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check the ``dinomix`` group attribute of a store before anything trusts it.

    Args:
        attrs: the group's attributes (a mapping from zarr).
        where: the store path, for messages.

    Returns:
        The validated ``dinomix`` dictionary.

    Raises:
        UserError: not a dinomix store, a newer format version, or a missing/malformed section.
    """
    meta = attrs.get(ATTRS_KEY)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise UserError(f"{where} is a Zarr group but not a dinomix feature store (no '{ATTRS_KEY}' attribute)")
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{where}: invalid store format version {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{where} uses store format v{version}, newer than this dinomix-cache reads (v{FORMAT_VERSION}): "
            "upgrade dinomix-cache"
        )
    for section in REQUIRED_SECTIONS:
        if not isinstance(meta.get(section), dict):
            raise UserError(f"{where}: store attribute section '{section}' is missing or malformed; "
                            "the store is damaged: rebuild it with extract --overwrite")
    dataset = meta["dataset"]
    if not isinstance(dataset.get("class_names"), list) or not isinstance(dataset.get("cases"), list):
        raise UserError(f"{where}: dataset.class_names / dataset.cases missing; rebuild with extract --overwrite")
    for case in dataset["cases"]:
        if not isinstance(case, dict) or not isinstance(case.get("id"), str) or "/" in case["id"]:
            raise UserError(f"{where}: malformed case entry {case!r} in dataset.cases")
    return meta


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
        UserError: ``path`` exists and is not a dinomix store (nothing is deleted then).
    """
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        return
    if not is_store(path):
        raise UserError(f"{path} is not a dinomix feature store; refusing to delete it. Choose another --out")
    shutil.rmtree(path)


class FeatureStore:
    """Read and write a dinomix feature store (format v1).

    Create one with :meth:`create`, open an existing one with :meth:`open`. Read access never
    returns an incomplete case unless asked for one explicitly.

    Example::

        store = FeatureStore.open("storage/synapse.zarr")
        feats = store.read_features("0001", 16, 80)   # (64, h, w, C) float16
    """

    def __init__(self, group: zarr.Group, path: Path, meta: dict[str, Any]) -> None:
        self.group = group
        self.path = path
        self._meta = meta
        self._complete: set[str] = set()
        # Opening an array re-reads its metadata (about 2 ms); complete cases never change, so the
        # training hot path keeps their handles.
        self._arrays: dict[tuple[str, str], zarr.Array] = {}

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: Path | str, meta: dict[str, Any]) -> FeatureStore:
        """Create a new, empty store at ``path`` with the given ``dinomix`` attribute.

        Raises:
            UserError: ``path`` exists and is not an empty directory.
        """
        path = Path(path)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            raise UserError(f"{path} already exists; open it instead or remove it first")
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta}
        validate_attrs({ATTRS_KEY: meta}, str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        group.attrs[ATTRS_KEY] = meta
        for name in ("features", "volumes", "stats"):
            group.require_group(name)
        return cls(group, path, meta)

    @classmethod
    def open(cls, path: Path | str, mode: str = "r") -> FeatureStore:
        """Open an existing store, read-only by default (``mode="r+"`` to write cases).

        Raises:
            UserError: the path is missing, not a Zarr v3 group, or not a valid dinomix store.
        """
        path = Path(path)
        if not path.exists():
            raise UserError(f"store {path} does not exist; create it with `dinomix-cache extract --out {path}`")
        if not (path / "zarr.json").is_file():
            raise UserError(f"{path} is not a feature store (no zarr.json); pass the .zarr folder made by extract")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as exc:  # zarr raises several types for a damaged zarr.json
            raise UserError(f"{path} is not a readable Zarr v3 group ({exc}); rebuild it with extract") from exc
        meta = validate_attrs(group.attrs, str(path))
        return cls(group, path, meta)

    # ----------------------------------------------------------------------------- attributes
    @property
    def meta(self) -> dict[str, Any]:
        """The validated ``dinomix`` group attribute (teacher, preprocessing, dataset, ...)."""
        return self._meta

    def update_meta(self, **sections: Any) -> None:
        """Replace top-level sections of the ``dinomix`` attribute (written atomically)."""
        meta = {**self._meta, **sections}
        validate_attrs({ATTRS_KEY: meta}, str(self.path))
        self.group.attrs[ATTRS_KEY] = meta
        self._meta = meta

    @property
    def class_names(self) -> list[str]:
        return list(self._meta["dataset"]["class_names"])

    @property
    def storage(self) -> StoreSettings:
        return StoreSettings(**self._meta["storage"])

    def roles(self) -> dict[str, str]:
        """Case id → role (labeled / unlabeled / eval / test) for every case the dataset lists."""
        return {c["id"]: c["role"] for c in self._meta["dataset"]["cases"]}

    # ----------------------------------------------------------------------------- cases
    def _feature_array(self, case_id: str) -> zarr.Array | None:
        try:
            node = self.group["features"][case_id]
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
        attrs = self.case_attrs(case_id)
        if attrs and attrs.get("complete") is True:
            # A complete case never becomes incomplete in an open store (rebuilding makes a new
            # store), so reads in training loops do not re-read its metadata every time.
            self._complete.add(case_id)
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
            raise UserError(f"case {case_id} is not complete in {self.path}; rerun extract to finish it")

    def write_case(
        self,
        case_id: str,
        features: np.ndarray,
        image: np.ndarray | None,
        label: np.ndarray | None,
        case_meta: dict[str, Any],
    ) -> None:
        """Write one case's arrays, then mark it complete (last).

        Args:
            case_id: the case id (no ``/``).
            features: (D, h, w, C) teacher features; stored as float16.
            image: (D, H, W) float16 or float32 preprocessed image (stored as given), or None.
            label: (D, H, W) uint8 label, or None.
            case_meta: JSON-able provenance of the case (source hashes, geometry, class voxels).

        Raises:
            UserError: the write failed (e.g. disk full). The case stays incomplete and a rerun
                of extract resumes it.
        """
        settings = self.storage
        depth = features.shape[0]
        chunk = min(settings.chunk_slices, depth)
        try:
            arrays: list[tuple[zarr.Group, str, np.ndarray, tuple[str, ...], bool]] = []
            if settings.volumes and image is not None:
                vgroup = self.group["volumes"].require_group(case_id)
                arrays.append((vgroup, "image", image, VOLUME_DIMS, False))
                if label is not None:
                    arrays.append((vgroup, "label", label.astype(np.uint8, copy=False), VOLUME_DIMS, False))
            feats = features.astype(np.float16, copy=False)
            arrays.append((self.group["features"], case_id, feats, FEATURE_DIMS, True))
            for parent, name, data, dims, is_features in arrays:
                target = parent.create_array(
                    name,
                    shape=data.shape,
                    chunks=(chunk, *data.shape[1:]),
                    dtype=data.dtype,
                    dimension_names=list(dims),
                    overwrite=True,
                    **_codecs(settings, features=is_features),
                )
                target[...] = data
            array = self.group["features"][case_id]
            array.attrs[CASE_KEY] = {**case_meta, "shape": list(feats.shape), "complete": True}
        except OSError as exc:
            reason = "no space left on device" if exc.errno == errno.ENOSPC else str(exc)
            raise UserError(
                f"writing case {case_id} into {self.path} failed ({reason}); the case stays incomplete. "
                "Fix the cause (free disk space) and rerun the same extract command to resume"
            ) from exc

    def read_features(self, case_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Features of slices ``start:stop`` of a complete case, (stop-start, h, w, C) float16."""
        return self._complete_array(case_id, "features")[start:stop]

    def feature_shape(self, case_id: str) -> tuple[int, ...]:
        return tuple(self._complete_array(case_id, "features").shape)

    def _complete_array(self, case_id: str, name: str) -> zarr.Array:
        """The features (``name="features"``) or a volume array of a complete case, opened once."""
        array = self._arrays.get((case_id, name))
        if array is None:
            self._require_complete(case_id)
            node = self.group["features"][case_id] if name == "features" else self.group["volumes"][case_id][name]
            array = self._arrays[(case_id, name)] = node  # type: ignore[assignment]
        return array

    def has_volume(self, case_id: str, name: str = "image") -> bool:
        try:
            return isinstance(self.group["volumes"][case_id][name], zarr.Array)
        except (KeyError, FileNotFoundError):
            return False

    def read_volume(self, case_id: str, name: str = "image", start: int = 0, stop: int | None = None) -> np.ndarray:
        """Slices ``start:stop`` of a case's preprocessed ``image`` (float16) or ``label`` (uint8).

        Raises:
            UserError: the case is incomplete, or the store holds no volumes (made with
                ``--no-volumes``: pass ``--data`` to read the sources instead).
        """
        self._require_complete(case_id)
        if (case_id, name) not in self._arrays and not self.has_volume(case_id, name):
            raise UserError(f"{self.path} holds no {name} volume for case {case_id} (made with --no-volumes?)")
        return self._complete_array(case_id, name)[start:stop]

    # ----------------------------------------------------------------------------- statistics
    def write_class_voxels(self, counts: np.ndarray) -> None:
        """Store voxel counts per class over the labeled cases, (num_classes,) int64."""
        counts = np.asarray(counts, dtype=np.int64)
        arr = self.group["stats"].create_array(
            "class_voxels", shape=counts.shape, dtype="int64", dimension_names=["class"], overwrite=True
        )
        arr[...] = counts

    def class_voxels(self) -> np.ndarray | None:
        """(num_classes,) int64 voxel counts per class over labeled cases, or None if not written."""
        try:
            return np.asarray(self.group["stats"]["class_voxels"][...])
        except (KeyError, FileNotFoundError):
            return None

    # ----------------------------------------------------------------------------- sizes
    def bytes_on_disk(self, sub: str = "") -> int:
        """Bytes of all files under ``STORE/sub`` (local stores)."""
        root = self.path / sub
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def settings_to_json(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-able dict (paths and tuples become strings and lists)."""
    return json.loads(json.dumps(asdict(settings), default=str))
