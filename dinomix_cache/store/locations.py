"""Where a feature store lives: a local folder, a ``.zip`` of one, or an fsspec URL.

:func:`as_location` normalises what users type (``Path("http://h/x")`` loses a slash; it is put
back); :func:`open_zarr_group` opens the Zarr v3 group and turns zarr's and the transport's errors
(HTTP 404/403, refused connections, a damaged ``zarr.json``) into one-line
:class:`~dinomix_cache.errors.UserError` messages. Readers never list a folder: HTTP servers cannot.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import zarr
from fsspec.core import url_to_fs
from fsspec.registry import known_implementations, registry
from zarr.storage import FsspecStore

from dinomix_cache.errors import UserError

__all__ = ["READ_ONLY_PROTOCOLS", "as_location", "fsspec_du", "fsspec_store", "is_url", "is_zip",
           "open_zarr_group", "url_protocols", "zip_root"]

# "s3://bucket/x.zarr", "https://host/x.zarr", and fsspec's chained "simplecache::s3://bucket/x.zarr".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(?:::[A-Za-z][A-Za-z0-9+.-]*)*://")
# What ``Path("http://host/x")`` makes of a URL: ``http:/host/x``.
_COLLAPSED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)(.+)$")
# Schemes a store cannot be written through: HTTP servers take no writes, and a zip is written
# once, whole, by `pack` (zip members cannot be replaced in place).
READ_ONLY_PROTOCOLS = frozenset({"http", "https", "zip"})


def is_url(location: Path | str) -> bool:
    """True for an fsspec URL (``http://``, ``s3://``, ``simplecache::s3://``, ...), as a ``str``."""
    return isinstance(location, str) and bool(_URL.match(location))


def as_location(location: Path | str) -> Path | str:
    """Normalise a store location: an fsspec URL stays a ``str``, anything else is a :class:`Path`.

    ``file://`` URLs become paths. A URL that went through ``Path()`` on its way here lost one
    slash of its ``//`` (``Path("http://h/x")`` is ``http:/h/x``); it gets it back when its scheme is
    a known fsspec protocol and no such local path exists, so settings saved as paths still work.
    """
    text = str(location)
    if _URL.match(text):
        if text.startswith("file://"):
            return Path(text.removeprefix("file://"))
        return text.rstrip("/")
    collapsed = _COLLAPSED_URL.match(text)
    if collapsed and collapsed[1].lower() in _fsspec_protocols() - {"file", "local"} and not Path(text).exists():
        return f"{collapsed[1]}://{collapsed[2]}".rstrip("/")
    return Path(text)


def _fsspec_protocols() -> set[str]:
    return {*known_implementations, *registry}


def url_protocols(url: str) -> set[str]:
    """Every protocol of a (possibly chained) fsspec URL: ``zip://a::https://h/x.zip`` → {zip, https}."""
    return {part.split("://", 1)[0].lower() for part in url.split("::") if part}


def is_zip(path: Path) -> bool:
    """A ``.zip`` path that is not a folder, or any zip archive whatever its name."""
    if path.is_dir():
        return False
    return path.suffix.lower() == ".zip" or (path.is_file() and zipfile.is_zipfile(path))


def zip_root(path: Path) -> str:
    """Where the store's ``zarr.json`` sits in a zip: at the top (``pack``'s layout) or in one top folder
    (``zip -r s.zarr.zip s.zarr``).

    Raises:
        UserError: no ``zarr.json`` at either place.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is not a readable zip archive ({exc}); pack the store again") from None
    if "zarr.json" in names:
        return ""
    tops = [n.removesuffix("/zarr.json") for n in names if n.count("/") == 1 and n.endswith("/zarr.json")]
    if len(tops) == 1:
        return tops[0]
    raise UserError(f"{path} holds no feature store (no zarr.json at its top or in a single top folder); "
                    "make the zip with `dinomix-cache pack STORE OUT.zip`")


def fsspec_store(url: str, read_only: bool, storage_options: dict[str, Any] | None) -> FsspecStore:
    try:
        return FsspecStore.from_url(url, read_only=read_only, storage_options=storage_options)
    except ImportError as exc:  # the scheme's fsspec backend (s3fs, gcsfs, ...) is not installed
        raise UserError(f"cannot open {url}: {exc}") from None
    except ValueError as exc:  # an unknown protocol
        raise UserError(f"cannot open {url}: {exc}; use a local path, a .zip, or an fsspec URL") from None


def open_zarr_group(store: Any, path: str, mode: str, where: str) -> zarr.Group:
    """Open the Zarr v3 group of a store, turning zarr's and the transport's errors into one line.

    Stores opened read-only use the consolidated metadata ``pack`` writes (no request per node); a
    writer ignores it, since it would go stale with the first new case.
    """
    try:
        return zarr.open_group(store=store, path=path, mode=mode, zarr_format=3,
                               use_consolidated=None if mode == "r" else False)
    except FileNotFoundError:  # zarr's GroupNotFoundError; HTTP 404 reads as a missing key
        http = bool(is_url(where) and url_protocols(where) & {"http", "https"})
        detail = f"HTTP 404 for {where}/zarr.json" if http else "no zarr.json there"
        raise UserError(f"cannot open {where}: not found ({detail}); check the location") from None
    except Exception as exc:  # the transport (HTTP 403, a refused connection, ...) or a damaged zarr.json
        status = getattr(exc, "status", None)
        transport = type(exc).__module__.split(".")[0] in ("aiohttp", "botocore", "google", "fsspec")
        if status is not None or transport or isinstance(exc, OSError | TimeoutError):
            reason = (f"HTTP {status} {getattr(exc, 'message', '')}".strip() if status
                      else f"{type(exc).__name__}: {exc}")
            raise UserError(f"cannot open {where} ({reason}); check the location and that it is reachable") from None
        raise UserError(f"{where} is not a readable Zarr v3 group ({type(exc).__name__}: {exc}); "
                        "rebuild it with extract") from None


def fsspec_du(url: str, sub: str, storage_options: dict[str, Any] | None) -> int | None:
    """Sum of object sizes under ``url/sub``, or None where the filesystem cannot list (HTTP)."""
    if url_protocols(url) & {"http", "https"}:
        return None
    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
        target = f"{root.rstrip('/')}/{sub}" if sub else root
        return int(fs.du(target, total=True)) if fs.exists(target) else 0
    except Exception:  # sizes are informative only; a filesystem without du gives "unknown"
        return None
