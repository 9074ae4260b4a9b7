"""Tests for dinomix_cache.teacher.anatomy_training: the phantom-trained teacher's folder, its determinism and its
label, from the store's attribute to ``info``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.teacher.anatomy_settings import AnatomyTeacherSettings
from dinomix_cache.teacher.anatomy_training import patch_histograms, train_anatomy_teacher
from dinomix_cache.teacher.model import PRETRAINED_LABEL, TeacherSettings, load_teacher
from dinomix_cache.teacher.provenance import PROVENANCE_FILE, trained_label
from tests.corpus import cli
from tests.tiny import TINY_SHAPE, tiny_teacher


def test_patch_histograms_are_the_class_shares_under_each_token():
    labels = torch.zeros(1, 32, 32, dtype=torch.uint8)
    labels[0, :16, :8] = 2  # half of token (0, 0)
    labels[0, 16:, 16:] = 1  # all of token (1, 1)
    shares = patch_histograms(labels, (2, 2), 3)
    assert shares.shape == (1, 4, 3)
    assert torch.allclose(shares[0], torch.tensor([[0.5, 0, 0.5], [1, 0, 0], [1, 0, 0], [0, 1, 0]]))


def test_trained_folder_loads_back_with_its_label_and_identical_tokens(trained_teacher):
    slices = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = (load_teacher(TeacherSettings(source=str(trained_teacher), device="cpu")) for _ in range(2))
    assert torch.equal(a.forward_slices(slices), b.forward_slices(slices))
    assert a.forward_slices(slices).shape == (3, 4, 4, 64)
    record = json.loads((trained_teacher / PROVENANCE_FILE).read_text())
    assert a.label == record["label"] == trained_label("phantom", "train") != PRETRAINED_LABEL
    assert "ORACLE" in a.label and not a.is_random
    ident = a.identity((64, 64))
    assert ident["training"]["oracle"] is True and ident["training"]["labels"] == "train"
    assert set(ident["training"]["cases"]) == {"0001", "0002", "0005", "0006"}  # labeled + unlabeled, never eval/test
    assert ident["weights_sha256"] == record["weights_sha256"]


def test_same_seed_gives_the_same_weights_and_another_seed_others(phantom_dir, tmp_path):
    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        settings = tiny_teacher(phantom_dir, tmp_path / name, seed=seed, steps=3, batch_size=4, labels="labeled")
        train_anatomy_teacher(settings)
        return load_file(tmp_path / name / "model.safetensors")

    first, again, other = weights("a", 0), weights("b", 0), weights("c", 1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_labels_flag_reaches_the_store_and_info(phantom_dir, trained_teacher, tmp_path, caplog):
    from stage1_extract.runner import run_extraction
    from tests.tiny import tiny_settings

    fair = tmp_path / "fair"
    train_anatomy_teacher(tiny_teacher(phantom_dir, fair, steps=1, batch_size=2, labels="labeled"))
    for folder, oracle in ((trained_teacher, True), (fair, False)):
        store = tmp_path / f"{folder.name}.zarr"
        caplog.clear()
        run_extraction(tiny_settings(phantom_dir, store, teacher=TeacherSettings(source=str(folder))))
        # Trained on 64x64 slices, extracted from 32x32 ones: said, not refused.
        assert "was trained on 64x64 slices; this store's are 32x32" in caplog.text
        with FeatureStore.open(store) as opened:
            teacher = opened.attrs.teacher
        assert teacher.training is not None and teacher.training.oracle is oracle
        assert ("ORACLE" in teacher.label) is oracle and teacher.label.endswith("not pretrained") is not oracle
        assert teacher.training.cases == (["0006"] if not oracle else ["0001", "0002", "0005", "0006"])
        shown = cli("info", store)
        assert shown.exit_code == 0 and teacher.label in " ".join(shown.stdout.split())
        assert json.loads(cli("info", store, "--json").stdout)["teacher"]["training"]["oracle"] is oracle


def test_a_stores_teacher_without_training_record_still_opens(good_store):
    with FeatureStore.open(good_store) as store:
        assert store.attrs.teacher.training is None and "training" not in store.meta["teacher"]


@pytest.mark.parametrize("edit", ["label", "weights"])
def test_a_provenance_file_that_does_not_describe_the_weights_is_refused(trained_teacher, tmp_path, edit):
    folder = shutil.copytree(trained_teacher, tmp_path / "vit")
    if edit == "label":  # an oracle relabelled as fair
        record = json.loads((folder / PROVENANCE_FILE).read_text())
        record["label"] = trained_label("phantom", "labeled")
        (folder / PROVENANCE_FILE).write_text(json.dumps(record))
    else:
        from safetensors.torch import save_file

        tensors = load_file(folder / "model.safetensors")
        tensors["norm.weight"] = tensors["norm.weight"] + 1
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=PROVENANCE_FILE):
        load_teacher(TeacherSettings(source=str(folder), device="cpu"))


def test_settings_refuse_an_unknown_label_source():
    with pytest.raises(UserError, match="--labels"):
        AnatomyTeacherSettings(labels="everything")  # type: ignore[arg-type]


def test_the_training_leaves_torch_threads_and_rng_as_they_were(phantom_dir, tmp_path):
    torch.manual_seed(123)
    threads, expected = torch.get_num_threads(), torch.rand(1)
    torch.manual_seed(123)
    train_anatomy_teacher(tiny_teacher(phantom_dir, tmp_path / "t", steps=1, batch_size=2, threads=1,
                                       preprocess=PreprocessSettings(target_shape=TINY_SHAPE)))
    assert torch.get_num_threads() == threads and torch.equal(torch.rand(1), expected)
