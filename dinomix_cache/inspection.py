"""``info`` and ``verify``: what a store holds, and whether all of it is really there.

``store_info`` reads attributes and file sizes only (fast). ``verify_store`` decodes every chunk
of every array (each carries a CRC-32C checksum), checks shapes against the recorded teacher and
preprocessing, completeness of every case, the statistics, and, given the source data, the
sha256 of every source file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dinomix_cache.datasets import ROLES
from dinomix_cache.preprocess import file_sha256
from dinomix_cache.store import FeatureStore


def store_info(path: Path | str) -> dict[str, Any]:
    """Summary of a store as a JSON-able dict (teacher, preprocessing, cases by role, sizes).

    Raises:
        UserError: ``path`` is not a readable dinomix store.
    """
    store = FeatureStore.open(path)
    meta = store.meta
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
    volume_bytes = store.bytes_on_disk("volumes")
    counts = store.class_voxels()
    return {
        "path": str(store.path),
        "format": f"{meta['format']} v{meta['version']}",
        "teacher": meta["teacher"],
        "preprocessing": meta["preprocessing"],
        "dataset": {k: meta["dataset"][k] for k in ("name", "class_names", "split") if k in meta["dataset"]},
        "storage": meta["storage"],
        "producer": meta["producer"],
        "extraction_complete": bool(meta["extraction"].get("complete")),
        "cases_by_role": by_role,
        "incomplete_cases": [cid for cid in roles if cid not in complete],
        "feature_shapes": sorted(list(s) for s in feature_shapes),
        "slices": slices,
        "bytes": {"total": store.bytes_on_disk(), "features": feature_bytes, "volumes": volume_bytes},
        "feature_bytes_per_slice": feature_bytes / slices if slices else None,
        "class_voxels": None if counts is None else [int(v) for v in counts],
    }


def _expected_feature_shape(meta: dict[str, Any]) -> tuple[int, int, int, int]:
    teacher, prep = meta["teacher"], meta["preprocessing"]
    patch = int(teacher["patch_size"])
    in_h, in_w = (int(v) for v in teacher["input_size"])
    return (int(prep["target_shape"][0]), in_h // patch, in_w // patch, int(teacher["hidden_size"]))


def _check_array(array: Any, what: str, problems: list[str]) -> np.ndarray | None:
    try:
        if array.nchunks_initialized < array.nchunks:
            problems.append(f"{what}: {array.nchunks - array.nchunks_initialized} of {array.nchunks} chunks missing")
        return np.asarray(array[...])
    except Exception as exc:  # any decode or checksum failure is a problem to report, not a crash
        problems.append(f"{what}: unreadable ({type(exc).__name__}: {exc})")
        return None


def verify_store(path: Path | str, data: Path | None = None) -> list[str]:
    """Re-read every chunk of a store and list what is wrong with it.

    Args:
        path: the store.
        data: the dataset root the store was made from; when given, each source file's sha256
            is recomputed and compared with the recorded one.

    Returns:
        Problems, one line each; empty when the store is sound.

    Raises:
        UserError: ``path`` is not a store at all (nothing to verify).
    """
    store = FeatureStore.open(path)
    meta = store.meta
    problems: list[str] = []
    expected = _expected_feature_shape(meta)
    target = tuple(int(v) for v in meta["preprocessing"]["target_shape"])
    num_classes = len(store.class_names)
    labeled_total = np.zeros(num_classes, dtype=np.int64)
    for cid, role in store.roles().items():
        attrs = store.case_attrs(cid)
        if not (attrs and attrs.get("complete") is True):
            problems.append(f"case {cid} ({role}): incomplete; rerun extract to finish it")
            continue
        feats = _check_array(store.group["features"][cid], f"case {cid} features", problems)
        if feats is not None:
            if feats.shape != expected:
                problems.append(f"case {cid} features: shape {feats.shape}, expected {expected}")
            elif not np.isfinite(feats).all():
                problems.append(f"case {cid} features: non-finite values")
        if store.storage.volumes:
            for name in ("image", "label"):
                if name == "label" and "class_voxels" not in attrs:
                    continue
                if not store.has_volume(cid, name):
                    problems.append(f"case {cid}: {name} volume missing")
                    continue
                vol = _check_array(store.group["volumes"][cid][name], f"case {cid} {name}", problems)
                if vol is not None and vol.shape != target:
                    problems.append(f"case {cid} {name}: shape {vol.shape}, expected {target}")
                if vol is not None and name == "label" and vol.size and int(vol.max()) >= num_classes:
                    problems.append(f"case {cid} label: value {int(vol.max())} outside 0..{num_classes - 1}")
        if role == "labeled" and "class_voxels" in attrs:
            labeled_total += np.asarray(attrs["class_voxels"], dtype=np.int64)
        if data is not None:
            problems += _check_sources(cid, attrs.get("source", {}), Path(data))
    if meta["extraction"].get("complete"):
        counts = store.class_voxels()
        if counts is None:
            problems.append("stats/class_voxels missing")
        elif not np.array_equal(counts, labeled_total):
            problems.append("stats/class_voxels disagrees with the labeled cases' class voxel counts")
    elif not problems:
        problems.append("extraction not finished (statistics not written); rerun extract")
    return problems


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

