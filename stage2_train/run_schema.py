"""Schemas of a run folder's files, checked before anything is built from them.

* ``settings.json``: a pydantic model derived from the fields of
  :class:`~stage2_train.settings.TrainSettings` (and nested dataclasses such as ``PicSettings``),
  so a field added to the dataclass is accepted with its type, and a settings file written before
  it gets the default. Unknown keys and wrong types are refused; the numbers that size networks
  and loops are bounded (:data:`BOUNDS`), and fields with a closed set of values take only those
  (:data:`CHOICES`).
* ``store.json``: path, ``attrs_sha256`` and the store's attributes, validated by the store's own
  schema (:mod:`dinomix_cache.store_schema`) and hashed again against ``attrs_sha256``.
* the checkpoint payload (``latest.pt``, ``best.pt``): the keys and types :func:`checkpoint_payload
  <stage2_train.distributed.checkpoint_payload>` writes; tensors are compared with the networks
  before loading (:func:`state_dict_mismatch`).

Failure modes: every check raises :class:`~dinomix_cache.errors.UserError`, one line naming the
file, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, create_model

from dinomix_cache.errors import UserError
from dinomix_cache.store_schema import MAX_HIDDEN, MAX_SIDE, StoreAttrs, check_store_attrs, validation_message
from stage2_train.networks import MEMORY_FORMATS, NORMALIZATIONS, PRECISIONS
from stage2_train.settings import CROP_GRIDS
from stage2_train.teacher_views import TEACHER_VIEWS

__all__ = ["BOUNDS", "CHOICES", "check_checkpoint", "check_identity", "dataclass_from_json", "state_dict_mismatch"]

# Bounds of fields that size networks, batches and loops (applied to each element of a tuple).
# Keyed by field name; fields absent from a dataclass are ignored, new ones are unbounded.
BOUNDS: dict[str, dict[str, Any]] = {
    "width": {"ge": 1, "le": 128},
    "crop": {"ge": 1, "le": MAX_SIDE},
    "n_labeled": {"ge": 1, "le": 256},
    "n_unlabeled": {"ge": 1, "le": 256},
    "epochs": {"ge": 1, "le": 10**7},
    "checkpoint_every": {"ge": 1, "le": 10**9},
    "projector_hidden": {"ge": 1, "le": MAX_HIDDEN},
    "seed": {"ge": 0, "le": 2**63 - 1},
    "lr": {"gt": 0, "allow_inf_nan": False},
    "momentum": {"ge": 0, "le": 1},
    "weight_decay": {"ge": 0, "allow_inf_nan": False},
    "poly_power": {"ge": 0, "allow_inf_nan": False},
    "ema_decay": {"ge": 0, "le": 1},
    "lambda_unsup": {"ge": 0, "allow_inf_nan": False},
    "tau": {"ge": 0, "le": 1},
    "gamma_range": {"gt": 0, "allow_inf_nan": False},
    "gamma": {"ge": 0, "allow_inf_nan": False},
    "eta": {"ge": 0},
    "box_fraction": {"gt": 0, "le": 1},
}
CHOICES: dict[str, tuple[str, ...]] = {
    "targets": ("online", "cache", "hybrid"),
    "aux_mode": ("exclude", "skcdf"),
    "crop_grid": CROP_GRIDS,
    "teacher_view": TEACHER_VIEWS,
    "precision": PRECISIONS,
    "memory_format": MEMORY_FORMATS,
    "normalization": NORMALIZATIONS,
}
_STRICT = ConfigDict(strict=True, extra="forbid")


def _constrained(hint: Any, name: str) -> Any:
    """The JSON form of a field's type: paths as strings, dataclasses as their models, bounds applied."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Path:
        return str
    if dataclasses.is_dataclass(hint):
        return _model_of(hint)  # type: ignore[arg-type]
    if origin in (types.UnionType, typing.Union):
        return typing.Union[tuple(_constrained(a, name) for a in args)]  # noqa: UP007
    if origin is tuple:
        inner = [_constrained(a, name) for a in args if a is not Ellipsis]
        return tuple[tuple(inner) + ((...,) if Ellipsis in args else ())]  # type: ignore[misc]
    if hint is str and name in CHOICES:
        return Literal[CHOICES[name]]  # type: ignore[valid-type]
    if hint in (int, float) and name in BOUNDS:
        return Annotated[hint, Field(**BOUNDS[name])]
    return hint


@functools.cache
def _model_of(cls: type) -> type[BaseModel]:
    """A strict pydantic model of a dataclass's fields (defaults kept: missing keys take them)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)  # e.g. a PicSettings(), kept as it is
        else:
            default = ...
        fields[f.name] = (_constrained(hints[f.name], f.name), default)
    return create_model(f"{cls.__name__}Json", __config__=_STRICT, **fields)


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    """The dataclass from a validated model's values: nested dataclasses rebuilt, paths made Paths."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value, hint = values[f.name], hints[f.name]
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):  # (a default instance stays)
            value = _build(hint, value)  # type: ignore[arg-type]
        elif value is not None and Path in (hint, *typing.get_args(hint)) and str not in typing.get_args(hint):
            value = Path(value)  # `cache` (Path | str) stays as saved: a URL must keep its //
        kwargs[f.name] = value
    return cls(**kwargs)


def dataclass_from_json(cls: type, text: str, where: str) -> Any:
    """Validate a settings file's text against ``cls``'s fields and build the dataclass.

    Args:
        cls: the settings dataclass (e.g. ``TrainSettings``).
        text: the file's content.
        where: the file, for messages.

    Raises:
        UserError: not a JSON object, an unknown key, a wrong type, a value out of bounds, or a
            value the dataclass itself refuses.
    """
    try:
        model = _model_of(cls).model_validate_json(text)
    except ValidationError as exc:
        kind = exc.errors()[0]["type"]
        if kind in ("json_invalid", "model_type"):
            raise UserError(f"{where} is not a JSON object of {cls.__name__} ({exc.errors()[0]['msg']}); the run "
                            "folder is damaged: restore the file, or start a new run") from None
        raise UserError(f"{where}: invalid setting {validation_message(exc)}; restore the file as training wrote "
                        "it, or start a new run") from None
    try:
        return _build(cls, {name: getattr(model, name) for name in type(model).model_fields})
    except (ValueError, TypeError, UserError) as exc:
        raise UserError(f"{where}: {' '.join(str(exc).split())}; restore the file, or start a new run") from None


class _Identity(BaseModel):
    model_config = _STRICT

    path: str
    attrs_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    meta: dict[str, JsonValue] | None = None


def check_identity(text: str, where: str) -> tuple[dict[str, Any], StoreAttrs | None]:
    """Validate ``store.json``: its keys, the store attributes it records, and their hash.

    Returns:
        The identity as a dict (``path``, ``attrs_sha256``, ``meta``), and the attributes typed
        (None for a run recorded before store.json held them).

    Raises:
        UserError: not a JSON object, a missing or unknown key, attributes the store schema
            refuses, or attributes that do not hash to ``attrs_sha256`` (an edited file).
    """
    try:
        identity = _Identity.model_validate_json(text)
    except ValidationError as exc:
        raise UserError(f"{where}: invalid store identity {validation_message(exc)}; restore the file as training "
                        "wrote it, or start a new run") from None
    data = json.loads(text)
    if identity.meta is None:
        return data, None
    attrs = check_store_attrs(data["meta"], where)
    canonical = json.dumps(data["meta"], sort_keys=True, separators=(",", ":"), default=str)
    if hashlib.sha256(canonical.encode()).hexdigest() != identity.attrs_sha256:
        raise UserError(f"{where}: the recorded store attributes do not hash to its attrs_sha256 (the file was "
                        "edited); restore it as training wrote it, or start a new run")
    return data, attrs


Tensor = torch.Tensor


class _Networks(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)

    student: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Any]


class _State(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)

    epoch: Annotated[int, Field(ge=0)]
    iteration: Annotated[int, Field(ge=0)]
    step: Annotated[int, Field(ge=0)]
    plan: list[Annotated[list[list[str]], Field(min_length=2, max_length=2)]]
    best_dice: float
    np_rng: dict[str, Any]
    torch_gen: Tensor
    torch_global: Tensor
    plan_rng: dict[str, Any] | None = None


class _Payload(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)

    networks: _Networks
    state: _State
    world_size: Annotated[int, Field(ge=1, le=65536)] = 1
    ranks: list[dict[str, Any]] | None = None


def check_checkpoint(payload: Any, where: Path) -> dict[str, Any]:
    """Check a loaded checkpoint is one this code wrote: its keys and types (tensors not read).

    Raises:
        UserError: a foreign object (naming the first missing, unknown or mistyped field).
    """
    try:
        checked = _Payload.model_validate(payload)
    except ValidationError as exc:
        raise UserError(f"{where} is not a checkpoint of a dinomix-cache run ({validation_message(exc)}): a foreign "
                        "or damaged file; restore the run's own checkpoint, or start a new run") from None
    if checked.ranks is not None and len(checked.ranks) != checked.world_size:
        raise UserError(f"{where}: {len(checked.ranks)} ranks' states for world_size {checked.world_size}; "
                        "the checkpoint is damaged: restore it, or start a new run")
    return payload  # type: ignore[no-any-return]


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str | None:
    """How a checkpoint's state dict differs from a network's (first difference), or None if it fits."""
    missing = [k for k in expected if k not in got]
    if missing:
        return f"{missing[0]} missing" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
    unknown = [k for k in got if k not in expected]
    if unknown:
        return f"unknown tensor {unknown[0]}"
    for key, tensor in expected.items():
        if tuple(got[key].shape) != tuple(tensor.shape) or got[key].dtype != tensor.dtype:
            shape = "x".join(map(str, got[key].shape)) or "scalar"
            want = "x".join(map(str, tensor.shape)) or "scalar"
            return f"{key} is {shape} {got[key].dtype} in the checkpoint, {want} {tensor.dtype} in the network"
    return None
