"""``bench step``: float32 against the resolved path, on the same batches, with a median and a spread."""

from __future__ import annotations

from stage2_train.bench.step import VARIANTS, bench_step
from tests.tiny import tiny_train


def test_both_variants_are_timed_and_resolved(good_store, tmp_path):
    result = bench_step(tiny_train(good_store, tmp_path / "run", targets="cache"), steps=2, warmup=1)
    assert result["float32"]["precision"] == "float32" and result["float32"]["memory_format"] == "contiguous"
    assert result["auto"]["precision"] in ("float32", "bfloat16")
    assert result["auto"]["memory_format"] in ("contiguous", "channels_last")
    for variant in VARIANTS:
        r = result[variant]
        assert 0 < r["min_s"] <= r["step_s"] <= r["max_s"]
    assert result["speedup"] > 0 and result["preset"]["width"] == 2
    # a benchmark writes no run folder
    assert not (tmp_path / "run").exists()
