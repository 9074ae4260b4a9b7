"""Shared fixtures: a tiny phantom dataset and extraction settings that run in seconds on CPU."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from dinomix_cache.data.preprocess import PreprocessSettings  # noqa: E402
from dinomix_cache.phantom.generate import PhantomSettings, generate_phantom  # noqa: E402
from dinomix_cache.store.feature_store import StoreSettings  # noqa: E402
from dinomix_cache.teacher.model import TeacherSettings  # noqa: E402
from stage1_extract.settings import ExtractSettings  # noqa: E402

# Six small phantom cases (ids 0001-0006, so roles come from a seeded split): one labeled,
# three unlabeled, one eval, one test.
TINY_PHANTOM = PhantomSettings(case_ids=tuple(f"{i:04d}" for i in range(1, 7)), matrix=48)
TINY_SHAPE = (16, 32, 32)  # (D, H, W): 2 x 2 token grid with a patch-16 teacher


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, TINY_PHANTOM, progress=False)
    return root


def tiny_settings(data: Path, out: Path, **changes) -> ExtractSettings:
    """Settings of a fast extraction of the tiny phantom with the random tiny DINOv3."""
    base = ExtractSettings(
        dataset="phantom",
        data=data,
        out=out,
        phantom=TINY_PHANTOM,
        preprocess=PreprocessSettings(target_shape=TINY_SHAPE),
        teacher=TeacherSettings(source="random:tiny"),
        storage=StoreSettings(chunk_slices=4),
        batch_size=12,
        progress=False,
    )
    return replace(base, **changes)


@pytest.fixture(scope="session")
def good_store(phantom_dir, tmp_path_factory) -> Path:
    """A complete tiny store (the six phantom cases at 16 x 32 x 32, random:tiny); never changed: copy it to
    damage it."""
    from stage1_extract.runner import run_extraction

    out = tmp_path_factory.mktemp("good") / "s.zarr"
    run_extraction(tiny_settings(phantom_dir, out))
    return out


@pytest.fixture(scope="session")
def good_run(good_store, tmp_path_factory) -> Path:
    """A run folder trained one step from ``good_store`` (settings.json, store.json, latest.pt, best.pt);
    never changed: copy it to damage it."""
    from stage2_train.train.loop import train
    from stage2_train.train.settings import TrainSettings

    settings = TrainSettings(cache=good_store, out=tmp_path_factory.mktemp("good-run") / "run", width=2,
                             crop=(16, 32, 32), epochs=1, checkpoint_every=1, targets="cache", dropout=False)
    return train(settings, max_steps=1)
