"""Evaluation figures: organ colours, the Dice bar chart and the qualitative slice figure as readable PNGs,
the automatic slice choice, and input errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from dinomix_cache.data.classes import AMOS_ABBREVIATIONS, AMOS_CLASSES, SYNAPSE_ABBREVIATIONS, SYNAPSE_CLASSES
from stage2_train.evaluate.colours import ORGAN_COLOURS, colour_table, organ_colour
from stage2_train.evaluate.dice_chart import dice_bar_chart
from stage2_train.evaluate.slice_figure import choose_slices, qualitative_figure

SYN_FG = list(SYNAPSE_ABBREVIATIONS[1:])


def read_png(path: Path) -> np.ndarray:
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.05, "picture is blank"
    # no temp file left next to it
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    return img


def has_colour(img: np.ndarray, rgb, tol: float = 3 / 255) -> bool:
    return bool((np.abs(img[..., :3] - np.asarray(rgb)) <= tol).all(axis=-1).any())


# ----------------------------------------------------------------------------------------------
# colours
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [SYNAPSE_CLASSES, AMOS_CLASSES, ("bg", *ORGAN_COLOURS)])
def test_organ_colours_distinct_and_not_grey(names):
    colours = np.array([organ_colour(n, i) for i, n in enumerate(names) if i > 0])
    assert len(colours) == len(names) - 1
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)]
    assert min(dists) > 0.25
    # far from grey, so a half-transparent overlay stays visible on CT
    assert (colours.max(axis=1) - colours.min(axis=1)).min() > 0.3
    assert ((colours >= 0) & (colours <= 1)).all()


def test_organ_colour_lookup_by_name_alias_and_fallback():
    assert organ_colour("Li", 6) == organ_colour("liver", 99) == ORGAN_COLOURS["liver"]
    assert organ_colour("kidney_right", 1) == organ_colour("Right Kidney", 7) == ORGAN_COLOURS["right_kidney"]
    assert organ_colour("IVC", 9) == ORGAN_COLOURS["inferior_vena_cava"]
    # same organ, different index in the two datasets: same colour
    assert organ_colour(SYNAPSE_CLASSES[11], 11) == organ_colour(AMOS_CLASSES[10], 10)
    # colour conventions: aorta red, IVC blue
    r, g, b = ORGAN_COLOURS["aorta"]
    assert r > 0.8 and g < 0.2 and b < 0.2
    r, g, b = ORGAN_COLOURS["inferior_vena_cava"]
    assert b > 0.8 and r < 0.3
    unknown = np.array([organ_colour("thing", i) for i in range(1, 19)])
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(unknown, 2)) > 0.25
    assert (unknown.max(axis=1) - unknown.min(axis=1)).min() > 0.3
    table = colour_table(AMOS_CLASSES)
    assert table.shape == (16, 3) and (table[0] == 0).all()


# ----------------------------------------------------------------------------------------------
# bar chart
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runs", [1, 3])
def test_dice_bar_chart_png(tmp_path, runs):
    rng = np.random.default_rng(runs)
    per_run = rng.uniform(30, 95, (runs, len(SYN_FG)))
    per_run[:, 11] = np.nan  # RAG absent in every case
    mean = per_run.mean(axis=0)
    std = per_run.std(axis=0) if runs > 1 else None
    out = dice_bar_chart(tmp_path / "dice.png", SYN_FG, mean, std, [f"seed {k}" for k in range(runs)], per_run,
                         title="test")
    assert out == tmp_path / "dice.png"
    img = read_png(out)
    assert img.shape[1] > img.shape[0] > 300
    # bars are filled with the organ colour (found via the abbreviation)
    for name in ("liver", "aorta", "inferior_vena_cava"):
        assert has_colour(img, ORGAN_COLOURS[name])
    # the NaN class draws no bar
    assert not has_colour(img, ORGAN_COLOURS["right_adrenal_gland"])


def test_dice_bar_chart_without_runs_and_all_nan(tmp_path):
    read_png(dice_bar_chart(tmp_path / "a.png", ["Li", "Sp"], np.array([80.0, 70.0]), None))
    (tmp_path / "a.png").unlink()
    read_png(dice_bar_chart(tmp_path / "b.png", ["Li", "Sp"], np.array([np.nan, np.nan]), np.array([1.0, 1.0])))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=[], dice_mean=np.zeros(0), dice_std=None), "empty"),
        (dict(class_labels=SYN_FG, dice_mean=np.zeros(14), dice_std=None), "dice_mean"),
        (dict(class_labels=SYN_FG, dice_mean=np.zeros(13), dice_std=np.zeros(12)), "dice_std"),
        (dict(class_labels=SYN_FG, dice_mean=np.zeros(13), dice_std=None, per_run=np.zeros((2, 12))), "per_run"),
        (dict(class_labels=SYN_FG, dice_mean=np.zeros(13), dice_std=None, per_run=np.zeros((2, 13)),
              run_labels=["a"]), "run_labels"),
    ],
)
def test_dice_bar_chart_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dice_bar_chart(tmp_path / "x.png", **kwargs)
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------
# slice choice
# ----------------------------------------------------------------------------------------------


def organ_volume(depth: int = 30) -> np.ndarray:
    """Liver (1) everywhere, kidney (2) in 5..24, adrenal (3, rarest) in 21..22, gallbladder (4) in 3 only."""
    lab = np.zeros((depth, 20, 20), dtype=np.int64)
    lab[:, 2:12, 2:12] = 1
    lab[5:25, 14:18, 14:18] = 2
    lab[21:23, 14:16, 2:4] = 3
    lab[3, 14:17, 5:8] = 4
    return lab


def test_choose_slices_shows_rare_organs_spread_apart():
    lab = organ_volume()
    picked = choose_slices(lab, count=3)
    assert picked == sorted(picked) and len(set(picked)) == 3
    assert any(z in (21, 22) for z in picked)  # adrenal
    assert 3 in picked  # gallbladder
    min_gap = 30 // 6
    assert all(b - a >= min_gap for a, b in itertools.pairwise(picked))
    # every organ is on one of the picked slices
    assert set(np.unique(lab[picked])) == {0, 1, 2, 3, 4}


def test_choose_slices_rare_first_vs_most_organs():
    lab = np.zeros((20, 10, 10), dtype=np.int64)
    lab[:, :5, :5] = 1
    lab[2, 6:8, 6:8] = 2  # rare, on its own slice
    lab[15, 6:, :] = 3  # larger classes together on slice 15
    lab[15, :5, 6:] = 4
    assert choose_slices(lab, count=1, rare_first=True) == [2]
    assert choose_slices(lab, count=1, rare_first=False) == [15]


def test_choose_slices_edge_cases():
    assert choose_slices(np.zeros((10, 4, 4), dtype=np.int64), count=3) == [0, 4, 9]  # no foreground
    lab = np.zeros((2, 4, 4), dtype=np.int64)
    lab[1, 0, 0] = 1
    assert choose_slices(lab, count=5) == [0, 1]  # at most D slices, padded with background ones
    with pytest.raises(ValueError, match="count"):
        choose_slices(lab, count=0)
    with pytest.raises(ValueError, match="D, H, W"):
        choose_slices(np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="integral"):
        choose_slices(np.full((2, 2, 2), 0.5))


# ----------------------------------------------------------------------------------------------
# qualitative figure
# ----------------------------------------------------------------------------------------------


def ct_case(depth: int = 30):
    lab = organ_volume(depth)
    z, y, x = np.mgrid[0:depth, 0:20, 0:20]
    image = 0.2 + 0.4 * x / 20 + 0.2 * (lab > 0)
    pred = lab.copy()
    pred[lab == 3] = 0  # missed adrenal
    pred[10, 14:16, 5:7] = 4  # false gallbladder
    return image, lab, pred


def test_qualitative_figure_png_auto_slices(tmp_path):
    image, lab, pred = ct_case()
    names = ["background", "liver", "right_kidney", "right_adrenal_gland", "gallbladder"]
    abbrs = ["BG", "Li", "RK", "RAG", "Ga"]
    out = qualitative_figure(tmp_path / "q.png", image, lab, pred, names, abbrs, title="case")
    img = read_png(out)
    assert img.shape[0] > 600 and img.shape[1] > 900
    assert has_colour(img, ORGAN_COLOURS["right_adrenal_gland"])  # legend patch of the rare organ


def test_qualitative_figure_explicit_slices_synapse_names(tmp_path):
    image, lab, pred = ct_case()
    out = qualitative_figure(tmp_path / "q.png", image, lab, pred, list(SYNAPSE_CLASSES),
                             list(SYNAPSE_ABBREVIATIONS), slices=[4, 21])
    read_png(out)


def test_qualitative_figure_amos_names_and_empty_labels(tmp_path):
    image = np.linspace(0, 1, 4 * 8 * 8).reshape(4, 8, 8)
    zeros = np.zeros((4, 8, 8), dtype=np.int64)
    read_png(qualitative_figure(tmp_path / "q.png", image, zeros, zeros, list(AMOS_CLASSES),
                                list(AMOS_ABBREVIATIONS)))


def test_qualitative_figure_errors(tmp_path):
    image, lab, pred = ct_case()
    names, abbrs = list(SYNAPSE_CLASSES), list(SYNAPSE_ABBREVIATIONS)
    with pytest.raises(ValueError, match="shapes differ"):
        qualitative_figure(tmp_path / "q.png", image, lab[:-1], pred, names, abbrs)
    with pytest.raises(ValueError, match="shapes differ"):
        qualitative_figure(tmp_path / "q.png", image, lab, pred[:, :-1], names, abbrs)
    with pytest.raises(ValueError, match="non-empty"):
        qualitative_figure(tmp_path / "q.png", np.zeros((0, 4, 4)), lab[:0, :4, :4], pred[:0, :4, :4], names,
                           abbrs)
    with pytest.raises(ValueError, match="labels"):
        qualitative_figure(tmp_path / "q.png", image, lab, pred, names, abbrs[:-1])
    with pytest.raises(ValueError, match=r"0 \.\. 2"):
        qualitative_figure(tmp_path / "q.png", image, lab, pred, names[:3], abbrs[:3])
    with pytest.raises(ValueError, match="outside"):
        qualitative_figure(tmp_path / "q.png", image, lab, pred, names, abbrs, slices=[0, 30])
    with pytest.raises(ValueError, match="no slices"):
        qualitative_figure(tmp_path / "q.png", image, lab, pred, names, abbrs, slices=[])
    assert list(tmp_path.iterdir()) == []
