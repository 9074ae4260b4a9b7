"""Schemas of a run folder's files, checked before anything is built from them.

* ``settings.json``: a pydantic model derived from the fields of
  :class:`~stage2_train.train.settings.TrainSettings` (and nested dataclasses such as ``PicSettings``),
  so a field added to the dataclass is accepted with its type, and a settings file written before
  it gets the default. Unknown keys and wrong types are refused; the numbers that size networks
  and loops are bounded (:data:`BOUNDS`), and fields typed with a ``Literal`` (targets, teacher
  view, precision, ...) take only its values.
* ``store.json``: path, ``attrs_sha256`` and the store's attributes, validated by the store's own
  schema (:mod:`dinomix_cache.store.schema`) and hashed again against ``attrs_sha256``.
* the checkpoint payload (``latest.pt``, ``best.pt``): the keys and types :func:`checkpoint_payload
  <stage2_train.train.distributed.checkpoint_payload>` writes; tensors are compared with the networks
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
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, create_model, model_validator

from dinomix_cache.errors import UserError
from dinomix_cache.settings_codec import settings_from_json
from dinomix_cache.store.schema import MAX_HIDDEN, MAX_SIDE, StoreAttrs, check_store_attrs, validation_message
from stage2_train.train.settings import TrainSettings, with_saved_defaults
from stage2_train.train.state import NUMPY_STREAMS, TORCH_STREAMS

__all__ = ["BOUNDS", "check_checkpoint", "check_identity", "dataclass_from_json", "state_dict_mismatch",
           "train_settings_from_json"]

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
    "unsup_rampup": {"ge": 0, "allow_inf_nan": False},
    "tau": {"ge": 0, "le": 1},
    "gamma_range": {"gt": 0, "allow_inf_nan": False},
    "gamma": {"ge": 0, "allow_inf_nan": False},
    "eta": {"ge": 0},
    "box_fraction": {"gt": 0, "le": 1},
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


def _values(model: BaseModel) -> dict[str, Any]:
    """A validated model's values in JSON form, for :func:`~dinomix_cache.settings_codec.settings_from_json`
    (a default nested dataclass instance stays as it is)."""
    return {name: value.model_dump() if isinstance(value, BaseModel) else value
            for name, value in ((n, getattr(model, n)) for n in type(model).model_fields)}


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
        return settings_from_json(cls, _values(model), cls.__name__)
    except (ValueError, TypeError, UserError) as exc:
        raise UserError(f"{where}: {' '.join(str(exc).split())}; restore the file, or start a new run") from None


def train_settings_from_json(text: str, where: str) -> TrainSettings:
    """A run's ``settings.json`` text as validated :class:`TrainSettings` (:func:`dataclass_from_json`).
    The fields that runs saved before them did not record take the values those runs trained with
    (:func:`~stage2_train.train.settings.with_saved_defaults`), not the dataclass defaults.

    Raises:
        UserError: as :func:`dataclass_from_json`.
    """
    try:
        data = json.loads(text)
    except ValueError:
        data = None  # refused below, with the file named
    if isinstance(data, dict):
        text = json.dumps(with_saved_defaults(data))
    return dataclass_from_json(TrainSettings, text, where)  # type: ignore[no-any-return]


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
    # One generator per purpose (TrainState.rngs / .gens), or, in checkpoints written before they were
    # split, one numpy and one torch generator for everything (np_rng, torch_gen, plan_rng).
    rngs: dict[str, dict[str, Any]] | None = None
    gens: dict[str, Tensor] | None = None
    np_rng: dict[str, Any] | None = None
    torch_gen: Tensor | None = None
    torch_global: Tensor
    plan_rng: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_format(self) -> _State:
        old = self.np_rng is not None and self.torch_gen is not None
        if self.rngs is None or self.gens is None:
            if not old:
                raise ValueError("generators: expected either rngs and gens, or np_rng and torch_gen")
            return self
        if old or set(self.rngs) != set(NUMPY_STREAMS) or set(self.gens) != set(TORCH_STREAMS):
            raise ValueError(f"generators: expected rngs {', '.join(NUMPY_STREAMS)} and gens "
                             f"{', '.join(TORCH_STREAMS)}, or np_rng and torch_gen")
        return self


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
