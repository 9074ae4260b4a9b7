"""Stage two sampling: the cases of each iteration."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from stage2_train.sampling.iteration_sampler import IterationSampler

# ----------------------------------------------------------------------------- iteration sampler

LAB = [f"L{i}" for i in range(4)]
UNL = [f"U{i:02d}" for i in range(16)]


def test_sampler_epoch_structure():
    sampler = IterationSampler(LAB, UNL, 2, 2)
    assert sampler.iterations_per_epoch() == 8 and not sampler.labeled_only
    epoch = sampler.epoch(np.random.default_rng(0))
    assert len(epoch) == 8
    assert all(len(lab) == 2 and len(unl) == 2 for lab, unl in epoch)
    unl_seen = [c for _, unl in epoch for c in unl]
    assert sorted(unl_seen) == UNL  # every unlabeled case exactly once
    lab_counts = Counter(c for lab, _ in epoch for c in lab)
    assert set(lab_counts) <= set(LAB) and all(lab_counts[c] == 4 for c in LAB)


def test_sampler_shuffles_and_drops_incomplete_group():
    sampler = IterationSampler(LAB, UNL[:7], 2, 2)
    assert sampler.iterations_per_epoch() == 3
    seen = Counter()
    for seed in range(50):
        epoch = sampler.epoch(np.random.default_rng(seed))
        unl = [c for _, u in epoch for c in u]
        assert len(unl) == 6 == len(set(unl))
        seen.update(unl)
        lab_counts = Counter(c for lab, _ in epoch for c in lab)
        assert sum(lab_counts.values()) == 6 and max(lab_counts.values()) - min(lab_counts[c] for c in LAB) <= 1
    assert set(seen) == set(UNL[:7])  # the dropped case changes from epoch to epoch
    orders = {tuple(c for _, u in IterationSampler(LAB, UNL).epoch(np.random.default_rng(s)) for c in u)
              for s in range(5)}
    assert len(orders) == 5


def test_sampler_labeled_repetition_more_than_labeled_set():
    # 1 labeled case, 2 per iteration: the case fills both places (DHC's repetition does the same).
    epoch = IterationSampler(["L"], UNL[:4]).epoch(np.random.default_rng(0))
    assert epoch == [(["L", "L"], epoch[0][1]), (["L", "L"], epoch[1][1])]


def test_sampler_labeled_only():
    sampler = IterationSampler(LAB + ["L4"], [], n_labeled=2)
    assert sampler.labeled_only and sampler.iterations_per_epoch() == 2
    epoch = sampler.epoch(np.random.default_rng(1))
    assert len(epoch) == 2 and all(unl == [] and len(lab) == 2 for lab, unl in epoch)
    lab = [c for lab, _ in epoch for c in lab]
    assert len(set(lab)) == 4 and set(lab) <= set(LAB + ["L4"])


def test_sampler_determinism():
    sampler = IterationSampler(LAB, UNL)
    rng = np.random.default_rng(42)
    sampler.epoch(rng)
    state = rng.bit_generator.state
    expected = [sampler.epoch(rng) for _ in range(3)]
    resumed = np.random.default_rng(0)
    resumed.bit_generator.state = state
    assert [sampler.epoch(resumed) for _ in range(3)] == expected
    assert sampler.epoch(np.random.default_rng(1)) == sampler.epoch(np.random.default_rng(1))
    assert sampler.epoch(np.random.default_rng(1)) != sampler.epoch(np.random.default_rng(2))


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="no labeled"):
        IterationSampler([], UNL)
    with pytest.raises(ValueError, match="duplicate"):
        IterationSampler(["a", "a"], UNL)
    with pytest.raises(ValueError, match="n_labeled"):
        IterationSampler(LAB, UNL, 0, 2)
    with pytest.raises(ValueError, match="fewer than n_unlabeled"):
        IterationSampler(LAB, ["U"], 2, 2)
    with pytest.raises(ValueError, match="fewer than n_labeled"):
        IterationSampler(["L"], [], 2, 2)
