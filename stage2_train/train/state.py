"""The training state a checkpoint holds besides the networks: position in the run, epoch plans, best
validation Dice and every random generator, so that a resumed run draws exactly what it would have.

Each purpose draws from a generator of its own (:data:`NUMPY_STREAMS`, :data:`TORCH_STREAMS`), so
two runs at one seed that differ by a switch (``--no-pic``, ``--no-aux``, ``--labeled-only``) still
see the same cases, crops and gamma draws: a switch that skips its draws leaves the others' alone.

Its own module, below both the iteration (:mod:`stage2_train.method.iteration`, which advances it)
and the checkpointing of :mod:`stage2_train.train.distributed` (which saves and restores it per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["NUMPY_STREAMS", "TORCH_STREAMS", "TrainState"]

# What each generator draws. "plan" is shared by every rank of a distributed run (they must agree on
# which cases an iteration sees); the others are per rank.
NUMPY_STREAMS = ("plan", "labeled_crops", "unlabeled_crops", "pic")
TORCH_STREAMS = ("gamma", "aux")
_PER_RANK = ("labeled_crops", "unlabeled_crops", "pic", "gamma", "aux", "dropout")


def _numpy(seq: np.random.SeedSequence) -> np.random.Generator:
    return np.random.default_rng(seq)


def _torch(seq: np.random.SeedSequence) -> torch.Generator:
    return torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0]))


@dataclass
class TrainState:
    """Everything that changes during training (what a checkpoint holds, besides the networks).

    ``rngs`` holds one numpy generator per name of :data:`NUMPY_STREAMS` (epoch plans, labeled crops,
    unlabeled crops, PIC classes and boxes), ``gens`` one torch generator per name of
    :data:`TORCH_STREAMS` (gamma of the strong view, aux Bernoulli masks). Dropout draws from torch's
    global generator (saved as ``torch_global``).

    A checkpoint written before the generators were split held one numpy and one torch generator for
    everything; :meth:`from_dict` then points every name at those two (same draws in the same order,
    so such a run resumes bit for bit) and :meth:`to_dict` writes them back in that form.
    """

    epoch: int = 0
    iteration: int = 0                     # within the epoch
    step: int = 0                          # over the run
    plan: list[tuple[list[str], list[str]]] = field(default_factory=list)
    rngs: dict[str, np.random.Generator] = field(default_factory=dict)
    gens: dict[str, torch.Generator] = field(default_factory=dict)
    best_dice: float = -1.0

    def __post_init__(self) -> None:
        if not self.rngs or not self.gens:
            seeded = TrainState.seeded(0)
            self.rngs = self.rngs or seeded.rngs
            self.gens = self.gens or seeded.gens

    @classmethod
    def seeded(cls, seed: int, rank: int = 0, world_size: int = 1) -> TrainState:
        """The state at step 0: each stream from its own child of ``SeedSequence(seed)``. The plan stream is
        the same on every rank; the others (and, distributed, torch's global generator, for dropout) are
        rank ``rank``'s own, so that ranks draw different crops reproducibly. A single process keeps torch's
        global generator as the network initialisation left it (seeded with ``seed``)."""
        plan = np.random.SeedSequence(seed, spawn_key=(0,))
        own = dict(zip(_PER_RANK, np.random.SeedSequence(seed, spawn_key=(1, rank)).spawn(len(_PER_RANK)),
                       strict=True))
        if world_size > 1:
            torch.manual_seed(int(own["dropout"].generate_state(1, np.uint64)[0]))
        rngs = {"plan": _numpy(plan), **{k: _numpy(own[k]) for k in NUMPY_STREAMS if k != "plan"}}
        return cls(rngs=rngs, gens={k: _torch(own[k]) for k in TORCH_STREAMS})

    def _legacy(self) -> bool:
        """True when the streams share one generator (restored from a checkpoint of the single-generator format)."""
        shared = {id(self.rngs[k]) for k in NUMPY_STREAMS if k != "plan"}
        return len(shared) == 1 and len({id(g) for g in self.gens.values()}) == 1

    def rng_state(self) -> dict[str, Any]:
        """This process's own generator states (the plan's is the same on every rank)."""
        if self._legacy():
            return {"np_rng": self.rngs["labeled_crops"].bit_generator.state,
                    "torch_gen": self.gens["gamma"].get_state(), "torch_global": torch.get_rng_state()}
        return {"rngs": {k: g.bit_generator.state for k, g in self.rngs.items()},
                "gens": {k: g.get_state() for k, g in self.gens.items()}, "torch_global": torch.get_rng_state()}

    def to_dict(self) -> dict[str, Any]:
        data = {"epoch": self.epoch, "iteration": self.iteration, "step": self.step,
                "plan": [[list(a), list(b)] for a, b in self.plan], "best_dice": self.best_dice, **self.rng_state()}
        if self._legacy() and self.rngs["plan"] is not self.rngs["labeled_crops"]:
            data["plan_rng"] = self.rngs["plan"].bit_generator.state
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Rebuild the state of :meth:`to_dict`, and restore torch's global generator (dropout draws
        from it) to where the checkpoint left it."""
        if data.get("rngs") is not None:
            rngs = {}
            for name, saved in data["rngs"].items():
                rngs[name] = np.random.default_rng()
                rngs[name].bit_generator.state = saved
            gens = {name: torch.Generator() for name in data["gens"]}
            for name, saved in data["gens"].items():
                gens[name].set_state(saved)
        else:  # the single-generator format: every stream is that generator (legacy distributed plans aside)
            shared = np.random.default_rng()
            shared.bit_generator.state = data["np_rng"]
            gen = torch.Generator()
            gen.set_state(data["torch_gen"])
            rngs = dict.fromkeys(NUMPY_STREAMS, shared)
            gens = dict.fromkeys(TORCH_STREAMS, gen)
            if data.get("plan_rng") is not None:
                rngs["plan"] = np.random.default_rng()
                rngs["plan"].bit_generator.state = data["plan_rng"]
        torch.set_rng_state(data["torch_global"])
        plan = [(list(a), list(b)) for a, b in data["plan"]]
        return cls(epoch=data["epoch"], iteration=data["iteration"], step=data["step"], plan=plan,
                   rngs=rngs, gens=gens, best_dice=data["best_dice"])
