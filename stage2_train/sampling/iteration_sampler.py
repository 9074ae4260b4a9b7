"""Which cases each training iteration sees, following DHC's loaders (see docs/protocol.md, training
sampling): an epoch is one pass over the unlabeled cases, ``n_unlabeled`` per iteration, with the
labeled set repeated to cover it, ``n_labeled`` per iteration.

Randomness comes only from the ``np.random.Generator`` passed in, so a resumed run that restores its
state repeats the exact sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["IterationSampler"]


class IterationSampler:
    """Which cases each training iteration sees.

    An epoch = one pass over the unlabeled cases, shuffled, in groups of ``n_unlabeled`` (the last
    incomplete group is dropped, as the peers' ``drop_last``); labeled cases come from a shuffled list
    repeated to cover the epoch (DHC: the labeled set repeated to the unlabeled length), ``n_labeled``
    per iteration. With no unlabeled cases (labeled-only baseline), an epoch = one pass over the
    labeled cases, shuffled, in groups of ``n_labeled`` (last incomplete group dropped).

    Labeled cases of an epoch: the labeled list repeated as often as the epoch needs
    (``iterations * n_labeled`` draws), shuffled as a whole, as DHC's shuffled loader over the
    repeated dataset. When the count is not a multiple of the labeled set, the cases that get one
    use more are a random subset (DHC always favours the first ones of its list), so every labeled
    case is used ``k`` or ``k + 1`` times. A case may then appear twice in one iteration, as in DHC.

    Args:
        labeled: ids of the labeled cases (at least one; no duplicates).
        unlabeled: ids of the unlabeled cases (may be empty: labeled-only; no duplicates).
        n_labeled: labeled cases per iteration.
        n_unlabeled: unlabeled cases per iteration.

    Raises:
        ValueError: no labeled cases, duplicates, a non-positive group size, or too few cases for
            a single iteration.

    Example::

        sampler = IterationSampler(labeled_ids, unlabeled_ids)      # 4 labeled, 16 unlabeled
        for lab, unl in sampler.epoch(rng):                         # 8 iterations
            ...                                                     # lab, unl: 2 ids each
    """

    def __init__(
        self, labeled: Sequence[str], unlabeled: Sequence[str], n_labeled: int = 2, n_unlabeled: int = 2
    ) -> None:
        self.labeled = [str(c) for c in labeled]
        self.unlabeled = [str(c) for c in unlabeled]
        self.n_labeled = int(n_labeled)
        self.n_unlabeled = int(n_unlabeled)
        if self.n_labeled < 1 or self.n_unlabeled < 1:
            raise ValueError(f"n_labeled and n_unlabeled must be >= 1, got {n_labeled} and {n_unlabeled}")
        if not self.labeled:
            raise ValueError("no labeled cases: training needs at least one")
        for name, ids in (("labeled", self.labeled), ("unlabeled", self.unlabeled)):
            if len(set(ids)) != len(ids):
                dups = sorted({c for c in ids if ids.count(c) > 1})
                raise ValueError(f"duplicate {name} case ids: {dups}")
        if self.iterations_per_epoch() == 0:
            if self.unlabeled:
                raise ValueError(
                    f"{len(self.unlabeled)} unlabeled case(s) are fewer than n_unlabeled={self.n_unlabeled}: "
                    "an epoch would have no iteration"
                )
            raise ValueError(
                f"{len(self.labeled)} labeled case(s) are fewer than n_labeled={self.n_labeled} "
                "(labeled-only): an epoch would have no iteration"
            )

    @property
    def labeled_only(self) -> bool:
        """True when there are no unlabeled cases (the labeled-only baseline)."""
        return not self.unlabeled

    def iterations_per_epoch(self) -> int:
        """Iterations of one epoch: ``len(unlabeled) // n_unlabeled`` (labeled-only: ``len(labeled) // n_labeled``)."""
        if self.labeled_only:
            return len(self.labeled) // self.n_labeled
        return len(self.unlabeled) // self.n_unlabeled

    def epoch(self, rng: np.random.Generator) -> list[tuple[list[str], list[str]]]:
        """The cases of every iteration of one epoch.

        Draws, in order: a permutation of the unlabeled cases, then (semi-supervised) the random
        subset for the remainder of the labeled repetition and a permutation of the repeated list;
        labeled-only: one permutation of the labeled cases.

        Args:
            rng: the only source of randomness.

        Returns:
            One ``(labeled ids, unlabeled ids)`` per iteration, with ``n_labeled`` and
            ``n_unlabeled`` ids (labeled-only: ``n_labeled`` and an empty list).
        """
        iters = self.iterations_per_epoch()
        if self.labeled_only:
            order = rng.permutation(len(self.labeled))
            return [
                ([self.labeled[i] for i in order[k * self.n_labeled:(k + 1) * self.n_labeled]], [])
                for k in range(iters)
            ]
        unl_order = rng.permutation(len(self.unlabeled))
        needed = iters * self.n_labeled
        n = len(self.labeled)
        full, rest = divmod(needed, n)
        pool = np.concatenate([np.tile(np.arange(n), full), rng.choice(n, size=rest, replace=False)])
        lab_order = pool[rng.permutation(needed)]
        out: list[tuple[list[str], list[str]]] = []
        for k in range(iters):
            lab = [self.labeled[i] for i in lab_order[k * self.n_labeled:(k + 1) * self.n_labeled]]
            unl = [self.unlabeled[i] for i in unl_order[k * self.n_unlabeled:(k + 1) * self.n_unlabeled]]
            out.append((lab, unl))
        return out
