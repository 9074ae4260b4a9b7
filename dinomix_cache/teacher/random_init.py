"""Random-init DINOv3 teachers (``--teacher random:NAME``), labelled "random, not pretrained" everywhere.

They stand in for the gated checkpoints in tests, benchmarks and fidelity measurements: same sizes and
token layout as the real DINOv3 ViTs, weights drawn from a fixed seed (so two loads give the same
features) and hashed for the store's provenance record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from dinomix_cache.errors import UserError
from dinomix_cache.teacher import families as fam
from dinomix_cache.teacher.loaded import LoadedModel, freeze

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


def random_config(name: str) -> DINOv3ViTConfig:
    """DINOv3ViTConfig for ``random:NAME`` (sizes of the real checkpoints, 4 registers; see
    :class:`RandomArchitecture` for the layerscale of each).

    Raises:
        UserError: ``name`` is not a key of :data:`RANDOM_ARCHITECTURES`.
    """
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


def load_random(name: str, revision: str | None, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """The frozen ``random:NAME`` teacher (seed 0, independent of the global RNG) in ``dtype`` on ``device``.

    Raises:
        UserError: an unknown name, or a ``revision`` (hub ids only).
    """
    config = random_config(name)
    if revision is not None:
        raise UserError(f"a teacher revision applies to Hugging Face Hub ids only, not to random:{name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DINOv3ViTModel(config)
    _scale_attention(model, RANDOM_ARCHITECTURES[name])
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    model = freeze(model.to(device=device, dtype=dtype))
    mean, std = fam.DEFAULT_NORM["dinov3"]
    return LoadedModel(
        model=model,
        family="dinov3",
        model_type=config.model_type,
        mean=mean,
        std=std,
        is_random=True,
        revision=None,
        weight_files=None,
        random_weights_sha256=digest.hexdigest(),
    )
