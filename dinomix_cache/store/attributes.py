"""A store's ``dinomix`` attribute: read and validated on open, typed views, updates, the append check.

The attribute is kept twice: as stored (:attr:`StoreAttributes.meta`, whose canonical JSON is the
store's identity and is copied into run folders) and typed (:attr:`StoreAttributes.attrs`, a
:class:`~dinomix_cache.store.schema.StoreAttrs`). Code outside the store package reads the typed
form only; a saved copy (a run folder's ``store.json``) gives the same views through
:func:`~dinomix_cache.store.schema.check_store_attrs`. :class:`StoreAttributes` is the part of
:class:`~dinomix_cache.store.feature_store.FeatureStore` that holds an open store's location and
its attribute.

Failure modes: reading or updating raises :class:`~dinomix_cache.errors.UserError` naming the
store, the first offending field and the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
from pydantic import BaseModel
from zarr.errors import ZarrUserWarning

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.errors import writing
from dinomix_cache.store.lock import ReaderLock
from dinomix_cache.store.schema import StoreAttrs, check_store_attrs, parse_store_attrs
from dinomix_cache.store.storage import StoreSettings

__all__ = ["ATTRS_KEY", "StoreAttributes", "attrs_mismatches", "load_attrs", "preprocess_settings", "validate_attrs"]

ATTRS_KEY = "dinomix"


def load_attrs(attrs: Mapping[str, Any], where: str) -> tuple[dict[str, Any], StoreAttrs]:
    """The ``dinomix`` group attribute as stored (its canonical JSON is the store's identity) and in
    its typed, validated form.

    Raises:
        UserError: not a dinomix store, a newer format version, or a field missing, unknown,
            mistyped or out of bounds (see :func:`~dinomix_cache.store.schema.check_store_attrs`).
    """
    meta = attrs.get(ATTRS_KEY)
    return meta, check_store_attrs(meta, where, ATTRS_KEY)  # type: ignore[return-value]


def validate_attrs(attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """:func:`load_attrs`, returning the validated ``dinomix`` dictionary only."""
    return load_attrs(attrs, where)[0]


def preprocess_settings(attrs: StoreAttrs) -> PreprocessSettings:
    """The preprocessing a store's volumes were made with, as settings: inputs segmented by a model
    trained from the store must be prepared exactly so."""
    return PreprocessSettings.from_json(attrs.preprocessing.model_dump())


# Fields whose disagreement makes an existing store unusable for an extraction.
_MATCHED = (("teacher", None), ("preprocessing", None), ("storage", None),
            ("dataset", "name"), ("dataset", "class_names"), ("dataset", "cases"))


def attrs_mismatches(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Fields that differ between a store's ``dinomix`` attribute and the one an extraction would
    write, e.g. ``teacher.input_size: store [160, 160], requested [128, 128]``; empty when the store
    can be appended to. Case entries are compared by id and role only (finishing adds hashes)."""
    problems = []
    for section, key in _MATCHED:
        old, new = existing.get(section, {}), wanted[section]
        keys = [key] if key else sorted(set(old) | set(new))
        for k in keys:
            a, b = old.get(k), new.get(k)
            if k == "cases":
                a, b = ([(c.get("id"), c.get("role")) for c in v or []] for v in (a, b))
            if a != b:
                shown = ("(differs)" if k == "cases" else f"store {old.get(k)!r}, requested {new.get(k)!r}")
                problems.append(f"{section}.{k}: {shown}")
    old_windows, new_windows = existing.get("crop_windows"), wanted.get("crop_windows")
    if old_windows != new_windows:
        problems.append(f"crop_windows: store {old_windows!r}, requested {new_windows!r}")
    return problems


class StoreAttributes:
    """An open store's location and its validated ``dinomix`` attribute (the base of
    :class:`~dinomix_cache.store.feature_store.FeatureStore`, which documents the arguments).

    Raises:
        UserError: ``meta`` does not validate (when ``attrs`` is not given).
    """

    def __init__(self, group: zarr.Group, path: Path | str, meta: dict[str, Any], kind: str = "folder",
                 storage_options: dict[str, Any] | None = None, attrs: StoreAttrs | None = None) -> None:
        self.group = group
        self.path = path
        self.location = str(path)
        self.kind = kind
        self._storage_options = storage_options
        self._meta = meta
        self._attrs = attrs if attrs is not None else parse_store_attrs(meta, self.location)
        self._reader_lock: ReaderLock | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The validated ``dinomix`` group attribute (teacher, preprocessing, dataset, ...) as stored."""
        return self._meta

    @property
    def attrs(self) -> StoreAttrs:
        """The same attribute, typed: ``store.attrs.teacher.hidden_size``, ``store.attrs.dataset.cases``."""
        return self._attrs

    def update_meta(self, **sections: Any) -> None:
        """Replace top-level sections of the ``dinomix`` attribute (written atomically). A section is
        given as its JSON dict or as its typed model (``store.attrs.producer.model_copy(update=...)``).

        Raises:
            UserError: the result does not validate, or the write fails (naming the store).
        """
        dumped = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in sections.items()}
        meta = {**self._meta, **dumped}
        attrs = load_attrs({ATTRS_KEY: meta}, self.location)[1]
        with writing(self.location):
            self.group.attrs[ATTRS_KEY] = meta
        self._meta, self._attrs = meta, attrs

    @property
    def class_names(self) -> list[str]:
        return self._attrs.class_names

    @property
    def crop_windows(self) -> dict[str, list[int]] | None:
        """``{"size": [H, W], "positions": [ny, nx], "token_grid": [h', w']}`` of a store that holds the
        tokens of every token-aligned crop window (``extract --crop-windows HxW``), else None."""
        return self._meta.get("crop_windows")

    @property
    def storage(self) -> StoreSettings:
        return StoreSettings(**self._attrs.storage.model_dump())

    def roles(self) -> dict[str, str]:
        """Case id → role (labeled / unlabeled / eval / test) for every case the dataset lists."""
        return self._attrs.roles()

    @property
    def preprocess(self) -> PreprocessSettings:
        """The preprocessing the store's volumes were made with (:func:`preprocess_settings`)."""
        return preprocess_settings(self._attrs)

    def mismatches(self, wanted: Mapping[str, Any]) -> list[str]:
        """What keeps an extraction that would write ``wanted`` from appending to this store
        (:func:`attrs_mismatches`); empty when it may."""
        return attrs_mismatches(self._meta, wanted)

    def consolidate(self) -> None:
        """Copy every node's metadata into the root ``zarr.json`` (Zarr's consolidated metadata).

        A reader then opens the store and any case with one request in all, instead of two or
        three per case (worth it over HTTP). For finished stores: opening the store with
        ``mode="r+"`` drops the copy again, since new cases would not be in it.
        """
        with warnings.catch_warnings(), writing(self.location):  # "consolidated metadata is not in the v3 spec" (yet)
            warnings.simplefilter("ignore", ZarrUserWarning)
            zarr.consolidate_metadata(self.group.store, path=self.group.path, zarr_format=3)
