"""The store verbs: ``info``, ``verify`` and ``pack``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from dinomix_cache.cli.common import err, out, user_errors
from dinomix_cache.store.inspection import store_info, verify_store
from dinomix_cache.store.pack import pack_store


@user_errors
def info(
    store: str = typer.Argument(..., help="A feature store: a .zarr folder, a .zip made by pack, or a URL "
                                "(https://, s3://, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show a store's teacher, preprocessing, dataset, cases by role, shapes and sizes."""
    summary = store_info(store)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    t, p, d, b = summary["teacher"], summary["preprocessing"], summary["dataset"], summary["bytes"]
    per_slice = summary["feature_bytes_per_slice"]
    windows = f"crop windows {b['windows'] / 1e6:.2f} MB, " if b.get("windows") else ""
    rows = [
        ("store", f"{summary['path']} ({summary['format']})"),
        ("teacher", f"{t['source']} [{t['label']}] {t['family']}, hidden {t['hidden_size']}, patch "
                    f"{t['patch_size']}, input {t['input_size'][0]}x{t['input_size'][1]}, {t['dtype']}"),
        ("weights sha256", str(t.get("weights_sha256"))),
        ("preprocessing", f"orientation {p.get('orientation')}, HU {p.get('hu_window')}, {p.get('normalisation')}, "
                          f"resized to {'x'.join(str(v) for v in p['target_shape'])}"),
        ("dataset", f"{d['name']}, {len(d['class_names'])} classes, split {_split_summary(d.get('split', {}))}"),
        ("cases complete/all", ", ".join(f"{r} {v['complete']}/{v['cases']}"
                                         for r, v in summary["cases_by_role"].items())),
        ("feature shape", "; ".join("x".join(str(v) for v in s) for s in summary["feature_shapes"]) or "-"),
        ("bytes on disk", summary["bytes_note"] or f"{b['total'] / 1e6:.2f} MB (features {b['features'] / 1e6:.2f} "
                          f"MB, {windows}volumes {b['volumes'] / 1e6:.2f} MB)"),
        ("feature bytes per slice", f"{per_slice / 1e3:.1f} kB" if per_slice else "-"),
        ("teacher views", _views_summary(summary)),
        ("compression", summary["storage"]["compression"]),
        ("incomplete cases", " ".join(summary["incomplete_cases"]) or "none"),
        ("extraction", "complete" if summary["extraction_complete"] else "not finished: rerun extract"),
    ]
    for key, value in rows:
        out.print(f"[bold]{key:<24}[/]{escape(value)}", highlight=False, soft_wrap=True)


def _views_summary(summary: dict) -> str:
    """``slice`` or ``slice, crop (windows 128x128, 3x3 a slice, 57.3 kB a slice)``."""
    windows = summary.get("crop_windows")
    if not windows:
        return "slice (no crop windows: the crop view needs --targets online)"
    per_slice = summary.get("window_bytes_per_slice")
    size = f", {per_slice / 1e3:.1f} kB a slice" if per_slice else ""
    return (f"slice, crop (windows {windows['size'][0]}x{windows['size'][1]}, "
            f"{windows['positions'][0]}x{windows['positions'][1]} a slice{size})")


def _split_summary(split: dict) -> str:
    """``shipped:synapse 20p`` or ``seeded (seed 0) 20p``; hashes and counts stay in ``info --json``."""
    source = split.get("source", "?")
    if source == "seeded":
        source = f"seeded (seed {split.get('seed')})"
    return f"{source} {split.get('labeled') or ''}".strip()


@user_errors
def verify(
    store: str = typer.Argument(..., help="A feature store: a .zarr folder, a .zip made by pack, or a URL "
                                "(https://, s3://, ...)."),
    data: Path | None = typer.Option(None, "--data", help="The dataset root the store was made from: "
                                     "re-hash every source file against the recorded sha256."),
) -> None:
    """Re-read every chunk; check shapes, completeness, statistics and (with --data) source hashes.

    Exit code 0 when sound, 1 with a list of problems.
    """
    problems = verify_store(store, data)
    if problems:
        for line in problems:
            err.print(f"[red]✗[/] {escape(line)}", highlight=False, soft_wrap=True)
        err.print(f"{store}: {len(problems)} problem(s)", highlight=False)
        raise typer.Exit(1)
    out.print(f"{store}: OK (every chunk read, shapes and statistics consistent"
              f"{', sources match' if data else ''})", highlight=False, soft_wrap=True)


@user_errors
def pack(
    store: str = typer.Argument(..., help="A complete feature store: a .zarr folder, a .zip or a URL."),
    out_path: Path = typer.Argument(..., help="The zip file to write (OUT.zip)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT.zip."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Write a complete store into one .zip file, to hand over or serve as a single file.

    Chunks are stored as they are (no second compression); metadata is consolidated into the root
    zarr.json, so readers open any case without further requests. train, evaluate, info and verify
    take the zip wherever they take a store; zarr reads it with zarr.storage.ZipStore. Refuses an
    incomplete store; written to a temporary file, then renamed.
    """
    written = pack_store(store, out_path, overwrite=overwrite, progress=progress)
    out.print(f"{written}: {written.stat().st_size / 1e6:.2f} MB", highlight=False, soft_wrap=True)


