"""``info`` and ``verify``: what a store holds, and whether all of it is really there.

``store_info`` reads attributes and file sizes only (fast). ``verify_store`` decodes every chunk
of every array (each carries a CRC-32C checksum), checks shapes against the recorded teacher and
preprocessing, completeness of every case, the statistics, and, given the source data, the
sha256 of every source file.

Both take any store location (folder, ``.zip``, URL). Neither lists the store: a missing chunk is
noticed as the read that finds nothing, so ``verify`` checks a store behind an HTTP server (which
cannot list) as fully as a local one; only the sizes in ``info`` are unknown there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from dinomix_cache.data.roles import ROLES
from dinomix_cache.data.volume_files import file_sha256
from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore

# What `info` says where sizes cannot be known.
SIZES_UNKNOWN = "unknown: an HTTP server cannot list the store's files (run info on the folder or zip for sizes)"


def store_info(path: Path | str) -> dict[str, Any]:
    """Summary of a store as a JSON-able dict (teacher, preprocessing, cases by role, sizes).

    Raises:
        UserError: ``path`` is not a readable dinomix store.
    """
    with FeatureStore.open(path) as store:
        return _summary(store)


def _summary(store: FeatureStore) -> dict[str, Any]:
    attrs = store.attrs
    # The sections are shown as recorded (key order and numbers as the store has them), after
    # validation; everything derived from them is read through the typed view.
    recorded = store.meta
    roles = store.roles()
    complete = set(store.complete_cases())
    by_role: dict[str, dict[str, int]] = {}
    for cid, role in roles.items():
        entry = by_role.setdefault(role, {"cases": 0, "complete": 0})
        entry["cases"] += 1
        entry["complete"] += cid in complete
    order = {role: i for i, role in enumerate(ROLES)}
    by_role = dict(sorted(by_role.items(), key=lambda item: order.get(item[0], len(order))))
    slices = 0
    feature_shapes: set[tuple[int, ...]] = set()
    for cid in complete:
        shape = store.feature_shape(cid)
        feature_shapes.add(shape)
        slices += shape[0]
    feature_bytes = store.bytes_on_disk("features")
    window_bytes = store.bytes_on_disk("windows") if attrs.crop_windows else 0
    volume_bytes = store.bytes_on_disk("volumes")
    total_bytes = store.bytes_on_disk()
    counts = store.class_voxels()
    return {
        "path": store.location,
        "kind": store.kind,
        "format": f"{attrs.format} v{attrs.version}",
        "teacher": recorded["teacher"],
        "preprocessing": recorded["preprocessing"],
        "dataset": {k: recorded["dataset"][k] for k in ("name", "class_names", "split")},
        "storage": recorded["storage"],
        "producer": recorded["producer"],
        "extraction_complete": attrs.extraction.complete,
        "cases_by_role": by_role,
        "incomplete_cases": [cid for cid in roles if cid not in complete],
        "feature_shapes": sorted(list(s) for s in feature_shapes),
        "slices": slices,
        "crop_windows": store.crop_windows,
        "teacher_views": ["slice", "crop"] if attrs.crop_windows else ["slice"],
        "bytes": {"total": total_bytes, "features": feature_bytes, "windows": window_bytes, "volumes": volume_bytes},
        "bytes_note": SIZES_UNKNOWN if total_bytes is None else None,
        "feature_bytes_per_slice": feature_bytes / slices if slices and feature_bytes is not None else None,
        "window_bytes_per_slice": window_bytes / slices if slices and window_bytes else None,
        "class_voxels": None if counts is None else [int(v) for v in counts],
    }


class MissingKeys(WrapperStore[Store]):
    """A read-only view of a store that notes every key a read finds absent.

    zarr reads a missing chunk as the fill value without a word; counting chunks instead would
    list the store, which HTTP servers cannot do. Reading through this view costs nothing extra.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.missing: set[str] = set()

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is None:
            self.missing.add(key)
        return value


def _check_array(array: Any, what: str, problems: list[str]) -> np.ndarray | None:
    """Decode every chunk of ``array``; note missing chunks and decode or checksum failures.

    Returns:
        The data, or None when it cannot be decoded or chunks are missing (their fill value would
        only add problems about values).
    """
    try:
        data = np.asarray(array[...])
        if isinstance(array.store, MissingKeys):
            prefix = f"{array.path}/"
            missing = sum(k.startswith(prefix) and not k.endswith("zarr.json") for k in array.store.missing)
        else:  # a plain array (tests): count by listing
            missing = array.nchunks - array.nchunks_initialized
        if missing:
            problems.append(f"{what}: {missing} of {array.nchunks} chunks missing")
            return None
        return data
    except Exception as exc:  # any decode or checksum failure is a problem to report, not a crash
        problems.append(f"{what}: unreadable ({type(exc).__name__}: {exc})")
        return None


def verify_store(path: Path | str, data: Path | None = None) -> list[str]:
    """Re-read every chunk of a store and list what is wrong with it.

    Args:
        path: the store (folder, ``.zip`` or URL).
        data: the dataset root the store was made from; when given, each source file's sha256
            is recomputed and compared with the recorded one.

    Returns:
        Problems, one line each; empty when the store is sound.

    Raises:
        UserError: ``path`` is not a store at all (nothing to verify).
    """
    with FeatureStore.open(path) as store:
        return _verify(store, data)


def _verify(store: FeatureStore, data: Path | None) -> list[str]:
    recorder = MissingKeys(store.group.store)
    root = zarr.open_group(recorder, path=store.group.path, mode="r", zarr_format=3)
    schema = store.attrs
    problems: list[str] = []
    expected = schema.array_spec("features").shape
    target = schema.preprocessing.target_shape
    num_classes = schema.num_classes
    labeled_total = np.zeros(num_classes, dtype=np.int64)
    for cid, role in store.roles().items():
        attrs = store.case_attrs(cid)
        if not (attrs and attrs.get("complete") is True):
            problems.append(f"case {cid} ({role}): incomplete; rerun extract to finish it")
            continue
        feats = _check_array(root["features"][cid], f"case {cid} features", problems)
        if feats is not None:
            if feats.shape != expected:
                problems.append(f"case {cid} features: shape {feats.shape}, expected {expected}")
            elif not np.isfinite(feats).all():
                problems.append(f"case {cid} features: non-finite values")
        if schema.crop_windows is not None:
            wins = _check_array(root["windows"][cid], f"case {cid} windows", problems)
            shape = schema.array_spec("windows").shape
            if wins is not None and wins.shape != shape:
                problems.append(f"case {cid} windows: shape {wins.shape}, expected {shape}")
            elif wins is not None and not np.isfinite(wins).all():
                problems.append(f"case {cid} windows: non-finite values")
        if schema.storage.volumes:
            for name in ("image", "label"):
                if name == "label" and "class_voxels" not in attrs:
                    continue
                if not store.has_volume(cid, name):
                    problems.append(f"case {cid}: {name} volume missing")
                    continue
                vol = _check_array(root["volumes"][cid][name], f"case {cid} {name}", problems)
                if vol is not None and vol.shape != target:
                    problems.append(f"case {cid} {name}: shape {vol.shape}, expected {target}")
                if vol is not None and name == "label" and vol.size and int(vol.max()) >= num_classes:
                    problems.append(f"case {cid} label: value {int(vol.max())} outside 0..{num_classes - 1}")
        counts = attrs.get("class_voxels")
        if counts is not None and not (isinstance(counts, list) and len(counts) == num_classes
                                       and all(type(v) is int and v >= 0 for v in counts)):
            problems.append(f"case {cid}: class_voxels attribute is not {num_classes} counts")
        elif role == "labeled" and counts is not None:
            labeled_total += np.asarray(counts, dtype=np.int64)
        source = attrs.get("source")
        if data is not None:
            problems += _check_sources(cid, source if isinstance(source, dict) else {}, Path(data))
    if schema.extraction.complete:
        counts = _class_voxels(store, problems)
        if counts is None:
            problems.append("stats/class_voxels missing")
        elif counts is False:
            pass
        elif not np.array_equal(counts, labeled_total):
            problems.append("stats/class_voxels disagrees with the labeled cases' class voxel counts")
    elif not problems:
        problems.append("extraction not finished (statistics not written); rerun extract")
    return problems


def _class_voxels(store: FeatureStore, problems: list[str]) -> np.ndarray | None | bool:
    """The statistics, None if absent, False (noted as a problem) if unreadable or malformed."""
    try:
        return store.class_voxels()
    except UserError as exc:
        problems.append(f"stats/class_voxels: {exc}")
        return False


def _check_sources(case_id: str, source: dict[str, Any], data: Path) -> list[str]:
    problems = []
    for key in ("image", "label"):
        rel, recorded = source.get(key), source.get(f"{key}_sha256")
        if not rel or not recorded:
            continue
        file = data / rel
        if not file.is_file():
            problems.append(f"case {case_id}: source {file} not found")
        elif file_sha256(file) != recorded:
            problems.append(f"case {case_id}: {file} changed since extraction (sha256 differs)")
    return problems

