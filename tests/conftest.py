"""Shared fixtures: a tiny phantom dataset, stores extracted from it and a run trained from one, each built
once per session and never changed (copy one to change it). The settings behind them are in ``tests.tiny``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from dinomix_cache.data.preprocess import PreprocessSettings  # noqa: E402
from dinomix_cache.phantom.generate import generate_phantom  # noqa: E402
from dinomix_cache.teacher.model import TeacherSettings  # noqa: E402
from tests.tiny import TINY_PHANTOM, TINY_SHAPE, WIDE_SHAPE, tiny_settings, tiny_teacher, tiny_train  # noqa: E402

__all__ = ["TINY_PHANTOM", "TINY_SHAPE", "WIDE_SHAPE", "tiny_settings", "tiny_teacher", "tiny_train"]  # also importable


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, TINY_PHANTOM, progress=False)
    return root


@pytest.fixture(scope="session")
def good_store(phantom_dir, tmp_path_factory) -> Path:
    """A complete tiny store (the six phantom cases at 16 x 32 x 32, random:tiny); never changed: copy it to
    damage it."""
    from stage1_extract.runner import run_extraction

    out = tmp_path_factory.mktemp("good") / "s.zarr"
    run_extraction(tiny_settings(phantom_dir, out))
    return out


@pytest.fixture(scope="session")
def wide_store(phantom_dir, tmp_path_factory) -> Path:
    """A complete tiny store of the six phantom cases at 32 x 64 x 64 (4 x 4 tokens a slice,
    random:tiny); never changed: copy it (``tests.corpus.copy_store``) to change it."""
    from stage1_extract.runner import run_extraction

    out = tmp_path_factory.mktemp("wide") / "s.zarr"
    run_extraction(tiny_settings(phantom_dir, out, preprocess=PreprocessSettings(target_shape=WIDE_SHAPE)))
    return out


@pytest.fixture(scope="session")
def good_run(good_store, tmp_path_factory) -> Path:
    """A run folder trained one step from ``good_store`` (settings.json, store.json, latest.pt, best.pt);
    never changed: copy it to damage it."""
    from stage2_train.train.loop import train

    settings = tiny_train(good_store, tmp_path_factory.mktemp("good-run") / "run", epochs=1, targets="cache",
                          dropout=False)
    return train(settings, max_steps=1)


@pytest.fixture(scope="session")
def trained_teacher(phantom_dir, tmp_path_factory) -> Path:
    """A teacher folder trained for a few seconds on the tiny phantom's training cases (``tests.tiny.tiny_teacher``:
    labels of every training case, so labelled an oracle); never changed: copy it to change it."""
    from dinomix_cache.teacher.anatomy_training import train_anatomy_teacher

    out = tmp_path_factory.mktemp("teacher") / "vit"
    train_anatomy_teacher(tiny_teacher(phantom_dir, out))
    return out


@pytest.fixture(scope="session")
def trained_store(phantom_dir, trained_teacher, tmp_path_factory) -> Path:
    """A complete tiny store of the six phantom cases at 32 x 64 x 64 extracted with ``trained_teacher`` (the
    ``wide_store`` of that teacher); never changed."""
    from stage1_extract.runner import run_extraction

    out = tmp_path_factory.mktemp("trained") / "s.zarr"
    run_extraction(tiny_settings(phantom_dir, out, preprocess=PreprocessSettings(target_shape=WIDE_SHAPE),
                                 teacher=TeacherSettings(source=str(trained_teacher))))
    return out
