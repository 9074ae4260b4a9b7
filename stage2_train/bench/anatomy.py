"""``bench anatomy``: how much anatomy a store's teacher tokens carry, measured by a linear probe.

Each stored patch token is paired with the majority class of the slice pixels it covers (the store's
token geometry, :class:`~stage2_train.targets.geometry.TokenGeometry`: token ``k`` covers pixels
``[k·token_px, (k+1)·token_px)``, ties going to the lower class index, i.e. background). A multinomial
logistic regression (full batch, L-BFGS, class-balanced cross-entropy, on standardised tokens) is
fitted on the tokens of the train-split cases (labeled and unlabeled) and scored on the test-split
cases. A random-init teacher's tokens are a random projection of the patch's pixels, so the probe
reads intensity only; a teacher that carries anatomy also tells organs of one intensity apart, left
kidney from right kidney above all.

Deterministic (fixed seed and one CPU thread while fitting) and cheap: on the 48x96x96 phantom store it
takes seconds, so other benchmarks can print it beside their figures.

Failure modes (:class:`~dinomix_cache.errors.UserError`): no complete train or test case with a label
(naming the store and the fix), and whatever reading the store's labels refuses (``--no-volumes``
stores need ``data``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinomix_cache.errors import SettingsError, UserError
from dinomix_cache.store.feature_store import FeatureStore
from stage2_train.sampling.volume_cache import VolumeCache
from stage2_train.targets.geometry import TokenGeometry

__all__ = ["AnatomyProbeSettings", "anatomy_probe", "token_majority"]

TRAIN_ROLES = ("labeled", "unlabeled")
TEST_ROLES = ("test",)
KIDNEYS = ("right_kidney", "left_kidney")


@dataclass(frozen=True)
class AnatomyProbeSettings:
    """How the probe is fitted.

    Attributes:
        max_train_tokens: train tokens kept; beyond it every foreground token is kept and background
            tokens are sampled (seeded) to fill the rest, which bounds time and memory on large stores.
        iterations: L-BFGS iterations (full batch).
        weight_decay: L2 penalty on the probe's weights (on standardised tokens).
        seed: the background sample.

    Raises:
        SettingsError: a non-positive size or a negative penalty.
    """

    max_train_tokens: int = 200_000
    iterations: int = 100
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_train_tokens < 1 or self.iterations < 1 or not self.weight_decay >= 0 or self.seed < 0:
            raise SettingsError("anatomy probe: max_train_tokens and iterations must be >= 1, weight_decay and "
                                "seed >= 0")


def token_majority(label: np.ndarray, geometry: TokenGeometry, num_classes: int) -> np.ndarray:
    """(D, H, W) slice labels → (D, h, w) majority class of the pixels under each stored token.

    A pixel belongs to the token its centre falls in (``floor((y + 0.5) / token_px)``), so tokens of
    a teacher that saw the slice resized (160-pixel slices at 224) get their share of pixels too.
    """
    depth, height, width = label.shape
    (gh, gw), (py, px) = geometry.grid_hw, geometry.token_px
    ty = np.minimum(((np.arange(height) + 0.5) / py).astype(np.int64), gh - 1)
    tx = np.minimum(((np.arange(width) + 0.5) / px).astype(np.int64), gw - 1)
    cell = (np.arange(depth)[:, None, None] * gh + ty[None, :, None]) * gw + tx[None, None, :]
    counts = np.bincount((cell * num_classes + label.astype(np.int64)).ravel(),
                         minlength=depth * gh * gw * num_classes)
    return counts.reshape(depth, gh, gw, num_classes).argmax(-1)


def _tokens(store: FeatureStore, volumes: VolumeCache, case_ids: Sequence[str],
            geometry: TokenGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stored token of ``case_ids`` (N, C) float32 and its majority class (N,) int64."""
    feats, classes = [], []
    k = store.attrs.num_classes
    for cid in case_ids:
        features = store.read_features(cid)
        feats.append(torch.from_numpy(np.ascontiguousarray(features)).reshape(-1, features.shape[-1]).float())
        classes.append(torch.from_numpy(token_majority(volumes.label(cid), geometry, k)).reshape(-1))
    return torch.cat(feats), torch.cat(classes)


def _subsample(x: torch.Tensor, y: torch.Tensor, cap: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if len(y) <= cap:
        return x, y
    gen = torch.Generator().manual_seed(seed)
    fg, bg = torch.nonzero(y > 0).flatten(), torch.nonzero(y == 0).flatten()
    if len(fg) >= cap:
        keep = torch.randperm(len(y), generator=gen)[:cap]
    else:
        keep = torch.cat([fg, bg[torch.randperm(len(bg), generator=gen)[:cap - len(fg)]]])
    keep = keep.sort().values
    return x[keep], y[keep]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One CPU thread while fitting: the same figures on every run, and no stall on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, settings: AnatomyProbeSettings) -> torch.nn.Linear:
    """Class-balanced multinomial logistic regression (weights ``N / (K_present · n_c)``)."""
    counts = torch.bincount(y, minlength=num_classes).to(torch.float32)
    present = counts > 0
    weight = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), torch.zeros_like(counts))
    probe = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimiser = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=settings.iterations, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(probe(x), y, weight=weight) + settings.weight_decay * probe.weight.square().sum() / 2
        loss.backward()
        return loss

    optimiser.step(closure)
    return probe


def _cases(store: FeatureStore, volumes_ids: set[str], roles: Sequence[str]) -> list[str]:
    return [cid for cid, role in store.roles().items() if role in roles and cid in volumes_ids]


def anatomy_probe(store: FeatureStore, data: Path | None = None,
                  settings: AnatomyProbeSettings = AnatomyProbeSettings()) -> dict[str, Any]:
    """Fit the probe on the train-split cases' tokens, score it on the test split's.

    Args:
        store: an open feature store; its train and test cases need labels (in the store, or under
            ``data`` for a store made with ``--no-volumes``).
        data: the dataset folder, for a store without volumes.
        settings: how the probe is fitted.

    Returns:
        ``{"teacher": {"source", "label"}, "store", "cases": {"train", "test"}, "tokens": {"train", "test",
        "test_foreground"}, "foreground_accuracy", "balanced_accuracy", "classes_present", "recall":
        {class: share}, "kidney_confusion": {"right_as_left", "left_as_right"} or None, "seconds"}``.
        Accuracies are shares in [0, 1]: ``foreground_accuracy`` over test tokens whose majority
        class is not background; ``balanced_accuracy`` the mean recall over the classes that are some
        test token's majority (background included); ``kidney_confusion`` how often a right-kidney
        token is called left kidney and the reverse (None where a kidney is in no test token).

    Raises:
        UserError: no complete, labelled train or test case.
    """
    start = time.perf_counter()
    complete = set(store.complete_cases())
    wanted = [cid for cid, role in store.roles().items() if cid in complete and role in TRAIN_ROLES + TEST_ROLES]
    volumes = VolumeCache(store, wanted, with_labels=True, data=data)
    with_label = {cid for cid in wanted if volumes.has_label(cid)}
    train_ids, test_ids = _cases(store, with_label, TRAIN_ROLES), _cases(store, with_label, TEST_ROLES)
    if not train_ids or not test_ids:
        missing = "train (labeled or unlabeled)" if not train_ids else "test"
        raise UserError(f"{store.location} has no complete {missing} case with a label: the anatomy probe learns "
                        "from train-split labels and is scored on the test split; extract every case with labels")
    geometry = TokenGeometry.of(store)
    names = store.class_names
    k = len(names)
    with _one_thread():
        x_train, y_train = _tokens(store, volumes, train_ids, geometry)
        x_test, y_test = _tokens(store, volumes, test_ids, geometry)
        x_train, y_train = _subsample(x_train, y_train, settings.max_train_tokens, settings.seed)
        mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
        probe = _fit((x_train - mean) / std, y_train, k, settings)
        with torch.no_grad():
            pred = probe((x_test - mean) / std).argmax(-1)
    fg = y_test > 0
    present = [c for c in range(k) if bool((y_test == c).any())]
    recall = {names[c]: float((pred[y_test == c] == c).float().mean()) for c in present}
    kidneys = None
    if all(n in names for n in KIDNEYS):
        right, left = (names.index(n) for n in KIDNEYS)

        def called(true: int, as_: int) -> float | None:
            sel = y_test == true
            return float((pred[sel] == as_).float().mean()) if bool(sel.any()) else None

        kidneys = {"right_as_left": called(right, left), "left_as_right": called(left, right)}
    return {
        "teacher": {"source": store.attrs.teacher.source, "label": store.attrs.teacher.label},
        "store": store.location,
        "cases": {"train": len(train_ids), "test": len(test_ids)},
        "tokens": {"train": len(y_train), "test": len(y_test), "test_foreground": int(fg.sum())},
        "foreground_accuracy": float((pred[fg] == y_test[fg]).float().mean()) if bool(fg.any()) else None,
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "classes_present": [names[c] for c in present],
        "recall": recall,
        "kidney_confusion": kidneys,
        "seconds": round(time.perf_counter() - start, 2),
    }
