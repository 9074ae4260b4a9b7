"""Teacher streams: parallel forwards come back in order and equal the sequential ones."""

from __future__ import annotations

import pytest
import torch

from dinomix_cache.errors import UserError
from dinomix_cache.teacher.model import TeacherSettings, load_teacher
from stage1_extract.streams import streamed_forward


def test_streams_keep_order_and_values():
    teacher = load_teacher(TeacherSettings(source="random:tiny"))
    batches = [(i, torch.rand(3 + i, 32, 32, generator=torch.Generator().manual_seed(i))) for i in range(7)]
    sequential = [(tag, teacher.forward_slices(x)) for tag, x in batches]
    for streams in (1, 2, 3):
        threads_before = torch.get_num_threads()
        got = list(streamed_forward(teacher, iter(batches), streams))
        assert [tag for tag, _ in got] == list(range(7))
        for (_, a), (_, b) in zip(got, sequential, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.get_num_threads() == threads_before  # the caller's thread setting is untouched


def test_streams_propagate_errors():
    teacher = load_teacher(TeacherSettings(source="random:tiny"))
    bad = [(0, torch.rand(2, 32, 32)), (1, torch.rand(2, 30, 30))]  # 30 is not a multiple of the patch
    with pytest.raises(UserError, match="30"):
        list(streamed_forward(teacher, iter(bad), 2))
