"""The schema of a store's ``dinomix`` attribute (format v1): one pydantic model, checked whole on open.

:func:`parse_store_attrs` validates the attribute as JSON in pydantic's strict mode: every field
typed and bounded, unknown keys refused, roles from the closed set, case ids unique and safe as
path components, the input size a multiple of the patch. What it returns, :class:`StoreAttrs`,
gives the rest of the code typed access (``attrs.teacher.hidden_size``) and the shape every
array of a case must have (:meth:`StoreAttrs.array_spec`), which the store checks against each
array's metadata when a case is read.

Adding a field: add it to the section's model below with a default (``None`` or the value older
stores implicitly had), so that stores written before it still open; a required field, or a
changed meaning, needs a new ``FORMAT_VERSION``. Unknown keys are refused, so a field the code
writes must be declared here first.

Failure modes: :func:`parse_store_attrs` raises :class:`~dinomix_cache.errors.UserError`, one line
naming the store, the first offending field (``dataset.cases[3].role``) and the fix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from dinomix_cache.errors import UserError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MAX_CLASSES", "ArraySpec", "CropWindowsAttrs", "StoreAttrs",
           "check_store_attrs", "parse_store_attrs", "validation_message"]

FORMAT_NAME = "dinomix-feature-store"
FORMAT_VERSION = 1
# Labels are uint8 and 255 is the label arrays' fill value (a voxel no write reached): classes 0..254.
MAX_CLASSES = 255
MAX_CASES = 100_000
MAX_SIDE = 4096             # pixels or voxels along one axis
MAX_VOXELS = 2**27          # of the preprocessed volume (512^3); bounds what predict allocates
MAX_HIDDEN = 16384
IMAGE_MODES = ("trilinear", "area", "nearest", "nearest-exact")
LABEL_MODES = ("nearest", "nearest-exact")
NORMALISATIONS = ("minmax", "window")
Role = Literal["labeled", "unlabeled", "eval", "test"]
ROLE_NAMES: tuple[str, ...] = get_args(Role)

_SAFE_ID = re.compile(r"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,254}")
_AXIS_OF = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}


def _safe_id(value: str) -> str:
    if not _SAFE_ID.fullmatch(value):
        raise ValueError("a case id must be 1-255 characters, not start with '.', and hold no '/', '\\' "
                         "or control characters (it names files and folders)")
    return value


def _axcodes(value: str) -> str:
    if len(value) != 3 or sorted(_AXIS_OF.get(c, -1) for c in value) != [0, 1, 2]:
        raise ValueError("orientation must name one direction per axis in capitals, e.g. SPL or RAS")
    return value


def _unique(values: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    dups = [v for v in values if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"duplicated entries {sorted(set(dups))[:5]}")
    return values


Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
Count = Annotated[int, Field(ge=0, le=2**62)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, Field(max_length=4096)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
CaseId = Annotated[str, AfterValidator(_safe_id)]


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class TeacherTrainingAttrs(_Section):
    """``teacher.training``: how a teacher this project trained (``train-teacher``) was made, from its
    provenance file (:func:`dinomix_cache.teacher.provenance.store_record`). ``oracle``: it learnt from
    the labels of unlabeled cases (``labels`` ``train``), so no semi-supervised result may rest on it."""

    dataset: Name
    labels: Literal["labeled", "train"]
    oracle: bool
    cases: Annotated[list[CaseId], AfterValidator(_unique), Field(max_length=MAX_CASES)]
    target_shape: tuple[Side, Side, Side]
    seed: Annotated[int, Field(ge=0)]


class TeacherAttrs(_Section):
    """``teacher``: what :meth:`dinomix_cache.teacher.model.Teacher.identity` records (keep the two in step).
    ``training`` is absent (None) for hub, folder and random teachers, and in stores made before it existed."""

    source: Annotated[str, Field(min_length=1, max_length=4096)]
    label: Text
    family: Text
    model_type: Text
    model_class: Text
    revision: Text | None
    weights_sha256: Sha256
    config_sha256: Sha256
    hidden_size: Annotated[int, Field(ge=1, le=MAX_HIDDEN)]
    patch_size: Annotated[int, Field(ge=1, le=1024)]
    num_prefix_tokens: Annotated[int, Field(ge=0, le=1024)]
    input_size: tuple[Side, Side]
    mean: tuple[Finite, Finite, Finite]
    std: tuple[Positive, Positive, Positive]
    dtype: Literal["float32", "bfloat16", "float16"]
    layer: Text
    training: TeacherTrainingAttrs | None = None

    @model_validator(mode="after")
    def _grid(self) -> TeacherAttrs:
        if any(side % self.patch_size for side in self.input_size):
            raise ValueError(f"input_size {list(self.input_size)} is not a multiple of patch_size {self.patch_size}")
        return self

    @property
    def token_grid(self) -> tuple[int, int]:
        """Tokens per slice, (rows, columns): ``input_size // patch_size``."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size


class PreprocessingAttrs(_Section):
    """``preprocessing``: :meth:`dinomix_cache.data.preprocess.PreprocessSettings.to_json`."""

    target_shape: tuple[Side, Side, Side]
    hu_window: tuple[Finite, Finite]
    normalisation: Literal["minmax", "window"]
    orientation: Annotated[str, AfterValidator(_axcodes)]
    image_interpolation: Literal["trilinear", "area", "nearest", "nearest-exact"]
    label_interpolation: Literal["nearest", "nearest-exact"]
    image_dtype: Literal["float16", "float32"]
    align_corners: bool
    order: Text
    resize: Text

    @model_validator(mode="after")
    def _bounds(self) -> PreprocessingAttrs:
        if not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window {list(self.hu_window)} must be [low, high] with low < high")
        if math.prod(self.target_shape) > MAX_VOXELS:
            raise ValueError(f"target_shape {list(self.target_shape)} exceeds {MAX_VOXELS} voxels")
        return self


class CaseEntry(_Section):
    """One entry of ``dataset.cases``; the hashes are added when the extraction finishes."""

    id: CaseId
    role: Role
    image_sha256: Sha256 | None = None
    label_sha256: Sha256 | None = None


class SplitAttrs(_Section):
    """``dataset.split``: where the roles came from (provenance; see ``dinomix_cache.data.roles``)."""

    source: Text
    labeled: Text | None = None
    seed: int | None = None
    eval_fraction: Annotated[float, Field(ge=0, le=1)] | None = None
    test_fraction: Annotated[float, Field(ge=0, le=1)] | None = None
    files: dict[Text, Sha256] | None = None
    counts: dict[Role, Count] | None = None
    unlisted: list[Text] = []
    unlabeled_only: list[Text] = []
    case_ids: list[Text] | None = None
    channel: Text | None = None        # MSD / nnU-Net dataset.json
    file_ending: Text | None = None    # MSD / nnU-Net dataset.json


class DatasetAttrs(_Section):
    """``dataset``: name, classes (background first), split record and every case with its role."""

    name: Name
    class_names: Annotated[list[Name], Field(min_length=2, max_length=MAX_CLASSES), AfterValidator(_unique)]
    split: SplitAttrs
    cases: Annotated[list[CaseEntry], Field(max_length=MAX_CASES)]

    @model_validator(mode="after")
    def _unique_ids(self) -> DatasetAttrs:
        ids = [c.id for c in self.cases]
        if len(set(ids)) != len(ids):
            dups = sorted({c for c in ids if ids.count(c) > 1})
            raise ValueError(f"case ids listed twice: {', '.join(dups[:5])}")
        return self


class StorageAttrs(_Section):
    """``storage``: :class:`dinomix_cache.store.storage.StoreSettings`."""

    compression: Literal["lossless", "lossy", "none"]
    keepbits: Annotated[int, Field(ge=1, le=9)]
    chunk_slices: Annotated[int, Field(ge=1, le=MAX_SIDE)]
    volumes: bool


class ProducerAttrs(_Section):
    """``producer``: versions of what wrote the store (no host names)."""

    package: Text
    version: Text
    python: Text
    torch: Text
    transformers: Text
    zarr: Text
    numcodecs: Text
    created: Text


class ExtractionAttrs(_Section):
    """``extraction``: whether every case is complete, and the extraction settings as recorded."""

    complete: bool
    settings: dict[str, JsonValue] | None = None
    finished: Text | None = None

    @property
    def data(self) -> str | None:
        """The dataset folder the store was extracted from, as recorded (None if not a string)."""
        value = (self.settings or {}).get("data")
        return value if isinstance(value, str) else None


class CropWindowsAttrs(_Section):
    """``crop_windows`` (optional): teacher features of in-plane windows, ``windows/<case>``.

    Attributes:
        size: (H, W) of a window in slice pixels.
        positions: window positions per axis (rows, columns).
        token_grid: tokens per window per axis (rows, columns).
    """

    size: tuple[Side, Side]
    positions: tuple[Side, Side]
    token_grid: tuple[Side, Side]


class ArraySpec(BaseModel):
    """The shape and dtype an array of a case must have, and why (for messages)."""

    model_config = ConfigDict(frozen=True)

    shape: tuple[int, ...]
    dtypes: tuple[str, ...]
    because: str


class StoreAttrs(_Section):
    """The whole ``dinomix`` attribute of a format v1 store, typed.

    The views the stages read (a store's :attr:`~dinomix_cache.store.feature_store.FeatureStore.attrs`,
    or the copy a run folder keeps in ``store.json`` through :func:`check_store_attrs`):

    * teacher geometry: ``teacher.hidden_size`` (C), ``teacher.patch_size`` and ``teacher.input_size``
      (pixels), ``teacher.token_grid`` (h, w tokens per slice), ``teacher.num_prefix_tokens``;
    * identity: ``teacher.source``, ``teacher.label``, ``teacher.weights_sha256``, ``producer``;
    * preprocessing: ``preprocessing`` (as
      :class:`~dinomix_cache.data.preprocess.PreprocessSettings`:
      :func:`~dinomix_cache.store.attributes.preprocess_settings`);
    * dataset and roles: ``dataset.name``, :attr:`class_names`, :meth:`roles`, :meth:`case_ids`;
    * extraction: ``extraction.complete``, ``extraction.data``; ``crop_windows``; ``storage``.
    """

    format: Literal["dinomix-feature-store"]
    version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)]
    teacher: TeacherAttrs
    preprocessing: PreprocessingAttrs
    dataset: DatasetAttrs
    storage: StorageAttrs
    producer: ProducerAttrs
    extraction: ExtractionAttrs
    crop_windows: CropWindowsAttrs | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)

    def roles(self) -> dict[str, str]:
        """Case id → role, in dataset order."""
        return {c.id: c.role for c in self.dataset.cases}

    def case_ids(self, role: str | None = None) -> list[str]:
        """Ids of the dataset's cases with ``role`` (every case for None), in dataset order."""
        return [c.id for c in self.dataset.cases if role is None or c.role == role]

    def array_spec(self, name: str) -> ArraySpec:
        """What ``features``, ``image``, ``label`` or ``windows`` of any case must be.

        Raises:
            KeyError: an unknown array name, or ``windows`` in a store without ``crop_windows``.
        """
        t, p = self.teacher, self.preprocessing
        depth = p.target_shape[0]
        if name == "features":
            gh, gw = t.token_grid
            return ArraySpec(shape=(depth, gh, gw, t.hidden_size), dtypes=("float16",),
                             because=f"target_shape[0] {depth}, input_size/patch_size {gh}x{gw} tokens, "
                                     f"hidden_size {t.hidden_size}")
        if name in ("image", "label"):
            dtypes = (p.image_dtype,) if name == "image" else ("uint8",)
            return ArraySpec(shape=p.target_shape, dtypes=dtypes, because=f"target_shape {list(p.target_shape)}")
        if name == "windows" and self.crop_windows is not None:
            w = self.crop_windows
            return ArraySpec(shape=(depth, *w.positions, *w.token_grid, t.hidden_size), dtypes=("float16",),
                             because=f"crop_windows positions {list(w.positions)}, token_grid "
                                     f"{list(w.token_grid)}, hidden_size {t.hidden_size}")
        raise KeyError(name)


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """``PREFIXfield (reason)`` for the first error of a pydantic ValidationError, plus how many more.

    Input values are never echoed: a damaged attribute may hold megabytes.
    """
    first = exc.errors(include_url=False, include_input=False)[0]
    kind = first["type"]
    if kind == "missing":
        reason = "missing"
    elif kind == "extra_forbidden":
        reason = "unknown key"
    else:
        reason = " ".join(str(first["msg"]).removeprefix("Value error, ").split())[:200]
    field = _loc(tuple(first["loc"]))
    field = f"{prefix}{field}" if field else (prefix.rstrip(".") or "value")
    more = f", +{exc.error_count() - 1} more" if exc.error_count() > 1 else ""
    return f"{field} ({reason}{more})"


def parse_store_attrs(meta: Mapping[str, Any], where: str) -> StoreAttrs:
    """Validate a store's ``dinomix`` attribute as a whole.

    Args:
        meta: the attribute (JSON-able; tuples are read as lists, as JSON has them).
        where: the store, for messages.

    Raises:
        UserError: a field is missing, unknown, of the wrong type or out of bounds; the message
            names the store, the field and the fix.
    """
    try:
        return StoreAttrs.model_validate_json(json.dumps(meta, default=str))
    except ValidationError as exc:
        detail = validation_message(exc, "dinomix.")
    except ValueError as exc:  # a value JSON cannot hold
        detail = f"dinomix (not JSON: {exc})"
    raise UserError(f"{where}: invalid store attribute {detail}; its zarr.json was edited or damaged: "
                    "restore it, or rebuild the store with `dinomix-cache extract --overwrite`")


def check_store_attrs(meta: Any, where: str, key: str = "dinomix") -> StoreAttrs:
    """:func:`parse_store_attrs` after the checks with their own messages: a dinomix store at all,
    and a format version this code reads.

    Raises:
        UserError: not a dinomix store (``key`` missing), a newer or invalid format version, or
            what :func:`parse_store_attrs` refuses.
    """
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise UserError(f"{where} is a Zarr group but not a dinomix feature store (no '{key}' attribute)")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{where}: invalid store format version {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(f"{where} uses store format v{version}, newer than this dinomix-cache reads "
                        f"(v{FORMAT_VERSION}): upgrade dinomix-cache")
    return parse_store_attrs(meta, where)
