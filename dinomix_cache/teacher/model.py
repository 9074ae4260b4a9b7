"""Frozen ViT teacher: loads DINOv3 (default), DINOv2, CLIP or SigLIP(2) and returns patch-token grids.

``load_teacher(TeacherSettings(...))`` gives a :class:`Teacher`; ``Teacher.forward_slices`` maps a batch
of greyscale CT slices in [0, 1] to the patch-token grid of the last hidden state. Loading never runs
code from the source (safetensors only, no ``trust_remote_code``) and honours ``HF_HUB_OFFLINE``.
``Teacher.identity`` is the provenance record stored with the features and compared on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dinomix_cache.errors import UserError
from dinomix_cache.teacher import families as fam

DEFAULT_TEACHER = "facebook/dinov3-vits16-pretrain-lvd1689m"
RANDOM_LABEL = "random, not pretrained"
PRETRAINED_LABEL = "pretrained"
RANDOM_PREFIX = "random:"



@dataclass(frozen=True)
class RandomArchitecture:
    """A random-init DINOv3 (``random:NAME``): sizes, layerscale and attention scaling.

    ``layerscale`` 1e-5 (the real checkpoints' init value) leaves every token almost its own patch
    embedding: blind to context and position, so any cache-fidelity figure it gives is 1.0. The
    ``ctx-*`` variants use layerscale 1 and multiply the query/key weights by ``qk_scale`` (sharper,
    content- and RoPE-position-dependent attention) and the value/output weights by
    ``sqrt(vo_scale)`` (a stronger attention branch), so that, as in a trained ViT, a token depends on
    the rest of its image (context cosine ≤ 0.9, see :mod:`stage2_train.targets.fidelity`).
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    layerscale: float = 1e-5
    qk_scale: float = 1.0
    vo_scale: float = 1.0


RANDOM_ARCHITECTURES: dict[str, RandomArchitecture] = {
    "tiny": RandomArchitecture(128, 3, 4, 512),
    "vits16": RandomArchitecture(384, 12, 6, 1536),
    "vitb16": RandomArchitecture(768, 12, 12, 3072),
    "vitl16": RandomArchitecture(1024, 24, 16, 4096),
    "ctx-tiny": RandomArchitecture(128, 3, 4, 512, layerscale=1.0, qk_scale=16.0, vo_scale=16.0),
    "ctx-vits16": RandomArchitecture(384, 12, 6, 1536, layerscale=1.0, qk_scale=8.0, vo_scale=8.0),
}
RANDOM_TEACHERS = set(RANDOM_ARCHITECTURES)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# Config fields that do not change feature values (or change between saves of the same model).
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "torch_dtype",
    "dtype",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_attn_implementation_internal",
    "attn_implementation",
    "_experts_implementation",
    "_experts_implementation_internal",
    "_output_attentions",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "torchscript",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


@dataclass(frozen=True)
class TeacherSettings:
    """Which frozen teacher, and how it runs. All but ``device`` change feature values and are
    recorded in the store (``Teacher.identity``).

    Attributes:
        source: hub id, local directory, or ``random:NAME`` (random init, labelled "random, not
            pretrained" everywhere): ``tiny``, ``vits16``, ``vitb16``, ``vitl16`` (context-free, for
            speed) or ``ctx-tiny``, ``ctx-vits16`` (context-sensitive, for fidelity measurements).
        revision: hub branch, tag or commit (hub ids only).
        input_size: teacher input (H, W) in pixels per slice, a multiple of the patch size;
            None = the slice size.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:N``.
    """

    source: str = DEFAULT_TEACHER
    revision: str | None = None  # hub revision (branch/tag/commit)
    input_size: tuple[int, int] | None = None  # teacher input (H, W) per slice; None -> the slice size
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto -> cuda if available else cpu


class Teacher:
    """A loaded, frozen teacher. Build it with :func:`load_teacher`."""

    def __init__(
        self,
        *,
        settings: TeacherSettings,
        model: torch.nn.Module,
        family: str,
        model_type: str,
        mean,
        std,
        is_random: bool,
        device: torch.device,
        dtype: torch.dtype,
        revision: str | None,
        weight_files: list[Path] | None,
        random_weights_sha256: str | None,
    ):
        self.settings = settings
        self.model = model
        self.family = family
        self.model_type = model_type
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        self.hidden_size = int(cfg.hidden_size)
        self.num_prefix_tokens = fam.num_prefix_tokens(family, cfg)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.is_random = is_random
        self.device = device
        self.dtype = dtype
        self._revision = revision
        self._weight_files = weight_files
        self._weights_sha256 = random_weights_sha256
        self._config_sha256 = _config_sha256(cfg)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    @property
    def label(self) -> str:
        return RANDOM_LABEL if self.is_random else PRETRAINED_LABEL

    def resolved_input_size(self, slice_hw: tuple[int, int]) -> tuple[int, int]:
        """Teacher input (H, W): settings.input_size, else the slice size; must be multiples of the patch."""
        size = self.settings.input_size if self.settings.input_size is not None else slice_hw
        _check_input_size(
            tuple(size), self.patch_size, self.settings.source, from_slices=self.settings.input_size is None
        )
        return int(size[0]), int(size[1])

    def grid_shape(self, slice_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = self.resolved_input_size(slice_hw)
        return h // self.patch_size, w // self.patch_size

    def weights_sha256(self) -> str:
        if self._weights_sha256 is None:
            digest = hashlib.sha256()
            for path in sorted(self._weight_files or [], key=lambda p: p.name):
                with open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 23), b""):
                        digest.update(chunk)
            self._weights_sha256 = digest.hexdigest()
        return self._weights_sha256

    def identity(self, slice_hw: tuple[int, int]) -> dict:
        """JSON-able provenance: everything that changes feature values (not the device)."""
        return {
            "source": self.settings.source,
            "label": self.label,
            "family": self.family,
            "model_type": self.model_type,
            "model_class": type(self.model).__name__,
            "revision": self._revision,
            "weights_sha256": self.weights_sha256(),
            "config_sha256": self._config_sha256,
            "hidden_size": self.hidden_size,
            "patch_size": self.patch_size,
            "num_prefix_tokens": self.num_prefix_tokens,
            "input_size": list(self.resolved_input_size(slice_hw)),
            "mean": list(self.mean),
            "std": list(self.std),
            "dtype": _dtype_name(self.dtype),
            "layer": "last_hidden_state",
        }

    def describe(self) -> str:
        return (
            f"{self.settings.source} ({self.label}) {fam.DISPLAY_NAME[self.family]} h{self.hidden_size} "
            f"p{self.patch_size} {_dtype_name(self.dtype)} on {self.device}"
        )

    @torch.inference_mode()
    def forward_slices(self, slices: torch.Tensor, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, H, W) images in [0, 1] -> (B, h, w, C) float32 CPU patch grid of the last hidden state.

        The images are resized (bilinear) to ``input_size`` if given, else to the settings' input
        size (None: kept as they are), replicated to 3 channels, normalised and cast to the dtype:
        stage one's forward path, and the one every recompute in stage two takes.

        Raises:
            ValueError: not a (B, H, W) batch. UserError: an input size that is not a multiple of
                the patch size.
        """
        if slices.ndim != 3:
            raise ValueError(f"forward_slices expects (B, H, W) slices, got shape {tuple(slices.shape)}")
        b, height, width = slices.shape
        if input_size is not None:
            _check_input_size(tuple(input_size), self.patch_size, self.settings.source, from_slices=False)
            in_h, in_w = int(input_size[0]), int(input_size[1])
        else:
            in_h, in_w = self.resolved_input_size((height, width))
        x = slices.to(device=self.device, dtype=torch.float32).unsqueeze(1)
        if (in_h, in_w) != (height, width):
            x = F.interpolate(x, size=(in_h, in_w), mode="bilinear", align_corners=False, antialias=False)
        x = x.expand(b, 3, in_h, in_w)
        x = ((x - self._mean_t) / self._std_t).to(self.dtype)
        hidden = fam.run_model(self.family, self.model, x, self.patch_size)
        gh, gw = in_h // self.patch_size, in_w // self.patch_size
        expected = self.num_prefix_tokens + gh * gw
        if hidden.ndim != 3 or hidden.shape[0] != b or hidden.shape[1] != expected:
            raise RuntimeError(
                f"teacher {self.settings.source} ({type(self.model).__name__}) returned last_hidden_state "
                f"of shape {tuple(hidden.shape)}, expected ({b}, {expected}, C) = "
                f"{self.num_prefix_tokens} prefix tokens + {gh}x{gw} patches for a {in_h}x{in_w} input; "
                "this checkpoint's token layout is not supported"
            )
        grid = hidden[:, self.num_prefix_tokens :].reshape(b, gh, gw, hidden.shape[-1])
        return grid.to(device="cpu", dtype=torch.float32)


def scaled_input_size(image_hw: tuple[int, int], slice_hw: tuple[int, int], input_hw: tuple[int, int],
                      patch: int) -> tuple[int, int]:
    """Teacher input for an image cut from a slice: ``image · input / slice`` per side, rounded to a
    multiple of the patch (at least one patch), so that a token covers about as many slice pixels as
    in the store (a 128-pixel crop of a 160-pixel slice seen at 224 becomes 176, not 179.2)."""
    return tuple(max(1, round(n * i / s / patch)) * patch  # type: ignore[return-value]
                 for n, i, s in zip(image_hw, input_hw, slice_hw, strict=True))


def load_teacher(settings: TeacherSettings) -> Teacher:
    """Load and freeze the teacher named by ``settings`` (raises UserError for anything the user can fix)."""
    dtype = _parse_dtype(settings.dtype)
    device = _parse_device(settings.device)
    if settings.input_size is not None and len(tuple(settings.input_size)) != 2:
        raise UserError(f"teacher input size must be (H, W), got {settings.input_size!r}")
    source = settings.source.strip()
    if source.startswith(RANDOM_PREFIX):
        teacher = _load_random(settings, source[len(RANDOM_PREFIX) :], dtype, device)
    else:
        teacher = _load_pretrained(settings, source, dtype, device)
    if settings.input_size is not None:
        teacher.resolved_input_size(tuple(settings.input_size))  # fail early on a bad size
    return teacher


# ----------------------------------------------------------------------------------------------- loading


def random_config(name: str):
    """DINOv3ViTConfig for ``random:NAME`` (sizes of the real checkpoints, 4 registers; see
    :class:`RandomArchitecture` for the layerscale of each)."""
    from transformers import DINOv3ViTConfig

    if name not in RANDOM_ARCHITECTURES:
        raise UserError(
            f"unknown random teacher 'random:{name}': valid names are "
            + ", ".join(f"random:{n}" for n in RANDOM_ARCHITECTURES)
        )
    arch = RANDOM_ARCHITECTURES[name]
    return DINOv3ViTConfig(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        patch_size=16,
        num_register_tokens=4,
        layerscale_value=arch.layerscale,
    )


def _scale_attention(model: torch.nn.Module, arch: RandomArchitecture) -> None:
    """Multiply the attention projections of a freshly initialised model (see :class:`RandomArchitecture`)."""
    scales = {"q_proj.weight": arch.qk_scale, "k_proj.weight": arch.qk_scale,
              "v_proj.weight": arch.vo_scale ** 0.5, "o_proj.weight": arch.vo_scale ** 0.5}
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = next((v for k, v in scales.items() if name.endswith(f"attention.{k}")), 1.0)
            if scale != 1.0:
                param.mul_(scale)


def _load_random(settings: TeacherSettings, name: str, dtype, device) -> Teacher:
    from transformers import DINOv3ViTModel

    config = random_config(name)
    if settings.revision is not None:
        raise UserError(f"a teacher revision applies to Hugging Face Hub ids only, not to random:{name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DINOv3ViTModel(config)
    _scale_attention(model, RANDOM_ARCHITECTURES[name])
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    model = _freeze(model.to(device=device, dtype=dtype))
    mean, std = fam.DEFAULT_NORM["dinov3"]
    return Teacher(
        settings=settings,
        model=model,
        family="dinov3",
        model_type=config.model_type,
        mean=mean,
        std=std,
        is_random=True,
        device=device,
        dtype=dtype,
        revision=None,
        weight_files=None,
        random_weights_sha256=digest.hexdigest(),
    )


def _load_pretrained(settings: TeacherSettings, source: str, dtype, device) -> Teacher:
    path = Path(os.path.expanduser(source))
    local = path.is_dir()
    if not local:
        if path.exists():
            raise _load_error(source, f"{source} is a file, not a model directory")
        if not _HUB_ID.match(source) or ".." in source or "--" in source:
            raise _load_error(source, f"no such directory {source}")
        if os.path.isabs(source):
            raise _load_error(source, f"no such directory {source}")
    if local:
        if settings.revision is not None:
            raise UserError(
                f"a teacher revision applies to Hugging Face Hub ids only, not to the directory {source}"
            )
        if not (path / "config.json").is_file():
            raise _load_error(source, f"no config.json in {path}")
        if not _local_weight_files(path):
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            extra = f" (found {', '.join(found)}; pickled weights are never loaded)" if found else ""
            raise _load_error(source, f"no .safetensors weights in {path}{extra}")
        repo: str = str(path)
        revision = None
    else:
        repo = source
        revision = _resolve_revision(source, settings.revision)

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=False)
    except Exception as exc:  # transformers/huggingface_hub raise OSError, ValueError, HTTP errors...
        raise _load_error(source, _short_reason(exc, settings.revision)) from exc
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
        raise _load_error(source, _short_reason(exc, settings.revision)) from exc
    missing = [k for k in info.get("missing_keys", ()) if "mask_token" not in k]
    if missing or info.get("mismatched_keys"):
        bad = missing or [str(k) for k in info["mismatched_keys"]]
        raise UserError(
            f"teacher {source} does not hold the weights {cls.__name__} needs ({len(bad)} missing or "
            f"mismatched, e.g. {bad[0]}); is it a {model_type} vision checkpoint?"
        )
    if family == "vit_mae":
        model.config.mask_ratio = 0.0  # every patch token, none masked away (see teacher_families.run_model)
    model = _freeze(model.to(device=device))

    mean, std = _normalisation(repo, revision, local, family, source)
    if local:
        weight_files, commit = _local_weight_files(path), None
    else:
        weight_files, commit = _hub_weight_files(repo, revision)
        if not weight_files:
            raise _load_error(
                source, "its safetensors files were not found in the Hugging Face cache after loading"
            )
    resolved = getattr(revision, "resolved", None) or commit
    return Teacher(
        settings=settings,
        model=model,
        family=family,
        model_type=model_type,
        mean=mean,
        std=std,
        is_random=False,
        device=device,
        dtype=dtype,
        revision=None if local else (resolved or settings.revision),
        weight_files=weight_files,
        random_weights_sha256=None,
    )


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()  # DINOv3's RoPE jitters/rescales positions in train mode
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """Hide the load report (e.g. a CLIP/SigLIP text tower's unused weights); missing keys are checked."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _resolve_revision(repo: str, revision: str | None):
    """Pin a hub revision to its commit (best effort; transformers' own helper, absent in older versions)."""
    try:
        from transformers.utils.hub import resolve_revision
    except ImportError:
        return revision
    try:
        return resolve_revision(repo, revision)
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
    from transformers.utils import cached_file

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


# ---------------------------------------------------------------------------------------------- helpers


def _load_error(source: str, reason: str) -> UserError:
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


def _check_input_size(size: tuple, patch: int, source: str, *, from_slices: bool) -> None:
    if len(size) != 2 or any(int(v) != v or v <= 0 for v in size):
        raise UserError(f"teacher input size must be two positive integers (H, W), got {size!r}")
    if all(int(v) % patch == 0 for v in size):
        return

    def near(v: int) -> str:
        lo = (v // patch) * patch
        return f"{lo} or {lo + patch}" if lo > 0 else f"{patch}"

    origin = " (the slice size, used when no teacher input size is set)" if from_slices else ""
    h, w = int(size[0]), int(size[1])
    raise UserError(
        f"teacher input size {h}x{w}{origin} is not a multiple of the patch size {patch} of {source}: "
        f"nearest valid sizes are H {near(h)}, W {near(w)}"
    )


def _parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise UserError(f"unknown teacher dtype {name!r}: use float32, bfloat16 or float16") from None


def _parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown teacher device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"teacher device {name!r} requested but CUDA is not available; use the cpu or auto device"
        )
    return device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_sha256(config) -> str:
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(obj, list | tuple):
            return [clean(v) for v in obj]
        return obj

    text = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
