"""Data-parallel training with ``torchrun``: one process (rank) per GPU or CPU worker, gradients all-reduced.

Launch (one machine, N processes; ``--standalone`` picks a free rendezvous port)::

    torchrun --standalone --nproc-per-node N -m dinomix_cache train --cache STORE --out runs/NAME
    torchrun --standalone --nproc-per-node N -m dinomix_cache train --resume runs/NAME

A plain ``dinomix-cache train`` (or ``torchrun --nproc-per-node 1``) is the single-process run, unchanged.
The backend is NCCL on GPU (rank r on ``cuda:LOCAL_RANK``) and gloo on CPU.

Rules:

* **Effective batch.** Every rank runs the paper's iteration on its own ``n_labeled + n_unlabeled``
  crops (2 + 2), so one step of N ranks trains on ``N x (2 + 2)`` crops and an epoch (one pass over
  the unlabeled cases) has ``len(unlabeled) // (N x 2)`` steps: 1/N as many. Per-rank memory and the
  BatchNorm batch stay those of the paper's single GPU. Nothing is rescaled automatically: the learning
  rate (0.1), its poly decay per epoch (so the schedule still spans ``E_max`` epochs) and the EMA
  decay per step (0.99) are the single-GPU values; with N times fewer steps the EMA teacher averages
  over N times more epochs. The store needs at least ``N x n_unlabeled`` unlabeled cases (labeled-only
  runs without unlabeled cases: ``N x n_labeled`` labeled ones).
* **Sampling.** Every rank draws the same epoch plan (iterations of ``N x 2`` labeled and ``N x 2``
  unlabeled cases) from a generator seeded with ``seed``; rank r takes the r-th block of each
  iteration. Ranks therefore see different unlabeled cases and together cover the epoch. Crops, gamma,
  PIC boxes, aux masks and dropout come from per-rank generators seeded from
  ``numpy.random.SeedSequence(seed, spawn_key=(rank,))``: different between ranks, reproducible.
* **BatchNorm and the EMA teacher.** BatchNorm normalises with each rank's own batch (as the paper's
  single GPU does); ``SyncBatchNorm`` is not used: it refuses CPU tensors (so no gloo) and would change
  the normalisation batch to ``N x 4``. After every optimiser step the running statistics are averaged
  over the ranks (one small all-reduce): since all ranks start the step from the same values, that
  equals one running-average update with the ranks' mean batch moments. Parameters are identical after
  the all-reduced step, buffers after the average, so the EMA update gives the same teacher everywhere.
  Checkpoints record a sha256 of every rank's student and EMA weights; a mismatch is logged as a warning.
* **Unused parameters.** Modules that get no gradient in a run (the projector without distillation,
  the aux head with ``--no-aux``) are frozen before wrapping, so DDP never needs
  ``find_unused_parameters`` (no graph search per step); SGD skipped them anyway (no gradient).
* **Rank 0 writes** the log (loss terms are the mean over the ranks), checkpoints, ``progress.png``,
  the progress bar and runs validation; the others wait in the next collective (the broadcast of the
  validation Dice, which decides ``best.pt`` on every rank alike).
* **Resume** needs the same N: ``latest.pt`` holds every rank's generator states (``ranks``) and the
  world size; another N would change which cases and random draws each rank gets, so it is refused.
* Every rank reads the same store and run folder (a shared file system on several machines).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dinomix_cache.errors import UserError
from stage2_train.train.state import TrainState

log = logging.getLogger("dinomix_cache.train")

T = TypeVar("T")

# Loss-record keys that are the same on every rank by construction: averaging them would only add rounding.
_SHARED_KEYS = ("lr",)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (or a single process: ``world_size`` 1).

    Attributes:
        rank: global rank, 0 writes the run folder.
        world_size: number of processes N.
        local_rank: rank on this machine (the GPU index).
        device: where this rank trains (``cuda:LOCAL_RANK``, ``cuda`` for a single GPU process, or cpu).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        """True when several processes train together (a process group is up)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files, logs and validates."""
        return self.rank == 0

    def _tensor(self, values: Sequence[float]) -> torch.Tensor:
        # NCCL only moves CUDA tensors; gloo CPU ones.
        return torch.tensor(list(values), dtype=torch.float64, device=self.device)

    def broadcast_float(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (a no-op alone). Collective: every rank must call it."""
        if not self.enabled:
            return value
        t = self._tensor([value])
        dist.broadcast(t, src=0)
        return float(t.item())

    def mean_record(self, record: Mapping[str, float]) -> dict[str, float]:
        """Every number of a step record averaged over the ranks (keys must match on all ranks).

        ``lr`` is the same everywhere and is kept as is. Collective.
        """
        if not self.enabled:
            return dict(record)
        keys = sorted(k for k in record if k not in _SHARED_KEYS)
        t = self._tensor([float(record[k]) for k in keys])
        dist.all_reduce(t)
        out = dict(record)
        out.update({k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)})
        return out

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` (picklable) on rank 0, in rank order; None on the other ranks. Collective."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def run_on_main(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on rank 0 only; a :class:`UserError` it raises is raised on every rank.

        So that a refused run folder (e.g. one that already holds a run) stops all ranks with the same
        one-line message instead of leaving the others blocked in the next collective. Collective.
        """
        message: str | None = None
        if self.is_main:
            try:
                fn()
            except UserError as exc:
                if not self.enabled:
                    raise
                message = str(exc)
        if self.enabled:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message is not None:
            raise UserError(message)

    @torch.no_grad()
    def average_buffers(self, module: nn.Module) -> None:
        """Replace every floating-point buffer (BatchNorm running mean/var) by its mean over the ranks.

        Integer buffers (``num_batches_tracked``) advance alike on every rank and are left alone.
        One all-reduce per dtype. Collective; a no-op alone.
        """
        if not self.enabled:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buf in module.buffers():
            if buf.is_floating_point():
                by_dtype.setdefault(buf.dtype, []).append(buf)
        for bufs in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for b in bufs:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    def wrap(self, student: nn.Module, frozen: Sequence[nn.Module]) -> nn.Module:
        """``student`` in ``DistributedDataParallel`` (itself when alone); ``frozen`` get no gradient.

        Args:
            student: the network the optimiser trains; its parameters are shared with the wrapper, so
                the optimiser, the EMA update and checkpoints keep using ``student`` itself.
            frozen: submodules no loss of the run reaches; frozen (``requires_grad`` False) because
                DDP without ``find_unused_parameters`` otherwise fails at the next step ("Expected to
                have finished reduction in the prior iteration"), and with it searches the graph every step.

        Returns:
            The module to call for training forwards (DDP all-reduces gradients in ``backward``).
        """
        if not self.enabled:
            return student
        for module in frozen:
            module.requires_grad_(False)

        kwargs: dict[str, Any] = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        # No buffer broadcast before each forward: buffers are averaged after each step instead
        # (average_buffers). Newer torch renamed the switch (the old name warns).
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            kwargs["forward_sync_buffers"] = False
        else:
            kwargs["broadcast_buffers"] = False
        return DistributedDataParallel(student, find_unused_parameters=False, **kwargs)


def rank_share(cases: tuple[list[str], list[str]], rank: int, n_labeled: int,
               n_unlabeled: int) -> tuple[list[str], list[str]]:
    """Rank ``rank``'s block of one iteration of a distributed epoch plan.

    Args:
        cases: ``(labeled ids, unlabeled ids)`` of the iteration, ``N x n_labeled`` and ``N x n_unlabeled``
            long (the unlabeled list empty in labeled-only runs).
        rank: this process's rank in [0, N).
        n_labeled, n_unlabeled: crops per rank (the paper's 2 and 2).

    Returns:
        ``n_labeled`` labeled and ``n_unlabeled`` unlabeled ids (or none); the blocks of ranks 0..N-1
        are disjoint and together are the iteration's cases. Rank 0 of 1 gets them all.
    """
    labeled, unlabeled = cases
    return (list(labeled[rank * n_labeled:(rank + 1) * n_labeled]),
            list(unlabeled[rank * n_unlabeled:(rank + 1) * n_unlabeled]))


def single_process() -> Distributed:
    """A one-process :class:`Distributed` on ``cuda`` if available, else cpu (the plain ``train``)."""
    return Distributed(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@contextmanager
def from_environment() -> Iterator[Distributed]:
    """Join the ``torchrun`` job this process belongs to, or stay a single process.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address; with
    ``WORLD_SIZE`` unset or 1 nothing is initialised. Otherwise the process group is created (NCCL with
    ``cuda:LOCAL_RANK`` when CUDA is available, gloo on CPU) and destroyed on exit, also on errors; an
    already initialised group (a caller's own) is used and left alone.

    Yields:
        This process's :class:`Distributed`.

    Raises:
        UserError: incomplete launcher variables, more ranks on a machine than GPUs, or a process group
            that cannot start.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield single_process()
        return
    try:
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise UserError(f"WORLD_SIZE={world} but RANK is missing or not a number: launch with torchrun") from None
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s): "
                            "use --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(local)  # so that bare "cuda" (e.g. the teacher's device) means this rank's GPU
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        try:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"cannot start the {backend} process group ({' '.join(str(exc).split())}); "
                            "launch with torchrun") from None
    context = Distributed(rank, world, local, device)
    if context.is_main:
        log.info("distributed training: %d processes, %s on %s", world, backend, device.type)
    try:
        yield context
        dist.barrier()  # nobody tears the group down while rank 0 still writes
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


def weights_sha256(networks: Mapping[str, Mapping[str, torch.Tensor]],
                   names: Sequence[str] = ("student", "ema")) -> str:
    """sha256 of the named state dicts of a checkpoint's ``networks`` (keys, dtypes, shapes and bytes).

    Two ranks (or a rank and a saved checkpoint) hold the same weights exactly when the hashes match.
    """
    digest = hashlib.sha256()
    for name in names:
        for key in sorted(networks[name]):
            t = networks[name][key].detach().to("cpu").contiguous()
            digest.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_payload(context: Distributed, networks: dict[str, Any], state: TrainState) -> dict[str, Any] | None:
    """What ``latest.pt`` / ``best.pt`` hold; in a distributed run also every rank's generators.

    Distributed, the payload adds ``world_size`` and ``ranks``: per rank (in rank order) its
    :meth:`TrainState.rng_state` and ``weights_sha256`` (see :func:`weights_sha256`); ``state`` is rank
    0's. Collective: every rank calls it, only rank 0 gets the payload (None elsewhere).
    """
    payload = {"networks": networks, "state": state.to_dict()}
    if not context.enabled:
        return payload
    ranks = context.gather({**state.rng_state(), "weights_sha256": weights_sha256(networks)})
    if ranks is None:
        return None
    hashes = [r["weights_sha256"] for r in ranks]
    if len(set(hashes)) > 1:
        log.warning("step %d: the ranks' student/EMA weights differ (sha256 %s); rank 0's are saved",
                    state.step, ", ".join(h[:12] for h in hashes))
    payload.update(world_size=context.world_size, ranks=ranks)
    return payload


def restore_state(context: Distributed, checkpoint: Mapping[str, Any], run: object) -> TrainState:
    """The :class:`TrainState` of this rank from a checkpoint of :func:`checkpoint_payload`.

    Raises:
        UserError: the checkpoint was written by another number of processes.
    """
    saved = int(checkpoint.get("world_size", 1))
    if saved != context.world_size:
        how = "without torchrun" if saved == 1 else f"with torchrun --nproc-per-node {saved}"
        raise UserError(f"{run} was trained by {saved} process(es), this resume has {context.world_size}; "
                        f"resume it {how} (another count would change which cases and random draws each "
                        "process gets)")
    data = dict(checkpoint["state"])
    if context.enabled:
        data.update(checkpoint["ranks"][context.rank])
    return TrainState.from_dict(data)
