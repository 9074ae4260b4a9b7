"""``dinomix-cache pack``: a complete store as one ``.zip`` file, to hand over or serve as one object.

The zip holds the store's files at its top (``zarr.json``, ``features/...``), so both
``FeatureStore.open("x.zip")`` and plain zarr (``zarr.open_group(zarr.storage.ZipStore("x.zip",
mode="r"), mode="r")``) read it. Chunks are stored as they are (``ZIP_STORED``): they are Blosc
compressed already and a reader seeks straight to them. The root ``zarr.json`` carries Zarr's
consolidated metadata (every node's metadata in one document), so a reader opens any case without
another metadata read. Files are found from the store's attributes, never by listing, so a store
behind an HTTP URL packs too. The zip is written to a temporary file beside ``OUT`` and renamed into
place: an interrupted pack never leaves a partial ``OUT``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import warnings
import zipfile
from pathlib import Path

import zarr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning
from zarr.storage import MemoryStore

from dinomix_cache.atomic import atomic_path, remove_stale_temporaries
from dinomix_cache.errors import UserError, writing
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.locations import as_location

# Chunks fetched concurrently: hides the round trip of a remote store; 32 feature chunks of a
# ViT-S/16 store at 160x160 are about 40 MB in memory.
BATCH = 32
# A fixed timestamp: packing the same store twice gives the same bytes.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def pack_store(store: FeatureStore | Path | str, out: Path | str, overwrite: bool = False,
               progress: bool = False) -> Path:
    """Write a complete store into one zip file.

    Args:
        store: the store, or its location (folder, zip or URL).
        out: the zip to write; must end with ``.zip``.
        overwrite: replace an existing ``out``.
        progress: show a progress bar over the files.

    Returns:
        ``out``.

    Raises:
        UserError: ``out`` exists (without ``overwrite``), is not a ``.zip`` name or lies inside
            the store; the store is not complete (finish it with extract first); the zip cannot be
            written (read-only folder, full disk: naming it). While packing, the store holds a
            reader lock (``extract --overwrite`` refuses to delete it).
    """
    out = Path(out)
    location = store.path if isinstance(store, FeatureStore) else as_location(store)
    if isinstance(location, Path) and location.is_dir() and out.resolve().is_relative_to(location.resolve()):
        raise UserError(f"{out} lies inside the store {location}: the zip would become part of what it packs; "
                        "write it beside the store instead")
    if out.suffix.lower() != ".zip":
        raise UserError(f"{out}: the packed store must be a .zip file (e.g. {out.with_suffix('.zip').name})")
    if out.is_dir():
        raise UserError(f"{out} is a folder; choose a .zip file name")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another name")
    source = store if isinstance(store, FeatureStore) else FeatureStore.open(store).hold_reader_lock()
    try:
        _require_complete(source)
        nodes = source.nodes()
        names = [_join(rel, "zarr.json") for rel, _ in nodes]
        values = _read(source, names)
        if any(value is None for value in values):
            raise UserError(f"{source.location}: metadata of a node vanished while packing; verify the store")
        metadata: dict[str, bytes] = dict(zip(names, values, strict=True))  # type: ignore[arg-type]
        chunks = [_join(rel, node.metadata.encode_chunk_key(coords))
                  for rel, node in nodes if isinstance(node, zarr.Array)
                  for coords in itertools.product(*(range(n) for n in node.cdata_shape))]
        with writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out.parent, [out.name])  # of a pack killed while writing
            with atomic_path(out) as tmp:
                _write_zip(tmp, source, metadata, chunks, progress)
    finally:
        if source is not store:
            source.close()
    return out


def _require_complete(store: FeatureStore) -> None:
    incomplete = store.incomplete_cases()
    if incomplete or not store.attrs.extraction.complete or store.class_voxels() is None:
        what = f"{len(incomplete)} case(s) missing, e.g. {' '.join(incomplete[:3])}" if incomplete else "statistics"
        raise UserError(f"{store.location} is not complete ({what}); finish it by rerunning the same extract "
                        "command, then pack it")


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _read(store: FeatureStore, keys: list[str]) -> list[bytes | None]:
    """Raw bytes of store keys (relative to the store's root group), fetched concurrently."""
    prefix = store.group.path
    prototype = default_buffer_prototype()

    async def fetch() -> list[bytes | None]:
        buffers = await asyncio.gather(*(store.group.store.get(_join(prefix, k), prototype) for k in keys))
        return [None if b is None else b.to_bytes() for b in buffers]

    return sync(fetch())


def _consolidated_root(metadata: dict[str, bytes]) -> bytes:
    """The root ``zarr.json`` with every node's metadata consolidated into it."""
    prototype = default_buffer_prototype()
    memory = MemoryStore({key: prototype.buffer.from_bytes(value) for key, value in metadata.items()})
    with warnings.catch_warnings():  # "consolidated metadata is not part of the Zarr v3 spec" (yet)
        warnings.simplefilter("ignore", ZarrUserWarning)
        zarr.consolidate_metadata(memory, zarr_format=3)
    root = sync(memory.get("zarr.json", prototype))
    assert root is not None
    return root.to_bytes()


def _write_zip(path: Path, store: FeatureStore, metadata: dict[str, bytes], chunks: list[str],
               progress: bool) -> None:
    def add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        zf.writestr(info, data)

    bar = Progress(TextColumn("[bold]pack[/]"), BarColumn(bar_width=30), MofNCompleteColumn(), TextColumn("files"),
                   TimeRemainingColumn(compact=True), console=Console(stderr=True), disable=not progress,
                   transient=True)
    with bar, open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        task = bar.add_task("", total=len(metadata) + len(chunks))
        # The root first: a reader streaming the zip meets the layout before the data.
        add(zf, "zarr.json", _consolidated_root(metadata))
        for name, data in metadata.items():
            if name != "zarr.json":
                add(zf, name, data)
        bar.advance(task, len(metadata))
        for start in range(0, len(chunks), BATCH):
            batch = chunks[start:start + BATCH]
            for name, data in zip(batch, _read(store, batch), strict=True):
                if data is not None:  # never written: the array's fill value (stores made before zarr wrote all)
                    add(zf, name, data)
            bar.advance(task, len(batch))
        zf.close()
        fh.flush()
        os.fsync(fh.fileno())
