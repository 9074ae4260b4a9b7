"""Crop windows of stage one: where they lie, and that they are the teacher's tokens of each window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.teacher.model import TeacherSettings, load_teacher
from stage1_extract.runner import run_extraction
from stage1_extract.windows import window_geometry
from tests.tiny import tiny_settings

SHAPE = (16, 64, 64)
TEACHER = "random:ctx-tiny"


def test_window_geometry():
    g = window_geometry((128, 128), (160, 160), (160, 160), 16)
    assert (g.step, g.positions, g.input_size, g.token_grid) == ((16, 16), (3, 3), (128, 128), (8, 8))
    assert g.offsets()[:4] == [(0, 0), (0, 16), (0, 32), (16, 0)] and len(g.offsets()) == 9
    assert g.to_json() == {"size": [128, 128], "positions": [3, 3], "token_grid": [8, 8]}
    g = window_geometry((96, 64), (160, 160), (320, 320), 16)  # 8-pixel tokens: finer offsets
    assert (g.step, g.positions, g.input_size, g.token_grid) == ((8, 8), (9, 13), (192, 128), (12, 8))
    with pytest.raises(UserError, match="whole slice pixels"):
        window_geometry((128, 128), (160, 160), (224, 224), 16)  # 14 tokens over 160 pixels
    for bad in ((120, 128), (176, 128)):
        with pytest.raises(UserError, match="multiple of the token size"):
            window_geometry(bad, (160, 160), (160, 160), 16)


@pytest.fixture(scope="module")
def windows_store(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("windows") / "s.zarr"
    settings = tiny_settings(phantom_dir, out, cases=("0001", "0002"),
                             preprocess=PreprocessSettings(target_shape=SHAPE),
                             teacher=TeacherSettings(source=TEACHER), crop_windows=(32, 48))
    run_extraction(settings)
    return settings, FeatureStore.open(out)


def test_stored_windows_are_the_teachers_tokens_of_each_window(windows_store):
    _, store = windows_store
    assert store.crop_windows == {"size": [32, 48], "positions": [3, 2], "token_grid": [2, 3]}
    teacher = load_teacher(TeacherSettings(source=TEACHER, device="cpu"))
    image = torch.from_numpy(store.read_volume("0001").astype(np.float32))
    wins = store.read_windows("0001")
    assert wins.shape == (16, 3, 2, 2, 3, 128) and wins.dtype == np.float16
    for i, j in ((0, 0), (1, 1), (2, 0)):
        direct = teacher.forward_slices(image[:, 16 * i:16 * i + 32, 16 * j:16 * j + 48]).numpy()
        np.testing.assert_allclose(wins[:, i, j].astype(np.float32), direct, rtol=2 ** -10, atol=1e-3)
    # the slice tokens are the whole slice's, not a window's (this teacher sees context)
    full = store.read_features("0001")[:, 0:2, 0:3].astype(np.float32)
    assert np.abs(full - wins[:, 0, 0].astype(np.float32)).max() > 0.1


def test_other_crop_windows_are_refused_on_append(windows_store):
    settings, store = windows_store
    from dataclasses import replace

    for other in ((48, 48), None):
        with pytest.raises(UserError, match="crop_windows"):
            run_extraction(replace(settings, crop_windows=other))


def test_cluster_writes_the_same_windows(windows_store, tmp_path):
    from dataclasses import replace

    settings, store = windows_store
    run_extraction(replace(settings, out=tmp_path / "w.zarr", workers=2))
    other = FeatureStore.open(tmp_path / "w.zarr")
    for case in ("0001", "0002"):
        assert store.read_windows(case).tobytes() == other.read_windows(case).tobytes()
        assert store.read_features(case).tobytes() == other.read_features(case).tobytes()
