"""The extraction runner: ``dinomix-cache extract`` from settings to a finished feature store.

A run discovers the dataset (generating the phantom on first use), loads the teacher and reaches
the cluster (all may fail) before it locks, opens or creates the store; then it computes the
pending cases, in this process (:mod:`stage1_extract.pipeline`) or, with ``workers`` or
``scheduler`` set, as tasks on a ``dask.distributed`` cluster (:mod:`stage1_extract.cluster`,
:mod:`stage1_extract.distributed`), and finally writes the statistics and marks the store complete.
Discovery, the lock, the group attributes and statistics always stay in this process.
"""

from __future__ import annotations

import logging
import platform
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numcodecs
import torch
import transformers
import zarr

import dinomix_cache
from dinomix_cache.data.datasets import DatasetSpec, discover_dataset
from dinomix_cache.errors import UserError
from dinomix_cache.phantom.generate import generate_phantom
from dinomix_cache.settings_codec import settings_to_json
from dinomix_cache.store.feature_store import FeatureStore, is_store, remove_store
from dinomix_cache.store.lock import StoreLock
from dinomix_cache.teacher.model import Teacher, load_teacher
from stage1_extract import distributed as dist
from stage1_extract.cluster import cluster_client, describe_cluster
from stage1_extract.pipeline import crop_window_geometry, extract_cases
from stage1_extract.progress import ExtractionProgress
from stage1_extract.settings import ExtractSettings

log = logging.getLogger("dinomix_cache.extract")


@dataclass
class ExtractionReport:
    """What a run did: cases computed and skipped, slices, seconds in the slice pipeline."""

    store: Path
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    slices: int = 0
    seconds: float = 0.0
    complete: bool = False

    @property
    def slices_per_s(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0


def prepare_dataset(settings: ExtractSettings, progress: bool = True) -> DatasetSpec:
    """Discover the dataset; the phantom is generated under ``settings.data`` on first use."""
    settings = settings.resolved()
    assert settings.data is not None
    if settings.dataset == "phantom":
        generate_phantom(settings.data, settings.phantom, progress=progress)
    return discover_dataset(settings.dataset, settings.data, settings.split)


def producer_meta() -> dict[str, Any]:
    """Versions of what produced a store; no host names."""
    return {
        "package": "dinomix-cache",
        "version": dinomix_cache.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def store_meta(settings: ExtractSettings, spec: DatasetSpec, teacher: Teacher) -> dict[str, Any]:
    """The ``dinomix`` attribute of a new store (everything that changes feature values)."""
    slice_hw = tuple(settings.preprocess.target_shape[1:])
    cases = [{"id": c.case_id, "role": c.role} for c in spec.cases]
    geometry = crop_window_geometry(settings, teacher)
    return {
        "crop_windows": None if geometry is None else geometry.to_json(),
        "teacher": teacher.identity(slice_hw),
        "preprocessing": settings.preprocess.to_json(),
        "dataset": {
            "name": spec.name,
            "class_names": list(spec.class_names),
            "split": spec.split,
            "cases": cases,
        },
        "storage": settings_to_json(settings.storage),
        "producer": producer_meta(),
        "extraction": {"complete": False, "settings": settings_to_json(settings)},
    }


def open_or_create_store(settings: ExtractSettings, meta: dict[str, Any]) -> FeatureStore:
    """Open ``settings.out`` for appending if it matches ``meta``, else create it.

    Raises:
        UserError: the path holds something else, or a store made with other settings
            (``--overwrite`` rebuilds it).
    """
    out = settings.out
    assert out is not None
    if out.exists() and settings.overwrite:
        remove_store(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not is_store(out):
            raise UserError(f"{out} exists and is not a dinomix feature store; choose another --out")
        # Compare read-only first: opening to write drops the consolidated metadata, and a refused
        # store must stay byte-identical.
        with FeatureStore.open(out) as existing:
            problems = existing.mismatches(meta)
        if problems:
            raise UserError(
                f"{out} was made with other settings ({'; '.join(problems)}); refusing to append. "
                "Use --overwrite to rebuild it, or another --out"
            )
        return FeatureStore.open(out, mode="r+")
    return FeatureStore.create(out, meta)


def finalize_store(store: FeatureStore, spec: DatasetSpec) -> bool:
    """Write statistics and per-case hashes into the group attributes once all cases are complete,
    then consolidate the metadata (a later ``extract`` opening the store to write drops that copy):
    :meth:`~dinomix_cache.store.feature_store.FeatureStore.finalize`. ``spec`` is the dataset the store
    was opened for; the store's attributes list its cases and classes.

    Returns:
        True if every case of the dataset is complete (the store is then marked complete).
    """
    return store.finalize()


def run_extraction(settings: ExtractSettings, teacher: Teacher | None = None,
                   client: Any | None = None) -> ExtractionReport:
    """``dinomix-cache extract``: build or resume a feature store.

    Order matters for "nothing written on bad input": the dataset is discovered, the teacher
    loaded and the cluster reached (all may fail) before the store is locked, opened or created.

    Args:
        settings: what to extract; ``workers`` / ``scheduler`` choose a dask cluster.
        teacher: an already loaded teacher (else loaded from ``settings.teacher``). On a cluster
            it only supplies the store's teacher identity; the workers load their own.
        client: a connected ``distributed.Client`` to run the cases on, instead of the cluster
            ``settings`` names (e.g. one cluster shared by several extractions).

    Raises:
        UserError: bad data, a teacher that cannot be loaded, an unreachable cluster, an
            incompatible or foreign store, a store locked by another extraction, or a failed write.
    """
    settings = settings.resolved()
    assert settings.out is not None
    on_cluster = settings.distributed or client is not None
    spec = prepare_dataset(settings, progress=settings.progress)
    wanted = spec.cases
    if settings.cases:
        known = {c.case_id for c in spec.cases}
        unknown = [c for c in settings.cases if c not in known]
        if unknown:
            raise UserError(f"--cases {' '.join(unknown)}: not in dataset {spec.name} at {spec.root}")
        wanted = tuple(c for c in spec.cases if c.case_id in settings.cases)
    if teacher is None:
        # On a cluster the client needs the teacher's identity only (for the store's attributes):
        # it loads it on the CPU and leaves the GPU to the workers; the requested device is recorded.
        teacher = load_teacher(replace(settings.teacher, device="cpu") if on_cluster else settings.teacher)
    else:
        settings = replace(settings, teacher=teacher.settings)
    slice_hw = tuple(settings.preprocess.target_shape[1:])
    teacher.resolved_input_size(slice_hw)
    trained_hw = tuple(teacher.training["target_shape"][1:]) if teacher.training else slice_hw
    if trained_hw != slice_hw:
        # Its tokens then cover more or less anatomy than the ones it learnt from: allowed, but said.
        log.warning("teacher %s was trained on %dx%d slices; this store's are %dx%d", settings.teacher.source,
                    *trained_hw, *slice_hw)
    meta = store_meta(settings, spec, teacher)
    identity = teacher.identity(slice_hw)  # the store's teacher attribute; a worker whose teacher differs refuses

    report = ExtractionReport(store=settings.out)
    with ExitStack() as stack:
        described = teacher.describe()
        if on_cluster:
            if client is None:
                client = stack.enter_context(cluster_client(settings))
            described = f"{described.rsplit(' on ', 1)[0]} on {describe_cluster(client, settings)}"
            dist.warm_up(client, settings, identity)
        stack.enter_context(StoreLock(settings.out))
        store = open_or_create_store(settings, meta)
        pending = [c for c in wanted if not store.is_complete(c.case_id)]
        report.skipped = [c.case_id for c in wanted if store.is_complete(c.case_id)]
        log.info("teacher %s; store %s", described, settings.out)
        log.info("%d case(s) complete and skipped; extracting %d: %s", len(report.skipped), len(pending),
                 " ".join(c.case_id for c in pending) or "-")
        depth = settings.preprocess.target_shape[0]
        with ExtractionProgress(len(pending), len(pending) * depth, described, enabled=settings.progress) as progress:
            if on_cluster:
                report.slices, report.seconds = dist.extract_cases_distributed(
                    client, spec, pending, settings, identity, progress)
            else:
                report.slices, report.seconds = extract_cases(store, teacher, spec, pending, settings, progress)
        report.computed = [c.case_id for c in pending]
        report.complete = finalize_store(store, spec)
    return report
