"""Pretrained teachers from the Hugging Face Hub or a local directory.

A hub id is loaded through the hub cache (honouring ``HF_HUB_OFFLINE``) at a revision pinned to its
commit; a directory needs a ``config.json`` and safetensors weights. Pickled weights and remote code are
never loaded. The normalisation comes from the source's ``preprocessor_config.json``, else from the
family's defaults; the weight files are returned so that their hash can be recorded. A directory that
``dinomix-cache train-teacher`` wrote carries a provenance file (:mod:`dinomix_cache.teacher.provenance`):
its label, not "pretrained", then names the teacher.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from dinomix_cache.errors import UserError
from dinomix_cache.teacher import families as fam
from dinomix_cache.teacher.loaded import LoadedModel, freeze
from dinomix_cache.teacher.provenance import read_provenance, store_record

try:  # pins a revision to its commit; absent from some transformers versions
    from transformers.utils.hub import resolve_revision as _hf_resolve_revision
except ImportError:  # pragma: no cover - depends on the installed transformers
    _hf_resolve_revision = None

DEFAULT_TEACHER = "facebook/dinov3-vits16-pretrain-lvd1689m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def load_pretrained(
    source: str, requested_revision: str | None, dtype: torch.dtype, device: torch.device
) -> LoadedModel:
    """The frozen vision model of a hub id (``requested_revision``: branch, tag or commit) or of a local
    directory, in ``dtype`` on ``device``: safetensors weights only, never remote code.

    Raises:
        UserError: anything the user can fix (no such directory, no safetensors weights, a gated, missing
            or uncached repository, an unsupported ``model_type``, missing weights, a revision for a
            directory, a bad preprocessor_config.json, a provenance file that does not describe the
            directory's weights), with how to get the weights.
    """
    path = Path(os.path.expanduser(source))
    local = path.is_dir()
    if not local:
        if path.exists():
            raise load_error(source, f"{source} is a file, not a model directory")
        if not _HUB_ID.match(source) or ".." in source or "--" in source:
            raise load_error(source, f"no such directory {source}")
        if os.path.isabs(source):
            raise load_error(source, f"no such directory {source}")
    if local:
        if requested_revision is not None:
            raise UserError(
                f"a teacher revision applies to Hugging Face Hub ids only, not to the directory {source}"
            )
        if not (path / "config.json").is_file():
            raise load_error(source, f"no config.json in {path}")
        if not _local_weight_files(path):
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            extra = f" (found {', '.join(found)}; pickled weights are never loaded)" if found else ""
            raise load_error(source, f"no .safetensors weights in {path}{extra}")
        repo: str = str(path)
        revision = None
    else:
        repo = source
        revision = _resolve_revision(source, requested_revision)

    try:
        config = AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=False)
    except Exception as exc:  # transformers/huggingface_hub raise OSError, ValueError, HTTP errors...
        raise load_error(source, _short_reason(exc, requested_revision)) from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in fam.FAMILY_BY_MODEL_TYPE:
        raise UserError(
            f"teacher {source} has model_type {model_type!r}, which is not supported; supported "
            f"model types: {', '.join(sorted(fam.FAMILY_BY_MODEL_TYPE))}"
        )
    family = fam.FAMILY_BY_MODEL_TYPE[model_type]
    cls = fam.model_class(model_type)
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(
                repo,
                revision=revision,
                use_safetensors=True,
                dtype=dtype,
                trust_remote_code=False,
                output_loading_info=True,
                **fam.LOAD_KWARGS.get(family, {}),
            )
    except Exception as exc:
        raise load_error(source, _short_reason(exc, requested_revision)) from exc
    missing = [k for k in info.get("missing_keys", ()) if "mask_token" not in k]
    if missing or info.get("mismatched_keys"):
        bad = missing or [str(k) for k in info["mismatched_keys"]]
        raise UserError(
            f"teacher {source} does not hold the weights {cls.__name__} needs ({len(bad)} missing or "
            f"mismatched, e.g. {bad[0]}); is it a {model_type} vision checkpoint?"
        )
    if family == "vit_mae":
        model.config.mask_ratio = 0.0  # every patch token, none masked away (see families.run_model)
    model = freeze(model.to(device=device))

    mean, std = _normalisation(repo, revision, local, family, source)
    provenance = None
    if local:
        weight_files, commit = _local_weight_files(path), None
        provenance = read_provenance(path, weight_files)
    else:
        weight_files, commit = _hub_weight_files(repo, revision)
        if not weight_files:
            raise load_error(
                source, "its safetensors files were not found in the Hugging Face cache after loading"
            )
    resolved = getattr(revision, "resolved", None) or commit
    return LoadedModel(
        model=model,
        family=family,
        model_type=model_type,
        mean=mean,
        std=std,
        is_random=False,
        revision=None if local else (resolved or requested_revision),
        weight_files=weight_files,
        random_weights_sha256=None,
        label=None if provenance is None else provenance["label"],
        training=None if provenance is None else store_record(provenance),
    )


@contextlib.contextmanager
def _quiet_transformers():
    """Hide the load report (e.g. a CLIP/SigLIP text tower's unused weights); missing keys are checked."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _resolve_revision(repo: str, revision: str | None):
    """Pin a hub revision to its commit (best effort; transformers' own helper, absent in older versions)."""
    if _hf_resolve_revision is None:
        return revision
    try:
        return _hf_resolve_revision(repo, revision)
    except Exception:
        return revision


def _local_weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"cannot read the safetensors index {index}: {exc}") from exc
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def _cached(repo: str, filename: str, revision) -> str | None:
    try:
        return cached_file(
            repo,
            filename,
            revision=revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            _raise_exceptions_for_gated_repo=False,
        )
    except Exception:
        return None


def _hub_weight_files(repo: str, revision) -> tuple[list[Path], str | None]:
    """The safetensors file(s) from_pretrained used, through the hub cache (works offline once cached)."""
    files: list[Path] = []
    single = _cached(repo, "model.safetensors", revision)
    if single:
        files = [Path(single)]
    else:
        index = _cached(repo, "model.safetensors.index.json", revision)
        if index:
            for name in sorted(set(json.loads(Path(index).read_text())["weight_map"].values())):
                shard = _cached(repo, name, revision)
                if shard is None:
                    return [], None
                files.append(Path(shard))
    commit = None
    if (
        files
        and files[0].parent.parent.name == "snapshots"
        and re.fullmatch(r"[0-9a-f]{40}", files[0].parent.name)
    ):
        commit = files[0].parent.name
    return files, commit


def _normalisation(repo: str, revision, local: bool, family: str, source: str):
    """image_mean/image_std from preprocessor_config.json when the source has one, else family defaults."""
    if local:
        candidate = Path(repo) / "preprocessor_config.json"
        file = str(candidate) if candidate.is_file() else None
    else:
        file = _cached(repo, "preprocessor_config.json", revision)
    mean, std = fam.DEFAULT_NORM[family]
    if file is None:
        return mean, std
    try:
        pre = json.loads(Path(file).read_text())
        if pre.get("do_normalize", True) is False:
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        mean = _triple(pre.get("image_mean", mean))
        std = _triple(pre.get("image_std", std))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(
            f"cannot read image_mean/image_std from the preprocessor_config.json of teacher {source}: {exc}"
        ) from exc
    if min(std) <= 0:
        raise UserError(f"preprocessor_config.json of teacher {source} has a non-positive image_std {std}")
    return mean, std


def _triple(value) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected 3 values, got {len(values)}")
    return values


def load_error(source: str, reason: str) -> UserError:
    """The error for a teacher that cannot be loaded: ``reason`` and how to get (gated) DINOv3 weights."""
    hub_id = source if _HUB_ID.match(source) and not os.path.exists(source) else DEFAULT_TEACHER
    reason = " ".join(reason.split())
    return UserError(
        f"The teacher weights for {source} could not be loaded ({reason}). DINOv3 weights are gated: "
        "accept the licence on the model's Hugging Face Hub page and log in with `hf auth login`, then "
        "download them with "
        f"`hf download {hub_id} --local-dir DIR`; a local directory works too (`--teacher DIR`), and "
        f"`--teacher random:vits16` gives an unpretrained stand-in."
    )


def _short_reason(exc: BaseException, revision: str | None) -> str:
    chain, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    if "GatedRepoError" in names or "gated" in text.lower():
        return "gated repository: access not granted, or not logged in"
    if "RevisionNotFoundError" in names:
        return f"revision {revision!r} not found"
    if "RepositoryNotFoundError" in names:
        return "repository not found, or private and not logged in"
    if re.search(r"\b(401|403)\b", text):
        return "access denied (HTTP 401/403): not logged in or licence not accepted"
    if {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} & names or "offline" in text.lower():
        return "not in the local Hugging Face cache, and the Hub is unreachable or HF_HUB_OFFLINE is set"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return first if len(first) <= 200 else first[:197] + "..."
