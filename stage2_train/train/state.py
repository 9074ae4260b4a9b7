"""The training state a checkpoint holds besides the networks: position in the run, epoch plans, best
validation Dice and every random generator, so that a resumed run draws exactly what it would have.

Its own module, below both the iteration (:mod:`stage2_train.method.iteration`, which advances it)
and the checkpointing of :mod:`stage2_train.train.distributed` (which saves and restores it per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Everything that changes during training (what a checkpoint holds, besides the networks).

    ``plan_rng`` draws the epoch plans in a distributed run (seeded alike on every rank, so that all
    ranks agree on the plan while ``np_rng`` crops differently on each); None alone, where ``np_rng``
    draws the plans too.
    """

    epoch: int = 0
    iteration: int = 0                     # within the epoch
    step: int = 0                          # over the run
    plan: list[tuple[list[str], list[str]]] = field(default_factory=list)
    np_rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    torch_gen: torch.Generator = field(default_factory=torch.Generator)
    best_dice: float = -1.0
    plan_rng: np.random.Generator | None = None

    @classmethod
    def seeded(cls, seed: int, rank: int = 0, world_size: int = 1) -> TrainState:
        """The state at step 0. With ``world_size`` > 1, rank ``rank``'s: the shared plan generator
        seeded with ``seed``, the others (and torch's global generator, for dropout) from
        ``SeedSequence(seed, spawn_key=(rank,))``, so that ranks draw different crops reproducibly."""
        if world_size == 1:
            gen = torch.Generator().manual_seed(seed)
            return cls(np_rng=np.random.default_rng(seed), torch_gen=gen)
        crops, gamma, dropout = np.random.SeedSequence(seed, spawn_key=(rank,)).spawn(3)
        torch.manual_seed(int(dropout.generate_state(1, np.uint64)[0]))
        gen = torch.Generator().manual_seed(int(gamma.generate_state(1, np.uint64)[0]))
        return cls(np_rng=np.random.default_rng(crops), torch_gen=gen, plan_rng=np.random.default_rng(seed))

    def rng_state(self) -> dict[str, Any]:
        """This process's own generator states (those that differ between ranks)."""
        return {"np_rng": self.np_rng.bit_generator.state, "torch_gen": self.torch_gen.get_state(),
                "torch_global": torch.get_rng_state()}

    def to_dict(self) -> dict[str, Any]:
        data = {"epoch": self.epoch, "iteration": self.iteration, "step": self.step,
                "plan": [[list(a), list(b)] for a, b in self.plan], "best_dice": self.best_dice,
                **self.rng_state()}
        if self.plan_rng is not None:
            data["plan_rng"] = self.plan_rng.bit_generator.state
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Rebuild the state of :meth:`to_dict`, and restore torch's global generator (dropout draws
        from it) to where the checkpoint left it."""
        rng = np.random.default_rng()
        rng.bit_generator.state = data["np_rng"]
        gen = torch.Generator()
        gen.set_state(data["torch_gen"])
        torch.set_rng_state(data["torch_global"])
        plan = [(list(a), list(b)) for a, b in data["plan"]]
        plan_rng = None
        if data.get("plan_rng") is not None:
            plan_rng = np.random.default_rng()
            plan_rng.bit_generator.state = data["plan_rng"]
        return cls(epoch=data["epoch"], iteration=data["iteration"], step=data["step"], plan=plan,
                   np_rng=rng, torch_gen=gen, best_dice=data["best_dice"], plan_rng=plan_rng)
