"""The training state: one generator per purpose, saved and restored exactly; older checkpoints resume."""

from __future__ import annotations

import numpy as np
import torch

from stage2_train.train.state import NUMPY_STREAMS, TORCH_STREAMS, TrainState


def test_streams_are_independent_and_round_trip():
    state = TrainState.seeded(3)
    assert set(state.rngs) == set(NUMPY_STREAMS) and set(state.gens) == set(TORCH_STREAMS)
    draws = {k: g.integers(0, 1 << 30, 3).tolist() for k, g in state.rngs.items()}
    assert len({tuple(v) for v in draws.values()}) == len(NUMPY_STREAMS)  # no two streams alike
    saved = state.to_dict()
    again = TrainState.from_dict(saved)
    for k in NUMPY_STREAMS:
        assert again.rngs[k].integers(0, 1 << 30, 5).tolist() == state.rngs[k].integers(0, 1 << 30, 5).tolist()
    for k in TORCH_STREAMS:
        assert torch.equal(torch.rand(4, generator=again.gens[k]), torch.rand(4, generator=state.gens[k]))


def test_a_single_generator_checkpoint_resumes_its_sequence():
    # A checkpoint written when one numpy and one torch generator drew everything, in this order.
    np_rng, gen = np.random.default_rng(5), torch.Generator().manual_seed(5)
    old = {"epoch": 0, "iteration": 0, "step": 0, "plan": [], "best_dice": -1.0,
           "np_rng": np_rng.bit_generator.state, "torch_gen": gen.get_state(), "torch_global": torch.get_rng_state()}
    state = TrainState.from_dict(old)
    # Every stream is that one generator: the draws continue its sequence whatever purpose draws.
    got = [state.rngs["plan"].integers(100), state.rngs["labeled_crops"].integers(100), state.rngs["pic"].integers(100)]
    assert got == [int(v) for v in np_rng.integers(100, size=3)]
    assert torch.equal(torch.rand(2, generator=state.gens["aux"]), torch.rand(2, generator=gen))
    saved = state.to_dict()  # and it is written back in that form
    assert "np_rng" in saved and "rngs" not in saved
    assert TrainState.from_dict(saved).rngs["unlabeled_crops"].integers(1 << 30) == np_rng.integers(1 << 30)
