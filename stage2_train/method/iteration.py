"""One DINO-Mix training iteration and the state it needs, resumable bit for bit.

Per iteration (``docs/method.md``, "One step"): labeled crops and weak unlabeled crops → the EMA
teacher's pseudo-labels (main and auxiliary heads) → strong view (random gamma) → PIC mixes a box of
a labeled crop into each unlabeled crop → one student forward on [labeled, x_mix] →
``L = L_sup + L_sup^aux + L_distill + λ (L_unsup + L_unsup^aux)`` → SGD step → EMA update.

Every random draw comes from generators held in :class:`~stage2_train.train.state.TrainState`, one
per purpose (plans, labeled crops, unlabeled crops, PIC, gamma, aux masks; dropout from torch's global
one), saved in checkpoints: K iterations straight and K/2 + resume + K/2 give identical weights, and two
runs at one seed that differ by a switch see the same cases and crops. Under ``torchrun`` each rank
trains on its share of every iteration's cases with its own generators
(``stage2_train/train/distributed.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from stage2_train.method.ema import EmaTeacher
from stage2_train.method.losses import (
    MaskedSegLoss,
    SegLoss,
    class_rates,
    distillation_loss,
    labeled_aux_mask,
    pseudo_labels,
    unlabeled_aux_mask,
)
from stage2_train.method.networks import DinoMixStudent, StudentOutput
from stage2_train.method.pic import pic_batch
from stage2_train.method.pseudo_label_stats import PseudoLabelStats
from stage2_train.method.schedules import ema_decay_at, poly_lr, unsup_weight
from stage2_train.sampling.crops import Crop, random_crop, random_gamma
from stage2_train.sampling.iteration_sampler import IterationSampler
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.targets.geometry import token_pixels
from stage2_train.targets.policies import MixedCrop, TargetPolicy
from stage2_train.train.distributed import Distributed, rank_share
from stage2_train.train.precision import resolve_memory_format, resolve_precision, student_autocast, torch_memory_format
from stage2_train.train.settings import TrainSettings
from stage2_train.train.state import TrainState


def box_of(mask: torch.Tensor) -> tuple[slice, slice, slice] | None:
    """The bounding box (z, y, x slices) of a bool (D, H, W) mask, None if empty."""
    idx = mask.nonzero()
    if len(idx) == 0:
        return None
    lo, hi = idx.min(0).values.tolist(), idx.max(0).values.tolist()
    return tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


class DinoMixIteration:
    """Runs iterations of DINO-Mix on a store's cases. Holds the networks, losses and optimiser.

    With a distributed ``context`` (``world_size`` N > 1) the sampler plans iterations of N times the
    crops, each rank trains on its block (:meth:`step`), ``network`` is the student in
    ``DistributedDataParallel`` and BatchNorm statistics are averaged over the ranks before the EMA
    update. ``student`` is always the bare network (EMA, checkpoints, validation).

    Raises:
        UserError: too few cases for one iteration (of all ranks).
    """

    def __init__(self, settings: TrainSettings, store: FeatureStore, volumes: VolumeCache,
                 policy: TargetPolicy | None, device: torch.device, context: Distributed | None = None) -> None:
        self.settings = settings
        self.device = device
        self.context = context if context is not None and context.enabled else None
        self.rank, world = (self.context.rank, self.context.world_size) if self.context else (0, 1)
        all_roles = store.roles()
        roles = {cid: all_roles[cid] for cid in store.complete_cases()}
        self.labeled = sorted(c for c, r in roles.items() if r == "labeled")
        # The labeled-only baseline keeps the same epochs (one pass over the unlabeled cases' count)
        # so that it is compared with DINO-Mix at the same number of steps; it ignores their images.
        self.unlabeled = sorted(c for c, r in roles.items() if r == "unlabeled")
        try:
            self.sampler = IterationSampler(self.labeled, self.unlabeled, settings.n_labeled * world,
                                            settings.n_unlabeled * world)
        except ValueError as exc:  # e.g. fewer unlabeled cases than one iteration needs
            if world == 1:
                raise UserError(f"{store.path}: {exc}") from None
            pool, kind, n = ((self.unlabeled, "unlabeled", settings.n_unlabeled) if self.unlabeled
                             else (self.labeled, "labeled", settings.n_labeled))
            raise UserError(f"{store.path}: {len(pool)} {kind} case(s) are too few for {world} processes "
                            f"({n} per process, {n * world} a step); run fewer processes") from None
        self.volumes = volumes
        self.policy = policy
        counts = store.class_voxels()
        assert counts is not None
        self.class_voxels = counts
        self.rates = class_rates(counts)
        num_classes = len(store.class_names)
        torch.manual_seed(settings.seed)  # network initialisation
        # Resolved here too, so that an iteration built from unresolved settings (a bench) runs as a run would.
        self.precision = resolve_precision(settings.precision, device, settings.width, settings.crop, settings.batch)
        self.memory_format = torch_memory_format(resolve_memory_format(settings.memory_format, device,
                                                                       self.precision))
        self.student = DinoMixStudent(num_classes, store.attrs.teacher.hidden_size, width=settings.width,
                                      projector_hidden=settings.projector_hidden, dropout=settings.dropout,
                                      normalization=settings.normalization)
        self.student.to(device=device, memory_format=self.memory_format)
        self.ema = EmaTeacher(self.student)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=settings.lr, momentum=settings.momentum,
                                         weight_decay=settings.weight_decay, nesterov=settings.nesterov)
        self.network: Callable[[torch.Tensor], StudentOutput] = self.student
        if self.context is not None:
            self.network = self.context.wrap(self.student, self.unused_modules())
        self.crop_grid = (1.0, *token_pixels(store)) if settings.effective_crop_grid == "token" else (1.0, 1.0, 1.0)
        self.seg_loss = SegLoss()
        self.unsup_loss = SegLoss(weighting=settings.unsup_weighting)
        self.aux_loss = MaskedSegLoss(mode=settings.aux_mode)
        self.total_steps = settings.epochs * self.sampler.iterations_per_epoch()
        # This rank's pseudo-labels against the truth, where the store holds labels of unlabeled cases
        # (the phantom's); the loop reads and resets them every epoch.
        self.pseudo_stats = PseudoLabelStats(num_classes)

    def unused_modules(self) -> list[torch.nn.Module]:
        """Submodules no loss of this run reaches: the projector without distillation, the aux head
        with ``aux`` off. (They still run forward; they get no gradient.)"""
        unused: list[torch.nn.Module] = []
        s = self.settings
        # The same condition as the distillation branch of step (no unlabeled cases: the supervised branch).
        if not (self.unlabeled and not s.labeled_only and s.fkd and self.policy is not None):
            unused.append(self.student.projector)
        if not s.aux:
            unused.append(self.student.vnet.aux_head)
        return unused

    def learning_rate(self, epoch: int) -> float:
        """Poly decay per epoch: lr · (1 - E/E_max)^0.9."""
        s = self.settings
        return poly_lr(s.lr, epoch, s.epochs, s.poly_power)

    def lambda_unsup(self, step: int) -> float:
        """λ_unsup after its sigmoid ramp at iteration ``step`` (``TrainSettings.unsup_rampup``)."""
        s = self.settings
        return unsup_weight(s.lambda_unsup, step, self.total_steps, s.unsup_rampup)

    def forward(self, network: Callable[[torch.Tensor], StudentOutput], x: torch.Tensor) -> StudentOutput:
        """A network forward in the run's precision and memory format (bf16 autocast where native, see
        ``TrainSettings.precision``); logits and projection returned as float32, so losses and the EMA
        pseudo-labels are computed in full precision. ``deep`` is x5 as the network made it (the node the
        distillation gradient reaches the encoder through)."""
        with student_autocast(self.device, self.precision):
            out = network(x.contiguous(memory_format=self.memory_format))
        # contiguous: softmax and cross-entropy over the class axis are 1.5x slower on channels-last tensors
        logits, aux_logits, projected = (
            None if t is None else t.to(torch.float32, memory_format=torch.contiguous_format)
            for t in (out.logits, out.aux_logits, out.projected))
        return StudentOutput(logits, aux_logits, out.deep, projected)

    def _crops(self, ids: list[str], rng: np.random.Generator) -> list[Crop]:
        s = self.settings
        return [random_crop(cid, self.volumes.shape(cid), s.crop, rng, flip=s.flip, grid=self.crop_grid)
                for cid in ids]

    def _images(self, crops: list[Crop]) -> torch.Tensor:
        return torch.stack([self.volumes.crop_image(c) for c in crops]).to(self.device)

    def _labels(self, crops: list[Crop]) -> torch.Tensor:
        return torch.stack([self.volumes.crop_label(c) for c in crops]).to(self.device)

    def step(self, state: TrainState) -> dict[str, float]:
        """One iteration; advances ``state`` (plan, counters, generators). Returns this rank's loss terms
        (unweighted), the weights in force (``lr``, ``lambda_unsup``, ``ema_decay``), the confident and
        kept fractions of the unsupervised branch, ``distill_grad`` (the norm of the distillation gradient
        at x5 over that of the whole loss, where it is computed) and ``recomputed``.

        Distributed, every rank holds the same plan (of N x n cases an iteration) and trains on block
        ``rank`` of it; gradients are all-reduced in ``backward``. Collective then.
        """
        s = self.settings
        if state.iteration == 0 or not state.plan:
            state.plan = self.sampler.epoch(state.rngs["plan"])
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(state.epoch)
        labeled_ids, unlabeled_ids = rank_share(state.plan[state.iteration], self.rank, s.n_labeled, s.n_unlabeled)
        lab_crops = self._crops(labeled_ids, state.rngs["labeled_crops"])
        x_l, y_l = self._images(lab_crops), self._labels(lab_crops)
        self.student.train()
        lam = self.lambda_unsup(state.step)
        terms: dict[str, torch.Tensor] = {}
        logged: dict[str, float] = {}
        recomputed = 0.0
        if unlabeled_ids and not s.labeled_only:
            unl_crops = self._crops(unlabeled_ids, state.rngs["unlabeled_crops"])
            x_u = self._images(unl_crops)
            ema_out = self.forward(self.ema, x_u)
            y_u, confident = pseudo_labels(ema_out.logits, s.tau)
            y_u_aux = ema_out.aux_logits.max(1).indices  # = argmax(1), first maximum; 4x faster on a CPU
            self._count_pseudo_labels(unl_crops, y_u, confident)
            x_strong = random_gamma(x_u, s.gamma_range, generator=state.gens["gamma"])
            x_mix, y_mix, boxes, _ = pic_batch(x_l, y_l, x_strong, y_u, self.class_voxels, state.epoch, s.epochs,
                                               s.pic, state.rngs["pic"])
            out = self.forward(self.network, torch.cat([x_l, x_mix]))
            n = len(lab_crops)
            # split, not [n:] and [:n]: the backward of a slice fills a zero tensor of the whole batch's logits
            # for each slice (4 per step); that of a split concatenates the parts' gradients.
            logits_l, logits_mix = out.logits.split([n, len(x_mix)])
            aux_l, aux_mix = out.aux_logits.split([n, len(x_mix)])
            kept = boxes | confident
            terms["unsup"] = self.unsup_loss(logits_mix, y_mix, weight_mask=kept)
            logged.update(confident=float(confident.float().mean()), kept=float(kept.float().mean()))
            if s.aux:
                y_mix_aux = torch.where(boxes, y_mix, y_u_aux)
                keep = unlabeled_aux_mask(y_mix_aux, self.rates, state.epoch, s.epochs, state.gens["aux"])
                terms["unsup_aux"] = self.aux_loss(aux_mix, y_mix_aux, keep)
                logged["unsup_aux_inert"] = self.aux_loss.inert(keep, aux_mix.shape[1])
            if s.fkd and self.policy is not None:
                boxes_of = [box_of(boxes[i]) for i in range(len(unl_crops))]  # None: nothing pasted (--no-pic)
                items = [MixedCrop(unl_crops[i], None if box is None else lab_crops[i % n], box)
                         for i, box in enumerate(boxes_of)]
                target, recomputed = self.policy.targets(items)
                terms["distill"] = distillation_loss(out.projected[n:], target.to(self.device), s.fkd_reduction)
        else:
            out = self.forward(self.network, x_l)
            logits_l, aux_l = out.logits, out.aux_logits
        terms["sup"] = self.seg_loss(logits_l, y_l)
        if s.aux:
            keep = labeled_aux_mask(y_l, self.rates, state.gens["aux"])
            terms["sup_aux"] = self.aux_loss(aux_l, y_l, keep)
            logged["sup_aux_inert"] = self.aux_loss.inert(keep, aux_l.shape[1])
        unsup = sum((terms[k] for k in ("unsup", "unsup_aux") if k in terms), torch.zeros((), device=self.device))
        total = terms["sup"] + terms.get("sup_aux", 0.0) + terms.get("distill", 0.0) + lam * unsup
        self.optimizer.zero_grad(set_to_none=True)
        grad_ratio = self._backward(total, terms.get("distill"), out.deep)
        self.optimizer.step()
        if self.context is not None:
            self.context.average_buffers(self.student)  # per-rank BatchNorm statistics → one EMA teacher
        decay = ema_decay_at(state.step, s.ema_decay, s.ema_warmup)
        self.ema.update(self.student, decay)
        state.step += 1
        state.iteration += 1
        if state.iteration >= len(state.plan):
            state.iteration, state.epoch = 0, state.epoch + 1
        logged.update({k: float(v.detach()) for k, v in terms.items()})
        logged.update(total=float(total.detach()), lr=self.optimizer.param_groups[0]["lr"], lambda_unsup=lam,
                      ema_decay=decay, recomputed=recomputed)
        if grad_ratio is not None:
            logged["distill_grad"] = grad_ratio
        return logged

    def _backward(self, total: torch.Tensor, distill: torch.Tensor | None, deep: torch.Tensor) -> float | None:
        """``total.backward()``; with a distillation term, on a single process, also the norm of its gradient
        at x5 over the norm of the whole loss's gradient there (the projector is all it passes through, so
        this costs one small extra backward). None where it is not computed."""
        if distill is None or self.context is not None or not deep.requires_grad:
            total.backward()
            return None
        (g_distill,) = torch.autograd.grad(distill, deep, retain_graph=True)
        seen: list[torch.Tensor] = []
        handle = deep.register_hook(lambda g: seen.append(g.detach()))
        try:
            total.backward()
        finally:
            handle.remove()
        whole = float(seen[0].float().norm()) if seen else 0.0
        return float(g_distill.float().norm()) / whole if whole > 0 else float("nan")

    def _count_pseudo_labels(self, crops: list[Crop], pseudo: torch.Tensor, confident: torch.Tensor) -> None:
        """Add this step's pseudo-labels of the crops whose cases have labels to :attr:`pseudo_stats`."""
        for i, crop in enumerate(crops):
            if self.volumes.has_label(crop.case_id):
                self.pseudo_stats.add(self.volumes.crop_label(crop), pseudo[i].cpu(), confident[i].cpu())

    def state_dicts(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dicts(self, data: dict[str, Any]) -> None:
        self.student.load_state_dict(data["student"])
        self.ema.load_state_dict(data["ema"])
        self.optimizer.load_state_dict(data["optimizer"])
