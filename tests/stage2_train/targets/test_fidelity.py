"""The fidelity instruments: target cosine, and the teachers' context sensitivity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinomix_cache.data.datasets import discover_dataset
from dinomix_cache.data.preprocess import PreprocessSettings, load_case
from dinomix_cache.data.roles import SplitSettings
from dinomix_cache.teacher.model import TeacherSettings, load_teacher
from stage2_train.targets.fidelity import context_cosine, cosine_fidelity
from tests.tiny import TINY_PHANTOM


def test_cosine_fidelity():
    a = torch.randn(2, 8, 1, 2, 2)
    assert cosine_fidelity(a, a) == pytest.approx(1.0)
    assert cosine_fidelity(a, -a) == pytest.approx(-1.0)
    assert cosine_fidelity(a, 3 * a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_fidelity(a, a[:1])


@pytest.fixture(scope="module")
def slices(phantom_dir) -> np.ndarray:
    """Four 64×64 phantom slices (4×4 tokens at patch 16) through the middle of a case."""
    spec = discover_dataset("phantom", phantom_dir, SplitSettings())
    case = load_case(spec.cases[0], PreprocessSettings(target_shape=(16, 64, 64)), len(spec.class_names))
    assert len(spec.cases) == len(TINY_PHANTOM.case_ids)
    return case.image[6:10].astype(np.float32)


@pytest.mark.parametrize(("name", "low", "high"), [("tiny", 0.99, 1.0), ("vits16", 0.99, 1.0),
                                                   ("ctx-tiny", 0.0, 0.9), ("ctx-vits16", 0.0, 0.9)])
def test_context_cosine_tells_the_teachers_apart(slices, name, low, high):
    # The context-free teachers would make every fidelity figure 1.0; the ctx-* ones would not.
    teacher = load_teacher(TeacherSettings(source=f"random:{name}", device="cpu"))
    assert low <= context_cosine(teacher, slices) <= high + 1e-6


def test_context_cosine_needs_a_window(slices):
    teacher = load_teacher(TeacherSettings(source="random:tiny", device="cpu"))
    with pytest.raises(ValueError, match="no window"):
        context_cosine(teacher, slices[:, :32, :32])
