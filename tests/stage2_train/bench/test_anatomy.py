"""Tests for stage2_train.bench.anatomy: the token → pixels bookkeeping, and that the probe tells a teacher trained on
the phantom's labels from a random one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from stage2_train.bench.anatomy import anatomy_probe, token_majority
from stage2_train.targets.geometry import TokenGeometry
from tests.corpus import cli, copy_store, edit_attrs, refused


def test_token_majority_follows_the_stored_token_geometry():
    label = np.zeros((1, 48, 48), np.uint8)
    label[0, :24, :24] = 3  # 24 x 24 pixels of 3 in the top-left corner
    # A 48-pixel slice seen at 32 pixels by a patch-16 teacher: 2 x 2 tokens of 24 slice pixels each.
    resized = TokenGeometry(slice_hw=(48, 48), input_hw=(32, 32), grid_hw=(2, 2), patch=16, hidden=8)
    assert token_majority(label, resized, 4).tolist() == [[[3, 0], [0, 0]]]
    # Seen at its own size with patch 16: 3 x 3 tokens; the 24-pixel square is all of token (0, 0) and half of
    # (0, 1), (1, 0) (a tie: background, the lower class) and a quarter of (1, 1).
    native = TokenGeometry(slice_hw=(48, 48), input_hw=(48, 48), grid_hw=(3, 3), patch=16, hidden=8)
    assert token_majority(label, native, 4).tolist() == [[[3, 0, 0], [0, 0, 0], [0, 0, 0]]]


def test_probe_ranks_the_trained_teacher_above_a_random_one(wide_store, trained_store):
    with FeatureStore.open(wide_store) as random_store, FeatureStore.open(trained_store) as store:
        random_result, trained = anatomy_probe(random_store), anatomy_probe(store)
    assert random_result["teacher"]["label"] == "random, not pretrained" and "ORACLE" in trained["teacher"]["label"]
    assert trained["balanced_accuracy"] > random_result["balanced_accuracy"] + 0.1, (trained, random_result)
    assert trained["cases"] == {"train": 4, "test": 1} and trained["tokens"]["test"] == 32 * 16
    assert set(trained["recall"]) == set(trained["classes_present"]) and "background" in trained["recall"]
    # Deterministic: the same figures twice.
    with FeatureStore.open(trained_store) as store:
        again = anatomy_probe(store)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in trained.items() if k != "seconds"}


def test_bench_anatomy_prints_the_teachers_label_and_json(trained_store):
    shown = cli("bench", "anatomy", "--cache", trained_store)
    assert shown.exit_code == 0 and "ORACLE" in shown.stdout and "balanced accuracy" in shown.stdout
    result = json.loads(cli("bench", "anatomy", "--cache", trained_store, "--json").stdout)
    assert 0 <= result["balanced_accuracy"] <= 1 and result["kidney_confusion"].keys() == {"right_as_left",
                                                                                           "left_as_right"}


def test_a_store_without_test_cases_is_refused(good_store, tmp_path):
    def no_test(meta: dict) -> None:
        for case in meta["dataset"]["cases"]:
            case["role"] = "eval" if case["role"] == "test" else case["role"]

    store = edit_attrs(copy_store(good_store, tmp_path / "s.zarr"), no_test)
    refused(cli("bench", "anatomy", "--cache", store), store, "test")
    with FeatureStore.open(store) as opened, pytest.raises(UserError, match="no complete test case"):
        anatomy_probe(opened)
