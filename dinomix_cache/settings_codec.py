"""The JSON form of every settings dataclass, and back.

:func:`settings_to_json` is what the store (``extraction.settings``, ``storage``), a run folder
(``settings.json``), ``phantom.json``, ``results.json`` and ``ablation.json`` record;
:func:`settings_from_json` rebuilds the dataclass from it, reading each value by the field's type:

* nested settings (``ExtractSettings.teacher``, ``TrainSettings.pic``) are JSON objects, rebuilt
  as their dataclass;
* tuples (crops, windows, ranges, ``EvaluateSettings.runs``) are JSON arrays, rebuilt as tuples of
  their element type;
* paths are strings, rebuilt as :class:`~pathlib.Path`, except a field that is ``Path | str``
  (a store location), which keeps the string: ``Path()`` would turn a URL's ``//`` into ``/``;
* None is ``null``; numbers, strings and booleans are themselves (``inf`` is JSON's ``Infinity``).

A key missing from the JSON takes the dataclass default, so settings recorded before a field existed
still load (:func:`stage2_train.train.settings.with_saved_defaults` fills the ones whose default
would change what an old run did). This is the structural codec only: the files a user may edit are
also checked by a schema first (:func:`stage2_train.train.run_schema.dataclass_from_json`), and every
dataclass checks its own values when it is built.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from dinomix_cache.errors import SettingsError, UserError

__all__ = ["settings_from_json", "settings_to_json"]

T = TypeVar("T")


def settings_to_json(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a JSON-able dict: nested dataclasses as dicts, tuples as lists, paths
    (and any other non-JSON value) as strings, None as None.

    Raises:
        TypeError: ``settings`` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(settings) or isinstance(settings, type):
        raise TypeError(f"{type(settings).__name__} is not a settings dataclass")
    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))  # type: ignore[no-any-return]


def settings_from_json(cls: type[T], data: Mapping[str, Any], where: str = "the settings") -> T:
    """The dataclass ``cls`` from its :func:`settings_to_json` form (the inverse: ``settings_from_json(
    type(s), settings_to_json(s)) == s`` for every settings dataclass).

    Args:
        cls: the settings dataclass.
        data: its JSON object; missing keys take the dataclass defaults.
        where: the file or record it came from, for messages.

    Raises:
        SettingsError: not a JSON object, an unknown key, an array of the wrong length for a tuple
            field, or a missing field that has no default. Whatever the dataclass itself refuses
            (a :class:`~dinomix_cache.errors.UserError`, naming the CLI option) propagates.
    """
    if not isinstance(data, Mapping):
        raise SettingsError(f"{where}: expected a JSON object of {cls.__name__}, got {type(data).__name__}")
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise SettingsError(f"{where}: unknown {cls.__name__} setting(s) {', '.join(unknown)}")
    kwargs = {name: _decode(hints[name], value, f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except TypeError as exc:  # a required field missing
        raise SettingsError(f"{where}: {exc}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved type of each init field of ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _decode(hint: Any, value: Any, where: str) -> Any:
    """``value`` read as ``hint`` (see the module docstring); values of other types are kept as they are."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return settings_from_json(hint, value, where) if isinstance(value, Mapping) else value  # type: ignore[arg-type]
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        if Path in options and str in options:
            return value  # a store location: a local path or a URL, normalised by the dataclass
        return _decode(options[0], value, where) if len(options) == 1 else value
    if hint is Path:
        return Path(value) if isinstance(value, str) else value
    if origin is tuple and isinstance(value, list | tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise SettingsError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_decode(a, v, where) for a, v in zip(args, value, strict=True))
    return value
