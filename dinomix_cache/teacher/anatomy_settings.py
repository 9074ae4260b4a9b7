"""Settings of ``dinomix-cache train-teacher``: which labels a phantom-trained teacher learns from, its size,
its training and its augmentation, as one frozen dataclass recorded in the teacher's provenance file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from dinomix_cache.data.layouts import DATASETS
from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.data.roles import SplitSettings
from dinomix_cache.errors import SettingsError, check_choice
from dinomix_cache.phantom.generate import PhantomSettings
from dinomix_cache.teacher.provenance import LABEL_SOURCES, LabelSource

__all__ = ["AnatomyTeacherSettings"]


@dataclass(frozen=True)
class AnatomyTeacherSettings:
    """A small DINOv3 ViT trained on a dataset's labels so that its patch tokens carry anatomy.

    It is not a pretrained DINOv3: it stands in for one where the gated weights cannot be had, so
    that the distillation term has something to distil. Slices are preprocessed and fed exactly as
    ``extract`` feeds its teacher; each patch token learns, through a linear head, the class
    histogram of the pixels it covers.

    Attributes:
        dataset: ``phantom`` (generated under ``data`` on first use), ``synapse``, ``amos`` or ``msd``.
        data: dataset root; default ``data/<dataset>``.
        out: the teacher folder to write; default ``storage/teachers/<dataset>-vit``.
        labels: ``labeled``: the labeled split's cases only (a fair teacher for semi-supervised
            comparisons); ``train``: every training case (labeled and unlabeled), an ORACLE for the
            unlabeled cases, labelled so wherever the teacher is named. Eval and test cases are
            never trained on; the eval cases give the summary's patch accuracy.
        split: how cases get their roles (as ``extract``'s).
        preprocess: the preprocessing, as ``extract``'s; use the store's target shape.
        phantom: the phantom to generate when ``dataset`` is ``phantom`` and ``data`` has none.
        input_size: teacher input (H, W) per slice during training, a multiple of ``patch_size``;
            None = the slice size (``extract``'s default).
        hidden_size, layers, heads, registers, patch_size: the ViT (MLP width 4 × hidden).
        steps: optimiser steps of ``batch_size`` slices each.
        lr: peak AdamW learning rate (linear warm-up over the first 5 % of steps, cosine decay).
        weight_decay: AdamW weight decay.
        gamma_range: per-slice random gamma ``x ** g``, as the strong view of training.
        intensity: per-slice contrast ``1 ± intensity`` and brightness ``± intensity / 2``.
        max_shift: per-slice in-plane shift of image and label, up to this many pixels each way
            (zero fill: air, background).
        seed: weights, batches and augmentation; with the same ``threads`` the same seed gives
            the same weights on one machine.
        threads: torch CPU threads while training (float sums depend on how work is split, so the
            weights do too). 1 by default: the model is small, and on a machine whose cores other
            jobs share, a second thread waiting for a busy core made each step 35 times slower.
        overwrite: replace an existing teacher folder (one made by ``train-teacher`` only).
        progress: show a progress bar.

    Raises:
        SettingsError: a value out of range, naming its option.
    """

    dataset: str = "phantom"
    data: Path | None = None
    out: Path | None = None
    labels: LabelSource = "labeled"
    split: SplitSettings = field(default_factory=SplitSettings)
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    phantom: PhantomSettings = field(default_factory=PhantomSettings)
    input_size: tuple[int, int] | None = None
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    registers: int = 4
    patch_size: int = 16
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    gamma_range: tuple[float, float] = (0.7, 1.5)
    intensity: float = 0.1
    max_shift: int = 8
    seed: int = 0
    threads: int = 1
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice(self.dataset.strip().lower(), DATASETS, "--dataset", "dataset")
        check_choice(self.labels, LABEL_SOURCES, "--labels", "label source")
        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--threads": self.threads,
                    "--hidden-size": self.hidden_size, "--layers": self.layers, "--heads": self.heads,
                    "--patch-size": self.patch_size}
        for option, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise SettingsError(f"{option} {value!r}: give a positive integer")
        # DINOv3's RoPE splits each head's channels into 4 (y/x, sin/cos).
        if self.hidden_size % self.heads or (self.hidden_size // self.heads) % 4:
            raise SettingsError(f"--hidden-size {self.hidden_size} with --heads {self.heads}: each head needs a "
                                "multiple of 4 channels (e.g. 128 and 4)")
        if self.registers < 0 or self.max_shift < 0 or self.seed < 0:
            raise SettingsError("registers, --max-shift and --seed must be >= 0")
        low, high = self.gamma_range
        if not (0 < low <= high < math.inf):
            raise SettingsError(f"gamma range {self.gamma_range}: need 0 < low <= high")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not 0 <= self.weight_decay < math.inf:
            raise SettingsError(f"--lr {self.lr} must be > 0 and weight decay {self.weight_decay} >= 0")
        if not 0 <= self.intensity < 1:
            raise SettingsError(f"intensity jitter {self.intensity}: give a value in [0, 1)")
        if self.input_size is not None and (len(self.input_size) != 2 or any(
                v < 1 or v % self.patch_size for v in self.input_size)):
            raise SettingsError(f"--input-size {self.input_size}: two positive multiples of the patch size "
                                f"{self.patch_size}")

    @property
    def oracle(self) -> bool:
        """Trained on the labels of unlabeled cases (``labels="train"``)."""
        return self.labels == "train"

    def resolved(self) -> AnatomyTeacherSettings:
        """A copy with the default paths filled in."""
        dataset = self.dataset.strip().lower()
        data = self.data if self.data is not None else Path("data") / dataset
        out = self.out if self.out is not None else Path("storage") / "teachers" / f"{dataset}-vit"
        return replace(self, dataset=dataset, data=Path(data), out=Path(out))
