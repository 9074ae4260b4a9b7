"""Dataset discovery: layouts, roles from shipped / folder / seeded splits, and the errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from dinomix_cache.data.classes import AMOS_CLASSES, SYNAPSE_CASE_IDS, SYNAPSE_CLASSES
from dinomix_cache.data.datasets import discover_dataset
from dinomix_cache.data.roles import ROLES, SplitSettings, parse_labeled, seeded_roles
from dinomix_cache.errors import UserError

# Discovery only looks at names, so empty files stand in for volumes here.


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def shipped(dataset: str, name: str) -> list[str]:
    text = (resources.files("dinomix_cache.data") / "splits" / dataset / name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def synapse_tree(root: Path, ids=SYNAPSE_CASE_IDS, layout: str = "imagesTr") -> Path:
    for cid in ids:
        if layout == "imagesTr":
            touch(root / "imagesTr" / f"img{cid}.nii.gz")
            touch(root / "labelsTr" / f"label{cid}.nii.gz")
        elif layout == "RawData":
            touch(root / "RawData" / "Training" / "img" / f"img{cid}.nii.gz")
            touch(root / "RawData" / "Training" / "label" / f"label{cid}.nii.gz")
        else:
            touch(root / "npy" / f"{cid}_image.npy")
            touch(root / "npy" / f"{cid}_label.npy")
    return root


def roles_of(spec) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {r: set() for r in ROLES}
    for c in spec.cases:
        out[c.role].add(c.case_id)
    return out


@pytest.mark.parametrize("layout", ["imagesTr", "RawData", "npy"])
def test_synapse_layouts_use_shipped_lists(tmp_path, layout):
    spec = discover_dataset("synapse", synapse_tree(tmp_path, layout=layout))
    roles = roles_of(spec)
    assert roles["labeled"] == set(shipped("synapse", "labeled_20p.txt")) == {"0021", "0023", "0028", "0032"}
    assert roles["unlabeled"] == set(shipped("synapse", "unlabeled_20p.txt"))
    assert roles["eval"] == set(shipped("synapse", "eval.txt"))
    assert roles["test"] == {"0008", "0027", "0029", "0033", "0037", "0039"}
    assert spec.class_names == SYNAPSE_CLASSES
    assert [c.case_id for c in spec.cases] == sorted(SYNAPSE_CASE_IDS)
    assert spec.split["source"] == "shipped:synapse" and spec.split["labeled"] == "20p"
    assert spec.split["counts"] == {"labeled": 4, "unlabeled": 16, "eval": 4, "test": 6}
    assert set(spec.split["files"]) == {"train.txt", "eval.txt", "test.txt", "labeled_20p.txt",
                                        "unlabeled_20p.txt"}
    case = next(c for c in spec.cases if c.case_id == "0001")
    assert case.fmt == ("npy" if layout == "npy" else "nifti")
    assert case.label is not None and case.label.exists()
    if layout == "RawData":
        assert case.image == tmp_path / "RawData" / "Training" / "img" / "img0001.nii.gz"


def test_synapse_other_labeled_shares_and_refusal(tmp_path):
    root = synapse_tree(tmp_path)
    assert len(roles_of(discover_dataset("synapse", root, SplitSettings(labeled="10p")))["labeled"]) == 2
    assert len(roles_of(discover_dataset("synapse", root, SplitSettings(labeled="40p")))["labeled"]) == 8
    with pytest.raises(UserError, match="10p, 20p, 40p"):
        discover_dataset("synapse", root, SplitSettings(labeled="30p"))


def test_synapse_unlisted_and_missing(tmp_path):
    root = synapse_tree(tmp_path, ids=[*SYNAPSE_CASE_IDS, "0011"])
    spec = discover_dataset("synapse", root)
    assert spec.split["unlisted"] == ["0011"]
    assert "0011" not in {c.case_id for c in spec.cases}

    (root / "imagesTr" / "img0004.nii.gz").unlink()
    with pytest.raises(UserError, match="img0004.nii.gz") as err:
        discover_dataset("synapse", root)
    assert str(root / "imagesTr") in str(err.value)
    # A subset that avoids the missing case works.
    spec = discover_dataset("synapse", root, case_ids=["0001", "0021"])
    assert {(c.case_id, c.role) for c in spec.cases} == {("0001", "unlabeled"), ("0021", "labeled")}


def test_image_without_label(tmp_path):
    root = synapse_tree(tmp_path)
    (root / "labelsTr" / "label0021.nii.gz").unlink()
    with pytest.raises(UserError, match="img0021.nii.gz has no label"):
        discover_dataset("synapse", root)


def test_case_ids_restriction_keeps_roles(tmp_path):
    root = synapse_tree(tmp_path)
    spec = discover_dataset("synapse", root, case_ids=["0035", "0008"])
    assert [(c.case_id, c.role) for c in spec.cases] == [("0008", "test"), ("0035", "eval")]
    assert spec.split["case_ids"] == ["0008", "0035"]
    with pytest.raises(UserError, match="9999"):
        discover_dataset("synapse", root, case_ids=["0001", "9999"])


def test_bad_roots_and_names(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass --data DIR"):
        discover_dataset("synapse", tmp_path / "nowhere")
    searched = r"no synapse cases found .*imagesTr/img\*\.nii\.gz.*npy/\*_image\.npy"
    with pytest.raises(UserError, match=searched):
        discover_dataset("synapse", tmp_path)
    with pytest.raises(UserError, match="unknown dataset 'brats'"):
        discover_dataset("brats", tmp_path)


def test_to_json_is_portable(tmp_path):
    spec = discover_dataset("synapse", synapse_tree(tmp_path))
    doc = json.loads(json.dumps(spec.to_json()))
    assert doc["name"] == "synapse" and doc["class_names"][0] == "background"
    first = doc["cases"][0]
    assert first == {"id": "0001", "role": "unlabeled", "image": "imagesTr/img0001.nii.gz",
                     "label": "labelsTr/label0001.nii.gz", "fmt": "nifti"}


def test_split_dir_overrides_shipped(tmp_path):
    root = synapse_tree(tmp_path / "data", ids=["0001", "0002", "0003", "0004", "0005"])
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    for name, ids in {"labeled": ["0001"], "unlabeled": ["0002", "0003"], "eval": ["0004"],
                      "test": ["0005"]}.items():
        (split_dir / f"{name}.txt").write_text("# my split\n" + "\n".join(ids) + "\n")
    spec = discover_dataset("synapse", root, SplitSettings(split_dir=split_dir))
    assert roles_of(spec) == {"labeled": {"0001"}, "unlabeled": {"0002", "0003"}, "eval": {"0004"},
                              "test": {"0005"}}
    assert spec.split["source"] == f"dir:{split_dir}"
    (split_dir / "eval.txt").write_text("0004\n0001\n")
    with pytest.raises(UserError, match="both labeled and eval"):
        discover_dataset("synapse", root, SplitSettings(split_dir=split_dir))


def amos_tree(root: Path) -> Path:
    for cid in set(shipped("amos", "train.txt")) | set(shipped("amos", "eval.txt")):
        touch(root / "imagesTr" / f"{cid}.nii.gz")
        touch(root / "labelsTr" / f"{cid}.nii.gz")
    for cid in shipped("amos", "test.txt"):
        touch(root / "imagesVa" / f"{cid}.nii.gz")
        touch(root / "labelsVa" / f"{cid}.nii.gz")
    return root


def test_amos_shipped_lists_and_20p_refusal(tmp_path):
    root = amos_tree(tmp_path)
    spec = discover_dataset("amos", root)
    roles = roles_of(spec)
    assert spec.class_names == AMOS_CLASSES and len(spec.class_names) == 16
    assert spec.split["labeled"] == "5p"
    assert roles["labeled"] == set(shipped("amos", "labeled_5p.txt"))
    assert {k: len(v) for k, v in roles.items()} == {"labeled": 10, "unlabeled": 206, "eval": 24, "test": 120}
    test_case = next(c for c in spec.cases if c.role == "test")
    assert test_case.image.parent.name == "imagesVa" and test_case.label.parent.name == "labelsVa"
    assert len(roles_of(discover_dataset("amos", root, SplitSettings(labeled="2p")))["labeled"]) == 4
    with pytest.raises(UserError, match="inconsistent") as err:
        discover_dataset("amos", root, SplitSettings(labeled="20p"))
    assert "\n" not in str(err.value)


def msd_tree(root: Path, labels: dict, ids, nnunet: bool = True, extra: dict | None = None) -> Path:
    meta = {"labels": labels, "file_ending": ".nii.gz", **(extra or {})}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for cid in ids:
        touch(root / "imagesTr" / (f"{cid}_0000.nii.gz" if nnunet else f"{cid}.nii.gz"))
        touch(root / "labelsTr" / f"{cid}.nii.gz")
    return root


def test_msd_nnunet_v2_seeded(tmp_path):
    ids = [f"liver_{i:03d}" for i in range(10)]
    root = msd_tree(tmp_path, {"background": 0, "liver": 1, "tumour": 2}, ids,
                    extra={"channel_names": {"0": "CT"}})
    touch(root / "imagesTs" / "liver_900_0000.nii.gz")
    spec = discover_dataset("msd", root, SplitSettings(seed=3))
    assert spec.class_names == ("background", "liver", "tumour")
    assert spec.split["source"] == "seeded" and spec.split["seed"] == 3 and spec.split["labeled"] == "20p"
    assert spec.split["channel"] == "CT"
    expected = seeded_roles(ids, 0.2, 0.134, 0.2, 3)
    assert {c.case_id: c.role for c in spec.cases if c.label is not None} == expected
    ts = next(c for c in spec.cases if c.case_id == "liver_900")
    assert ts.role == "unlabeled" and ts.label is None
    assert spec.split["unlabeled_only"] == ["liver_900"]
    assert discover_dataset("msd", root, SplitSettings(seed=4)).split["seed"] == 4


def test_msd_v1_labels_and_plain_names(tmp_path):
    ids = ["spleen_2", "spleen_3", "spleen_8", "spleen_9", "spleen_10"]
    root = msd_tree(tmp_path, {"0": "background", "1": "spleen"}, ids, nnunet=False,
                    extra={"modality": {"0": "CT"}})
    touch(root / "imagesTr" / "._spleen_2.nii.gz")  # macOS junk shipped in the MSD tarballs
    spec = discover_dataset("msd", root)
    assert spec.class_names == ("background", "spleen")
    assert sorted(c.case_id for c in spec.cases) == sorted(ids)
    assert all(c.label is not None for c in spec.cases)
    assert {c.role for c in spec.cases} == set(ROLES)


def test_msd_split_dir(tmp_path):
    ids = ["a_001", "a_002", "a_003", "a_004"]
    root = msd_tree(tmp_path / "task", {"background": 0, "organ": 1}, ids)
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    for name, members in {"labeled": ["a_001"], "unlabeled": ["a_002"], "eval": ["a_003"],
                          "test": ["a_004"]}.items():
        (split_dir / f"{name}.txt").write_text("\n".join(members))
    spec = discover_dataset("msd", root, SplitSettings(split_dir=split_dir))
    assert {c.case_id: c.role for c in spec.cases} == {"a_001": "labeled", "a_002": "unlabeled",
                                                        "a_003": "eval", "a_004": "test"}
    assert spec.split["source"].startswith("dir:")


@pytest.mark.parametrize(
    ("labels", "extra", "match"),
    [
        ({"background": 0, "whole": [1, 2], "core": 2}, {}, "region-based"),
        ({"background": 0, "liver": 2}, {}, "not 0..1"),
        ({"background": 0, "liver": 1}, {"channel_names": {"0": "T1", "1": "T2"}}, "2 input channels"),
        ({"background": 0, "liver": 1}, {"file_ending": ".nrrd"}, "only NIfTI"),
    ],
)
def test_msd_bad_dataset_json(tmp_path, labels, extra, match):
    root = msd_tree(tmp_path, labels, ["c_001"], extra=extra)
    with pytest.raises(UserError, match=match) as err:
        discover_dataset("msd", root)
    assert "dataset.json" in str(err.value)


def test_msd_multichannel_and_missing_json(tmp_path):
    root = msd_tree(tmp_path / "t", {"background": 0, "liver": 1}, ["c_001", "c_002"])
    touch(root / "imagesTr" / "c_001_0001.nii.gz")
    with pytest.raises(UserError, match=r"c_001_0001\.nii\.gz is input channel 1"):
        discover_dataset("msd", root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="dataset.json does not exist"):
        discover_dataset("msd", tmp_path / "empty")


def test_phantom_seeded_and_shipped(tmp_path):
    few = ["0001", "0002", "0003", "0004", "0005", "0006"]
    spec = discover_dataset("phantom", synapse_tree(tmp_path / "few", ids=few))
    assert spec.class_names == SYNAPSE_CLASSES
    assert spec.split["source"] == "seeded"
    assert spec.split["counts"] == {"labeled": 1, "unlabeled": 3, "eval": 1, "test": 1}
    spec = discover_dataset("phantom", synapse_tree(tmp_path / "full"))
    assert spec.split["source"] == "shipped:synapse"
    assert roles_of(spec)["labeled"] == set(shipped("synapse", "labeled_20p.txt"))


def test_seeded_roles_properties():
    ids = [f"{i:04d}" for i in range(30)]
    roles = seeded_roles(ids, 0.2, 0.134, 0.2, seed=0)
    counts = {r: list(roles.values()).count(r) for r in ROLES}
    assert counts == {"labeled": 4, "unlabeled": 16, "eval": 4, "test": 6}  # Synapse's 20/4/6 and 20 %
    assert roles == seeded_roles(list(reversed(ids)), 0.2, 0.134, 0.2, seed=0)  # order-free, reproducible
    assert roles != seeded_roles(ids, 0.2, 0.134, 0.2, seed=1)
    for n in range(1, 12):
        got = list(seeded_roles(ids[:n], 0.2, 0.134, 0.2, seed=5).values())
        assert got.count("labeled") >= 1
        if n >= 4:
            assert set(got) == set(ROLES), n
    with pytest.raises(UserError):
        seeded_roles(ids, 0.2, 0.6, 0.5, seed=0)
    assert parse_labeled("20p") == pytest.approx(0.2)
    with pytest.raises(UserError, match="<N>p"):
        parse_labeled("20%")


def test_split_dir_in_shipped_format(tmp_path):
    root = synapse_tree(tmp_path / "data", ids=["0001", "0002", "0003", "0004", "0005", "0006"])
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    lists = {"train": ["0001", "0002", "0003", "0004"], "eval": ["0005"], "test": ["0006"],
             "labeled_20p": ["0001"], "unlabeled_20p": ["0002", "0003", "0004"]}
    for name, ids in lists.items():
        (split_dir / f"{name}.txt").write_text("\n".join(ids))
    spec = discover_dataset("synapse", root, SplitSettings(split_dir=split_dir))  # default 20p
    assert spec.split["labeled"] == "20p" and spec.split["counts"]["unlabeled"] == 3
    with pytest.raises(UserError, match="labeled_10p.txt"):
        discover_dataset("synapse", root, SplitSettings(split_dir=split_dir, labeled="10p"))
    (split_dir / "unlabeled_20p.txt").write_text("0002\n0003\n")
    with pytest.raises(UserError, match="do not equal train.txt"):
        discover_dataset("synapse", root, SplitSettings(split_dir=split_dir))
