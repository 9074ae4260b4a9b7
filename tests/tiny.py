"""Tiny settings shared by the tests: a six-case phantom, its extraction, and a training run that
takes seconds on a CPU. Plain values and functions; the fixtures built from them are in conftest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.phantom.generate import PhantomSettings
from dinomix_cache.store.feature_store import StoreSettings
from dinomix_cache.teacher.anatomy_settings import AnatomyTeacherSettings
from dinomix_cache.teacher.model import TeacherSettings
from stage1_extract.settings import ExtractSettings
from stage2_train.train.settings import TrainSettings

# Six small phantom cases (ids 0001-0006, so roles come from a seeded split): one labeled,
# three unlabeled, one eval, one test.
TINY_PHANTOM = PhantomSettings(case_ids=tuple(f"{i:04d}" for i in range(1, 7)), matrix=48)
TINY_SHAPE = (16, 32, 32)  # (D, H, W): 2 x 2 token grid with a patch-16 teacher
WIDE_SHAPE = (32, 64, 64)  # (D, H, W): 4 x 4 tokens; room for 16 x 32 x 32 crops at several offsets


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


def tiny_train(cache: Path | str, out: Path | None = None, **changes) -> TrainSettings:
    """Settings of a training run of a few seconds on a tiny store: width 2, 16 x 32 x 32 crops,
    4 epochs, a checkpoint every step; ``changes`` replace any field."""
    base = TrainSettings(cache=cache, out=out, width=2, crop=(16, 32, 32), epochs=4, checkpoint_every=1)
    return replace(base, **changes)


def tiny_teacher(data: Path, out: Path, **changes) -> AnatomyTeacherSettings:
    """Settings of a phantom-trained teacher of a few seconds on the tiny phantom at 32 x 64 x 64 (4 x 4 tokens):
    a 2-layer, 64-wide DINOv3, 120 steps of 16 slices, every training case's labels; ``changes`` replace any
    field."""
    base = AnatomyTeacherSettings(data=data, out=out, phantom=TINY_PHANTOM, labels="train",
                                  preprocess=PreprocessSettings(target_shape=WIDE_SHAPE), hidden_size=64, layers=2,
                                  steps=120, batch_size=16, lr=2e-3, progress=False)
    return replace(base, **changes)
