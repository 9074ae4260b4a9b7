"""Stores that are not a local folder: an HTTP URL (a local ``http.server``), a zip from ``pack``, fsspec memory.

Reading must not depend on listing (HTTP servers cannot list), must cost few requests, and must give
the same summary and the same training run as the local folder.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from dinomix_cache.cli.app import app
from dinomix_cache.errors import UserError
from dinomix_cache.store.feature_store import FeatureStore
from dinomix_cache.store.inspection import verify_store
from dinomix_cache.store.locations import as_location
from dinomix_cache.store.pack import pack_store
from stage2_train.evaluate.evaluation import EvaluateSettings, evaluate
from stage2_train.train.loop import train
from stage2_train.train.run_folder import RunFolder
from stage2_train.train.settings import TrainSettings
from tests.corpus import copy_store
from tests.tiny import tiny_train

runner = CliRunner()


@dataclass
class Server:
    """A static HTTP server over ``root``; ``requests`` records every (method, path) it answered."""

    root: Path
    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)


def _handler(server: Server) -> type[SimpleHTTPRequestHandler]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
            pass  # no line per request on stderr

        def send_head(self):  # type: ignore[no-untyped-def]
            server.requests.append((self.command, self.path))
            return super().send_head()

    return Quiet


class Backlogged(ThreadingHTTPServer):
    # The default listen backlog of 5 drops connections when zarr fetches a case's chunks concurrently,
    # and every dropped SYN costs a 1 s retransmit: real servers accept far more.
    request_queue_size = 128


@pytest.fixture(scope="module")
def served(wide_store, tmp_path_factory) -> Iterator[Server]:
    """A complete tiny store ``s.zarr`` (a copy of the session's, which tests here change) in a folder
    served over HTTP on an ephemeral port."""
    root = tmp_path_factory.mktemp("served")
    copy_store(wide_store, root / "s.zarr")
    server = Server(root)
    httpd = Backlogged(("127.0.0.1", 0), functools.partial(_handler(server), directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield server
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(scope="module")
def packed(served, tmp_path_factory) -> Path:
    return pack_store(served.root / "s.zarr", tmp_path_factory.mktemp("packed") / "s.zip")


def small(cache, out: Path) -> TrainSettings:
    return tiny_train(cache, out, targets="cache")


def weights(run: Path) -> dict[str, torch.Tensor]:
    networks = RunFolder(run).load_checkpoint("latest")["networks"]
    return {f"{net}.{k}": v for net in ("student", "ema") for k, v in networks[net].items()}


@pytest.fixture(scope="module")
def local_weights(served, tmp_path_factory) -> dict[str, torch.Tensor]:
    return weights(train(small(served.root / "s.zarr", tmp_path_factory.mktemp("local") / "run"), max_steps=2))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def info_json(location: str) -> dict:
    result = runner.invoke(app, ["info", location, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# Fields of `info` that depend on where the store lives, not on what it holds.
WHERE = ("path", "kind", "bytes", "bytes_note", "feature_bytes_per_slice")


def same_summary(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k not in WHERE} == {k: v for k, v in b.items() if k not in WHERE}


def test_info_and_verify_over_http_match_the_local_store(served):
    local, remote = info_json(str(served.root / "s.zarr")), info_json(f"{served.url}/s.zarr")
    same_summary(local, remote)
    assert remote["path"] == f"{served.url}/s.zarr" and remote["kind"] == "url"
    assert remote["bytes"]["total"] is None and "HTTP" in remote["bytes_note"]
    assert local["bytes"]["total"] > 0 and local["bytes_note"] is None
    table = runner.invoke(app, ["info", f"{served.url}/s.zarr"])
    assert table.exit_code == 0 and "unknown" in table.stdout
    assert verify_store(f"{served.url}/s.zarr") == []
    assert not any(path.endswith("/") for _, path in served.requests), "a reader listed a folder"


def test_reading_one_case_over_http_costs_its_chunks_only(served, packed):
    served.requests.clear()
    store = FeatureStore.open(f"{served.url}/s.zarr")
    # extract consolidates a finished store: one request holds every node's metadata
    assert served.requests == [("GET", "/s.zarr/zarr.json")]
    served.requests.clear()
    feats = store.read_features("0003", 0, 16)  # chunks of 4 slices: 4 chunks
    assert [p.rsplit("/c/", 1)[0] for _, p in served.requests] == ["/s.zarr/features/0003"] * 4
    served.requests.clear()
    store.read_features("0003", 16, 32)
    assert len(served.requests) == 4  # chunks only
    np.testing.assert_array_equal(feats, FeatureStore.open(served.root / "s.zarr").read_features("0003", 0, 16))
    # The packed layout served as a folder reads the same way.
    with zipfile.ZipFile(packed) as zf:
        zf.extractall(served.root / "c.zarr")
    served.requests.clear()
    FeatureStore.open(f"{served.url}/c.zarr").read_features("0003", 0, 16)
    assert len(served.requests) == 1 + 4


def test_training_from_a_url_equals_training_from_the_folder_and_resumes_with_cache_url(served, local_weights,
                                                                                         tmp_path):
    url = f"{served.url}/s.zarr"
    run = train(small(url, tmp_path / "remote"), max_steps=2)
    assert_same_weights(local_weights, weights(run))
    assert json.loads((run / "store.json").read_text())["path"] == url
    assert json.loads((run / "settings.json").read_text())["cache"] == url
    result = runner.invoke(app, ["train", "--resume", str(run), "--cache", url, "--max-steps", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in RunFolder(run).records() if r["kind"] == "step"] == [1, 2, 3]
    # evaluate opens the URL the run recorded (no --cache, no --data)
    result = evaluate(EvaluateSettings(runs=(run,), mm=False, figures=False))
    assert [c["case"] for c in result["runs"][0]["cases"]] == [
        c for c, r in FeatureStore.open(url).roles().items() if r == "test"]


def test_pack_gives_a_zip_that_reads_and_trains_like_the_folder(served, packed, local_weights, tmp_path):
    with zipfile.ZipFile(packed) as zf:
        infos = zf.infolist()
        root = json.loads(zf.read("zarr.json"))
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
    assert root["consolidated_metadata"]["metadata"]  # every node's metadata in the root
    same_summary(info_json(str(served.root / "s.zarr")), info_json(str(packed)))
    assert verify_store(packed) == []
    local = FeatureStore.open(served.root / "s.zarr")
    with zarr.storage.ZipStore(packed, mode="r") as plain:  # zarr itself reads it
        group = zarr.open_group(plain, mode="r")
        np.testing.assert_array_equal(group["features"]["0002"][...], local.read_features("0002"))
        np.testing.assert_array_equal(group["volumes"]["0002"]["image"][...], local.read_volume("0002"))
    assert_same_weights(local_weights, weights(train(small(packed, tmp_path / "zip"), max_steps=2)))
    # A zip made by hand (`zip -r0 s.zip s.zarr`: the store in a top folder) opens too, and packs into the same bytes.
    by_hand = tmp_path / "by_hand.zip"
    with zipfile.ZipFile(by_hand, "w") as zf:
        for file in sorted((served.root / "s.zarr").rglob("*")):
            zf.write(file, file.relative_to(served.root))
    np.testing.assert_array_equal(FeatureStore.open(by_hand).read_features("0002"), local.read_features("0002"))
    assert pack_store(by_hand, tmp_path / "again.zip").read_bytes() == packed.read_bytes()


def test_pack_refuses_an_existing_output_and_an_incomplete_store(served, packed, tmp_path):
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        pack_store(served.root / "s.zarr", packed)
    result = runner.invoke(app, ["pack", str(served.root / "s.zarr"), str(packed), "--no-progress"])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    result = runner.invoke(app, ["pack", str(served.root / "s.zarr"), str(packed), "--overwrite", "--no-progress"])
    assert result.exit_code == 0 and "MB" in result.stdout
    with pytest.raises(UserError, match=r"must be a \.zip"):
        pack_store(served.root / "s.zarr", tmp_path / "s.tar")
    meta = {k: v for k, v in FeatureStore.open(served.root / "s.zarr").meta.items() if k not in ("format", "version")}
    FeatureStore.create(tmp_path / "partial.zarr", {**meta, "extraction": {"complete": False}})
    with pytest.raises(UserError, match="not complete"):
        pack_store(tmp_path / "partial.zarr", tmp_path / "partial.zip")
    assert not (tmp_path / "partial.zip").exists() and not list(tmp_path.glob(".*.tmp"))


def test_missing_locations_and_writes_to_read_only_stores_are_refused(served, packed, tmp_path):
    with pytest.raises(UserError, match=r"cannot open .*nope\.zarr: not found \(HTTP 404"):
        FeatureStore.open(f"{served.url}/nope.zarr")
    result = runner.invoke(app, ["info", f"{served.url}/nope.zarr"])
    assert result.exit_code == 2 and "HTTP 404" in result.stderr
    with pytest.raises(UserError, match=r"missing\.zip: not found"):
        FeatureStore.open(tmp_path / "missing.zip")
    with pytest.raises(UserError, match="read-only"):
        FeatureStore.open(packed, mode="r+")
    with pytest.raises(UserError, match="read-only"):
        FeatureStore.open(f"{served.url}/s.zarr", mode="r+")
    meta = FeatureStore.open(packed).meta
    with pytest.raises(UserError, match="read-only"):
        FeatureStore.create(f"{served.url}/new.zarr", meta)
    with pytest.raises(UserError, match="inside the zip"):
        FeatureStore.create(tmp_path / "new.zip", meta)


def test_consolidated_folder_opens_with_one_request_and_a_writer_drops_the_copy(served):
    shutil.copytree(served.root / "s.zarr", served.root / "consolidated.zarr")
    FeatureStore.open(served.root / "consolidated.zarr", mode="r+").consolidate()
    served.requests.clear()
    store = FeatureStore.open(f"{served.url}/consolidated.zarr")
    assert len(store.complete_cases()) == 6 and len(served.requests) == 1
    FeatureStore.open(served.root / "consolidated.zarr", mode="r+")  # a writer: the copy would go stale
    assert "consolidated_metadata" not in json.loads((served.root / "consolidated.zarr" / "zarr.json").read_text())
    assert verify_store(served.root / "consolidated.zarr") == []


def test_verify_over_http_finds_a_missing_chunk_without_listing(served):
    shutil.copytree(served.root / "s.zarr", served.root / "damaged.zarr")
    (served.root / "damaged.zarr" / "features" / "0002" / "c" / "1" / "0" / "0" / "0").unlink()
    assert verify_store(f"{served.url}/damaged.zarr") == ["case 0002 features: 1 of 8 chunks missing"]


def test_a_writable_fsspec_url_takes_cases_and_reports_sizes(served):
    source = FeatureStore.open(served.root / "s.zarr")
    meta = {k: v for k, v in source.meta.items() if k not in ("format", "version")}
    url = "memory://dinomix-test/s.zarr"
    try:
        store = FeatureStore.create(url, meta)
        store.write_case("0001", source.read_features("0001"), source.read_volume("0001"),
                         source.read_volume("0001", "label"), source.case_attrs("0001") or {})
        reopened = FeatureStore.open(url)
        assert reopened.kind == "url" and reopened.complete_cases() == ["0001"]
        np.testing.assert_array_equal(reopened.read_features("0001"), source.read_features("0001"))
        local = served.root / "s.zarr" / "features"
        expected = (local / "zarr.json").stat().st_size + sum(f.stat().st_size for f in (local / "0001").rglob("*")
                                                               if f.is_file())
        assert reopened.bytes_on_disk("features") == expected  # the filesystem's du: same bytes as on disk
        with pytest.raises(UserError, match="cannot create"):
            FeatureStore.create(url, meta)
    finally:
        fsspec.filesystem("memory").rm("/dinomix-test", recursive=True)


def test_locations_keep_urls_whole():
    url = "http://127.0.0.1:8000/s.zarr"
    assert as_location(Path(url)) == url  # Path() had collapsed the double slash
    assert as_location(url + "/") == url and as_location("s3://bucket/s.zarr") == "s3://bucket/s.zarr"
    assert as_location("file:///tmp/s.zarr") == Path("/tmp/s.zarr")
    assert as_location("storage/s.zarr") == Path("storage/s.zarr")
    assert TrainSettings(cache=Path(url)).cache == url
    assert replace(TrainSettings(cache="storage/s.zarr"), cache=Path(url)).cache == url
    assert TrainSettings(cache=url).resolved().out == Path("runs/s-hybrid-seed0")
    assert TrainSettings(cache="x/s.zarr.zip").resolved().out == Path("runs/s-hybrid-seed0")
