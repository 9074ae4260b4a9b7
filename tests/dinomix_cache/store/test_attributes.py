"""Store attributes: typed views of a store and of a saved copy, the check before appending."""

from __future__ import annotations

import json

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.store.attributes import preprocess_settings
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.schema import check_store_attrs
from tests.toy_meta import toy_meta


def make_meta(cases=(("0001", "labeled"), ("0002", "unlabeled"))) -> dict:
    return toy_meta(None, cases)


def test_typed_views_of_a_store_and_of_its_saved_attributes(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    saved = check_store_attrs(json.loads(json.dumps(store.meta)), "store.json")  # as a run folder keeps it
    assert saved == store.attrs
    assert saved.case_ids("labeled") == ["0001"] and saved.case_ids() == ["0001", "0002"]
    assert saved.dataset.name == "toy" and saved.class_names == ["background", "a", "b"]
    assert saved.teacher.label == "random, not pretrained" and saved.producer.zarr == "test"
    wanted = PreprocessSettings(target_shape=(12, 32, 32), image_dtype="float32")
    assert store.preprocess == preprocess_settings(saved) == wanted
    assert saved.extraction.data is None and not saved.extraction.complete
    store.update_meta(producer=store.attrs.producer.model_copy(update={"created": "later"}))
    assert FeatureStore.open(tmp_path / "s.zarr").attrs.producer.created == "later"


def test_mismatches_name_the_fields_an_extraction_would_change(tmp_path):
    store = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    assert store.mismatches(make_meta()) == []
    hashed = make_meta()
    hashed["dataset"]["cases"][0]["image_sha256"] = "1" * 64  # finishing adds hashes: not a mismatch
    assert store.mismatches(hashed) == []
    wanted = make_meta(cases=(("0001", "unlabeled"), ("0002", "unlabeled")))
    wanted["teacher"]["input_size"] = [16, 16]
    wanted["crop_windows"] = {"size": [32, 32], "positions": [1, 1], "token_grid": [2, 2]}
    assert store.mismatches(wanted) == [
        "teacher.input_size: store [32, 32], requested [16, 16]", "dataset.cases: (differs)",
        "crop_windows: store None, requested {'size': [32, 32], 'positions': [1, 1], 'token_grid': [2, 2]}"]
