"""Telling a store folder from anything else, and deleting one (``extract --overwrite``) safely."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dinomix_cache.errors import UserError
from dinomix_cache.store.attributes import ATTRS_KEY
from dinomix_cache.store.lock import exclusive_or_refuse

__all__ = ["is_store", "remove_store"]


def is_store(path: Path) -> bool:
    """True if ``path`` is a directory holding a Zarr group with the dinomix attribute."""
    meta_file = Path(path) / "zarr.json"
    if not meta_file.is_file():
        return False
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("node_type") == "group" and isinstance(meta.get("attributes", {}).get(ATTRS_KEY), dict)


def remove_store(path: Path) -> None:
    """Delete a store (for ``--overwrite``); refuses to delete anything that is not a store.

    Raises:
        UserError: ``path`` exists and is not a dinomix store, is a symbolic link (the store it
            points to is not deleted through it), is being read by another process (``train``,
            ``evaluate``, ``pack``: named), or cannot be deleted. Nothing is deleted then.
    """
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link to {path.resolve()}; --overwrite does not delete through a link: "
                        "pass the store's own path as --out")
    if not path.exists():
        return
    with exclusive_or_refuse(path):
        try:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
                return
            if not is_store(path):
                raise UserError(f"{path} is not a dinomix feature store; refusing to delete it. Choose another --out")
            shutil.rmtree(path)
        except OSError as exc:
            raise UserError(f"cannot delete {path} for --overwrite ({exc.strerror or exc}); it may be partly deleted: "
                            "fix the permissions and rerun with --overwrite") from None
