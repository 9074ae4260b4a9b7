"""``bench targets``: step times, fidelity against the view's reference, cross-view and context figures."""

from __future__ import annotations

import pytest

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.teacher.model import TeacherSettings
from stage1_extract.runner import run_extraction
from stage2_train.bench.targets import bench_targets
from tests.tiny import tiny_settings, tiny_train


@pytest.fixture(scope="module")
def ctx_store(phantom_dir, tmp_path_factory):
    """A store of the context-sensitive tiny teacher with 32x32 crop windows (3x3 a 64-pixel slice)."""
    out = tmp_path_factory.mktemp("bench") / "s.zarr"
    run_extraction(tiny_settings(phantom_dir, out, preprocess=PreprocessSettings(target_shape=(32, 64, 64)),
                                 teacher=TeacherSettings(source="random:ctx-tiny"), crop_windows=(32, 32)))
    return out


@pytest.mark.parametrize("view", ["slice", "crop"])
def test_bench_targets_reports_time_fidelity_recompute_and_context(ctx_store, view):
    settings = tiny_train(ctx_store, teacher_view=view)
    result = bench_targets(settings, steps=1)
    assert list(result) == ["teacher", "view", "no_fkd", "online", "cache", "hybrid", "cross_view"]
    assert result["view"] == view and result["teacher"]["label"] == "random, not pretrained"
    assert result["teacher"]["context_cosine"] <= 0.9  # so the cosines below can fail
    assert "cosine" not in result["no_fkd"] and result["no_fkd"]["step_s"] > 0
    assert result["online"]["cosine"] == pytest.approx(1.0, abs=1e-4) and result["online"]["recomputed"] == 1.0
    assert result["cache"]["recomputed"] == 0.0 and -1.0 <= result["cache"]["cosine"] < 0.9999
    assert 0.0 < result["hybrid"]["recomputed"] < 1.0
    assert result["hybrid"]["cosine"] >= 0.9999  # equal to the reference up to float16 rounding
    assert result["cross_view"]["cosine"] < 0.99  # the two definitions differ for this teacher
