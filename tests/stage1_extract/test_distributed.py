"""Stage one on a dask cluster: same store as in-process, bit for bit; resume; refusals; a bad file.

Two local clusters start here (a few seconds each): one inside ``run_extraction`` for
``workers=2``, one module-scoped cluster shared by the other cluster tests.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.inspection import verify_store
from stage1_extract.cluster import start_local_cluster
from stage1_extract.pipeline import _batches, case_batch_plan
from stage1_extract.runner import run_extraction
from tests.tiny import TINY_PHANTOM, TINY_SHAPE, tiny_settings

# Time-like attributes, and the settings that necessarily differ between the two runs.
VARYING = (("producer", "created"), ("extraction", "finished"))
VARYING_SETTINGS = ("workers", "out")


@pytest.fixture(scope="module")
def reference(good_store) -> Path:
    """A store extracted in-process with ``tiny_settings`` (the pipeline the cluster must reproduce)."""
    assert not FeatureStore.open(good_store).incomplete_cases()
    return good_store


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    cluster = start_local_cluster(2, gpu=False)
    with Client(cluster, set_as_default=False) as c:
        yield c
    cluster.close()


def _comparable_attrs(attrs: dict) -> dict:
    attrs = {k: v for k, v in attrs.items()}
    if "dinomix" in attrs:
        # The attribute as stored (zarr.json), compared byte for byte, not the store's typed view.
        stored = {k: dict(v) if isinstance(v, dict) else v for k, v in attrs["dinomix"].items()}
        for section, key in VARYING:
            stored[section].pop(key, None)
        stored["extraction"]["settings"] = {k: v for k, v in stored["extraction"]["settings"].items()
                                            if k not in VARYING_SETTINGS}
        attrs["dinomix"] = stored
    return attrs


def assert_same_store(a: Path, b: Path) -> None:
    """Every node of two stores: same names, attributes, array metadata and bytes."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert _comparable_attrs(dict(ga.attrs)) == _comparable_attrs(dict(gb.attrs))
    na, nb = dict(ga.members(max_depth=None)), dict(gb.members(max_depth=None))
    assert sorted(na) == sorted(nb)
    arrays = 0
    for name, node in na.items():
        other = nb[name]
        assert type(node) is type(other), name
        assert _comparable_attrs(dict(node.attrs)) == _comparable_attrs(dict(other.attrs)), name
        if isinstance(node, zarr.Array):
            assert node.metadata.to_dict() == other.metadata.to_dict(), name
            x, y = node[...], other[...]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes(), name  # bit for bit (NaNs and signed zeros included)
            arrays += 1
    assert arrays == 3 * len(TINY_PHANTOM.case_ids) + 1 - _unlabeled(a)


def _unlabeled(store: Path) -> int:
    s = FeatureStore.open(store)
    return sum(not s.has_volume(c, "label") for c in s.roles())


def chunk_mtimes(store: Path, case: str) -> dict[str, int]:
    files = [p for sub in (f"features/{case}", f"volumes/{case}") for p in (store / sub).rglob("*") if p.is_file()]
    return {str(p): p.stat().st_mtime_ns for p in files}


@pytest.mark.parametrize(("cases", "depth", "batch"), [(6, 16, 12), (3, 5, 4), (4, 8, 8), (2, 7, 32), (5, 16, 1)])
def test_case_batch_plan_matches_the_pipeline(cases, depth, batch):
    loaded = ((SimpleNamespace(case_id=str(i)), SimpleNamespace(image=np.empty((depth, 1, 1)))) for i in range(cases))
    seen: dict[str, list] = {str(i): [] for i in range(cases)}
    for parts, _ in _batches(loaded, batch, (1, 1, 1)):
        length, row = sum(b - a for _, a, b in parts), 0
        for state, a, b in parts:
            seen[state.source.case_id].append((length, row, a, b))
            row += b - a
    for i in range(cases):
        assert case_batch_plan(i * depth, depth, cases * depth, batch) == seen[str(i)]


def test_two_workers_equal_in_process(phantom_dir, tmp_path, reference):
    out = tmp_path / "s.zarr"
    report = run_extraction(tiny_settings(phantom_dir, out, workers=2))
    assert report.complete and report.computed == list(TINY_PHANTOM.case_ids) and report.slices == 6 * TINY_SHAPE[0]
    assert FeatureStore.open(out).attrs.extraction.settings["workers"] == 2
    assert_same_store(reference, out)
    assert verify_store(out, data=phantom_dir) == []


def test_resume_on_cluster_extracts_only_missing_cases(phantom_dir, tmp_path, reference, client):
    out = tmp_path / "s.zarr"
    first = run_extraction(tiny_settings(phantom_dir, out, cases=("0001", "0003")))
    assert not first.complete
    before = {c: chunk_mtimes(out, c) for c in ("0001", "0003")}
    assert all(before.values())
    second = run_extraction(tiny_settings(phantom_dir, out, workers=2), client=client)
    assert second.skipped == ["0001", "0003"] and second.computed == ["0002", "0004", "0005", "0006"]
    assert second.complete and verify_store(out, data=phantom_dir) == []
    assert {c: chunk_mtimes(out, c) for c in ("0001", "0003")} == before  # complete cases untouched
    a, b = FeatureStore.open(reference), FeatureStore.open(out)
    for case in TINY_PHANTOM.case_ids:
        assert a.read_features(case).tobytes() == b.read_features(case).tobytes()
    np.testing.assert_array_equal(a.class_voxels(), b.class_voxels())


def test_bad_file_on_a_worker_is_one_user_error(phantom_dir, tmp_path, client):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    bad = data / "imagesTr" / "img0004.nii.gz"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "s.zarr"
    with pytest.raises(UserError, match="img0004") as info:
        run_extraction(tiny_settings(data, out, workers=2), client=client)
    assert "\n" not in str(info.value)
    store = FeatureStore.open(out)
    assert "0004" in store.incomplete_cases() and not store.attrs.extraction.complete
    # Whatever finished stays complete, and a rerun with the file repaired resumes from there.
    done = store.complete_cases()
    shutil.copy(phantom_dir / "imagesTr" / "img0004.nii.gz", bad)
    rerun = run_extraction(tiny_settings(data, out, workers=2), client=client)
    assert rerun.skipped == done and rerun.complete


def test_cuda_teacher_without_gpu_workers_is_refused_before_writing(phantom_dir, tmp_path, client):
    from dinomix_cache.teacher.model import TeacherSettings

    settings = tiny_settings(phantom_dir, tmp_path / "s.zarr", teacher=TeacherSettings(source="random:tiny",
                                                                                      device="cuda"))
    with pytest.raises(UserError, match="no dask worker offers a GPU resource.*--resources GPU=1"):
        run_extraction(settings, client=client)
    assert not (tmp_path / "s.zarr").exists()


def test_workers_and_scheduler_exclude_each_other(phantom_dir, tmp_path):
    with pytest.raises(UserError, match="--workers 2 and --scheduler tcp://head:8786 exclude each other"):
        run_extraction(tiny_settings(phantom_dir, tmp_path / "s.zarr", workers=2, scheduler="tcp://head:8786"))
    with pytest.raises(UserError, match="--workers -1"):
        tiny_settings(phantom_dir, tmp_path / "s.zarr", workers=-1)
    assert not (tmp_path / "s.zarr").exists()


def test_unreachable_scheduler_fails_fast_and_writes_nothing(phantom_dir, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(UserError, match=f"dask scheduler at {address}.*--scheduler"):
        run_extraction(tiny_settings(phantom_dir, tmp_path / "s.zarr", scheduler=address, connect_timeout=1.0))
    assert time.monotonic() - start < 20  # the teacher load included; the connection gives up after 1 s
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.lock").exists()
