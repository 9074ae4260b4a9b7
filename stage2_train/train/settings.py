"""Settings of stage two (``dinomix-cache train``): one dataclass, saved resolved with every run."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import torch

from dinomix_cache.errors import SettingsError, check_choice
from dinomix_cache.store.locations import as_location
from stage2_train.method.losses import AUX_MODES, FKD_REDUCTIONS, MASK_WEIGHTINGS, AuxMode, FkdReduction, MaskWeighting
from stage2_train.method.networks import NORMALIZATIONS, Normalization
from stage2_train.method.pic import PicSettings
from stage2_train.targets.policies import POLICIES, Targets
from stage2_train.targets.views import TEACHER_VIEWS, ViewName
from stage2_train.train.precision import (
    MEMORY_FORMATS,
    PRECISIONS,
    MemoryFormat,
    Precision,
    resolve_memory_format,
    resolve_precision,
)

__all__ = ["AUX_MODES", "CROP_GRIDS", "DEFAULT_PRESET", "FKD_REDUCTIONS", "MASK_WEIGHTINGS", "MEMORY_FORMATS",
           "POLICIES", "PRECISIONS", "PRESETS", "SAVED_BEFORE", "TEACHER_VIEWS", "CropGrid", "Preset", "SettingsError",
           "TrainSettings", "preset", "with_saved_defaults"]

Preset = Literal["paper", "cpu", "cpu-small"]
PRESETS: tuple[Preset, ...] = get_args(Preset)
DEFAULT_PRESET: Preset = "paper"  # the dataclass defaults
CropGrid = Literal["token", "voxel"]
CROP_GRIDS: tuple[CropGrid, ...] = get_args(CropGrid)


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run depends on. Defaults are the paper's (``--preset paper``).

    Attributes:
        cache: the feature store: a ``.zarr`` folder, a ``.zip`` made by ``pack``, or an fsspec URL
            (``https://``, ``s3://``, ...), normalised by :func:`~dinomix_cache.store.feature_store.as_location`:
            a :class:`Path` for local stores, a ``str`` for URLs (``Path()`` would turn ``//`` into ``/``).
        data: the dataset folder, only for a store made with ``--no-volumes`` (its cases are then
            preprocessed from the source files, which must be the recorded ones).
        out: the run folder (default ``runs/<store name>-<targets>-seed<seed>``).
        width: VNet base width (32 in the paper; 4-8 for CPU demos).
        crop: (D, H, W) training crop in voxels, each a multiple of 16.
        n_labeled, n_unlabeled: crops per iteration (2 + 2).
        epochs: E_max; an epoch is one pass over the unlabeled cases.
        lr, momentum, weight_decay, nesterov, poly_power: SGD with poly decay (1 - E/E_max)^0.9.
        ema_decay: EMA teacher decay.
        ema_warmup: the mean teacher's warm-up, decay ``min(1 - 1/(t + 1), ema_decay)`` at iteration t, so
            the EMA starts from the trained student instead of its random initialisation.
        lambda_unsup: weight of the unsupervised terms (λ_unsup of Eq. 5, at the end of its ramp).
        unsup_rampup: length of λ_unsup's sigmoid ramp ``exp(-5 (1 - t)²)``, as a fraction of the run's
            iterations (1.0: over the whole run, as DHC, SKCDF and GenericSSL; 0: no ramp).
        unsup_weighting: how ``L_unsup`` weighs its kept voxels (inside the pasted box or confident):
            ``weighted`` (the mask as per-voxel weights over all voxels of x_mix: CE = Σ w CE / N, as MOST
            and FixMatch / ABC) or ``exclude`` (CE averaged over the kept voxels only).
        tau: pseudo-label confidence threshold (0 = every voxel).
        gamma_range: strong view's random gamma range.
        flip: random flips of the weak view (every flipped crop forces a teacher recompute).
        pic: Progressive Imbalance-aware CutMix settings (``pic.enabled`` False = no PIC).
        fkd: foundation-feature distillation on x_mix.
        fkd_reduction: Eq. 1 over the teacher's channels: ``channel_sum`` (as written: the squared L2
            distance of the normalised vectors, 2 - 2 cos, per location) or ``mean`` (divided by C_T).
        aux: auxiliary balanced head losses.
        aux_mode: ``skcdf`` (SKCDF's multiply, which the paper follows), ``weighted`` (the mask as
            per-voxel weights over all voxels, ABC) or ``exclude`` (mean over the kept voxels).
        labeled_only: supervised baseline on the labeled crops only.
        targets: ``online``, ``cache`` or ``hybrid`` distillation targets.
        seed: seeds every random draw.
        checkpoint_every: iterations between atomic ``latest`` checkpoints.
        precision: of the student's and EMA teacher's forwards: ``auto`` (resolved when the run starts and
            saved resolved: ``bfloat16`` autocast on a GPU, and on a CPU with native bf16, AVX512-BF16 or AMX,
            whose bf16 convolutions pass a check against float32 at this width, crop and batch;
            ``float32`` elsewhere), ``float32`` or ``bfloat16``. Losses are float32 either way.
        memory_format: of the networks and their inputs: ``auto`` (resolved at start: ``channels_last``,
            i.e. ``torch.channels_last_3d``, on a CPU except bf16 on an AMX CPU; ``contiguous`` on a GPU),
            ``contiguous`` or ``channels_last``.
        projector_hidden: hidden channels of the projector (None = one 1x1x1 conv).
        teacher_view: what the teacher sees of x_mix. ``slice`` (default): whole preprocessed slices,
            as in stage one (an altered slice altered as a whole slice); cached targets of unaltered
            slices are then the teacher's exactly, for any crop offset. ``crop``: the crop itself, as
            the paper's training loop does; cached targets then need a store with crop windows of the
            crop's in-plane size (``extract --crop-windows``).
        crop_grid: where training crops may start in-plane. ``voxel``: any offset (DHC's RandomCrop);
            ``token``: on the store's token grid (every 16 pixels when the teacher saw the slices at
            their own size), where the crop view's stored windows lie. None (default) resolves to
            ``voxel`` in the slice view, which is exact at any offset, and ``token`` in the crop view,
            where other offsets take the nearest stored window (approximate).
        dropout: the VNet's Dropout3d(0.5) on x5 and the last decoder feature (DHC). Off in
            ``cpu-small``: at width 4 it drops whole channels of a 4-channel feature, and a student
            trained with it stayed far behind one without (``docs/measurements.md``).

        normalization: the VNet's ``batch`` (BatchNorm3d, DHC's; the default) or ``instance``
            (InstanceNorm3d, the ``cpu`` preset's: no running statistics that small crops and batches
            of four can leave behind the weights; see the README's CPU section).

    Raises:
        SettingsError: a value outside its ``Literal`` (``targets``, ``aux_mode``, ``unsup_weighting``,
            ``fkd_reduction``, ``teacher_view``,
            ``crop_grid``, ``precision``, ``memory_format``, ``normalization``), naming the CLI option; at construction.
    """

    cache: Path | str
    out: Path | None = None
    data: Path | None = None
    width: int = 32
    crop: tuple[int, int, int] = (64, 128, 128)
    n_labeled: int = 2
    n_unlabeled: int = 2
    epochs: int = 1500
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 3e-5
    nesterov: bool = True
    poly_power: float = 0.9
    ema_decay: float = 0.99
    ema_warmup: bool = True
    lambda_unsup: float = 0.5
    unsup_rampup: float = 1.0
    unsup_weighting: MaskWeighting = "weighted"
    tau: float = 0.95
    gamma_range: tuple[float, float] = (0.7, 1.5)
    flip: bool = False
    pic: PicSettings = field(default_factory=PicSettings)
    fkd: bool = True
    fkd_reduction: FkdReduction = "channel_sum"
    aux: bool = True
    aux_mode: AuxMode = "skcdf"
    labeled_only: bool = False
    targets: Targets = "hybrid"
    seed: int = 0
    checkpoint_every: int = 50
    precision: Precision = "auto"
    memory_format: MemoryFormat = "auto"
    projector_hidden: int | None = None
    dropout: bool = True
    teacher_view: ViewName = "slice"
    crop_grid: CropGrid | None = None
    normalization: Normalization = "batch"

    def __post_init__(self) -> None:
        # Every reader of `cache` then sees one form, whether it came from the CLI (str), JSON or Path().
        object.__setattr__(self, "cache", as_location(self.cache))
        check_choice(self.targets, POLICIES, "--targets", "targets")
        check_choice(self.aux_mode, AUX_MODES, "--aux-mode", "aux mode")
        check_choice(self.unsup_weighting, MASK_WEIGHTINGS, "--unsup-weighting", "unsup weighting")
        check_choice(self.fkd_reduction, FKD_REDUCTIONS, "--fkd-reduction", "fkd reduction")
        check_choice(self.teacher_view, TEACHER_VIEWS, "--teacher-view", "teacher view")
        if self.crop_grid is not None:
            check_choice(self.crop_grid, CROP_GRIDS, "--crop-grid", "crop grid")
        check_choice(self.precision, PRECISIONS, "--precision", "precision")
        check_choice(self.memory_format, MEMORY_FORMATS, "--memory-format", "memory format")
        check_choice(self.normalization, NORMALIZATIONS, "--normalization", "normalization")

    @property
    def batch(self) -> int:
        """Crops per student forward: labeled + unlabeled."""
        return self.n_labeled + self.n_unlabeled

    @property
    def effective_crop_grid(self) -> CropGrid:
        """``crop_grid``, or where it is None the view's own: ``voxel`` (slice view), ``token`` (crop view)."""
        if self.crop_grid is not None:
            return self.crop_grid
        return "voxel" if self.teacher_view == "slice" else "token"

    def resolved(self, device: torch.device | None = None) -> TrainSettings:
        """A copy with the run folder and the crop grid filled in and, given the ``device`` it trains on,
        ``precision`` and ``memory_format`` resolved (what ``settings.json`` records; a resumed run keeps
        them)."""
        changes: dict = {"crop_grid": self.effective_crop_grid}
        if self.out is None:
            name = str(self.cache).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zip").removesuffix(".zarr")
            mode = "labeled-only" if self.labeled_only else self.targets
            changes["out"] = Path("runs") / f"{name}-{mode}-seed{self.seed}"
        if device is not None:
            precision = resolve_precision(self.precision, device, self.width, self.crop, self.batch)
            changes.update(precision=precision,
                           memory_format=resolve_memory_format(self.memory_format, device, precision))
        return replace(self, **changes)


# What runs saved before a field existed trained with: they resume and evaluate as they trained.
# (Eq. 1 divided by C, L_unsup and aux averaged over their kept voxels, no ramp, no EMA warm-up.)
SAVED_BEFORE = {"memory_format": "contiguous", "fkd_reduction": "mean", "unsup_weighting": "exclude",
                "aux_mode": "exclude", "unsup_rampup": 0.0, "ema_warmup": False}


def with_saved_defaults(data: object) -> object:
    """A saved ``settings.json`` object with the fields that runs saved before them did not record
    (:data:`SAVED_BEFORE`; precision: bf16 autocast on a GPU, float32 on a CPU), so that they resume and
    evaluate as they trained (the dataclass defaults could choose otherwise)."""
    if not isinstance(data, dict):
        return data
    return {"precision": "bfloat16" if torch.cuda.is_available() else "float32", **SAVED_BEFORE, **data}


def preset(name: str, cache: Path | str) -> TrainSettings:
    """The named preset: ``paper`` (the paper's settings); ``cpu`` (width 8, 48x64x64 crops, no dropout,
    instance normalisation, lr 0.5, 30 epochs: the CPU demo's, for a store made at ``--target-shape
    48x96x96``); ``cpu-small`` (width 4, 32x64x64 crops, no dropout, 30 epochs: a smoke run, not for accuracy).

    Raises:
        SettingsError: an unknown name (naming ``--preset``).
    """
    check_choice(name, PRESETS, "--preset", "preset")
    if name == "paper":
        return TrainSettings(cache=cache)
    if name == "cpu":
        return TrainSettings(cache=cache, width=8, crop=(48, 64, 64), epochs=30, lr=0.5, checkpoint_every=40,
                             dropout=False, normalization="instance")
    if name == "cpu-small":
        return TrainSettings(cache=cache, width=4, crop=(32, 64, 64), epochs=30, checkpoint_every=40, dropout=False)
    raise AssertionError(f"preset {name!r} is in PRESETS but has no settings")
