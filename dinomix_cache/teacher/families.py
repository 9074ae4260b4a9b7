"""Per-family bookkeeping for the frozen ViT teachers (DINOv3, DINOv2, CLIP, SigLIP, SigLIP2 NaFlex,
plain ViT and MAE ViT).

Each family says which transformers class loads its vision tower, how many prefix tokens (CLS +
registers) come before the patch tokens in ``last_hidden_state``, its default normalisation and how
to call the model on a normalised ``(B, 3, H, W)`` batch. Token counts are checked by the caller.
"""

from __future__ import annotations

import torch
import transformers

# model_type (as in config.json) -> family
FAMILY_BY_MODEL_TYPE: dict[str, str] = {
    "dinov3_vit": "dinov3",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "siglip2": "siglip2",
    "siglip2_vision_model": "siglip2",
    "vit": "vit",
    "vit_mae": "vit_mae",
}

# model_type -> transformers class name of the vision model to load (vision tower for CLIP/SigLIP)
MODEL_CLASS_BY_MODEL_TYPE: dict[str, str] = {
    "dinov3_vit": "DINOv3ViTModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "siglip2_vision_model": "Siglip2VisionModel",
    "vit": "ViTModel",
    "vit_mae": "ViTMAEModel",
}

# Keyword arguments of from_pretrained per family: a plain ViT's pooler is not used (and absent from
# MAE-trained or classification checkpoints saved without it), so it is not built.
LOAD_KWARGS: dict[str, dict[str, object]] = {"vit": {"add_pooling_layer": False}}

DISPLAY_NAME = {
    "dinov3": "DINOv3",
    "dinov2": "DINOv2",
    "clip": "CLIP",
    "siglip": "SigLIP",
    "siglip2": "SigLIP2",
    "vit": "ViT",
    "vit_mae": "MAE ViT",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

DEFAULT_NORM: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "dinov3": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": (HALF, HALF),
    "siglip2": (HALF, HALF),
    "vit": (HALF, HALF),  # google/vit's processors; a folder's preprocessor_config.json takes precedence
    "vit_mae": (IMAGENET_MEAN, IMAGENET_STD),
}


def model_class(model_type: str) -> type:
    """The transformers class that loads the (vision) model for ``model_type``."""
    return getattr(transformers, MODEL_CLASS_BY_MODEL_TYPE[model_type])


def num_prefix_tokens(family: str, config) -> int:
    """Tokens before the patch tokens in last_hidden_state: CLS + registers (none for SigLIP)."""
    if family == "dinov3":
        return 1 + int(config.num_register_tokens or 0)
    if family == "dinov2":
        # Dinov2Config has no register tokens; Dinov2WithRegistersConfig has num_register_tokens.
        return 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    if family in ("clip", "vit", "vit_mae"):
        return 1
    if family in ("siglip", "siglip2"):
        return 0
    raise ValueError(f"unknown teacher family {family!r}")


def patchify_naflex(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), patches row-major, each flattened as (py, px, channel).

    Same layout as transformers' Siglip2 image processor (``convert_image_to_patches``: reshape to
    (C, h, p, w, p), permute to (h, w, p, p, C)); Siglip2VisionEmbeddings applies a Linear to it.
    """
    b, c, height, width = pixels.shape
    p = patch_size
    h, w = height // p, width // p
    x = pixels.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, h * w, p * p * c)


def run_model(family: str, model: torch.nn.Module, pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """last_hidden_state (B, tokens, C) for a normalised batch ``pixels`` (B, 3, H, W)."""
    if family in ("dinov3", "dinov2"):
        out = model(pixel_values=pixels)
    elif family == "vit_mae":
        # MAE shuffles and drops tokens by a random noise; an increasing noise keeps every token in
        # order (the loader sets mask_ratio 0), so the output is the plain ViT's token sequence.
        b, _, height, width = pixels.shape
        tokens = (height // patch_size) * (width // patch_size)
        noise = torch.arange(tokens, device=pixels.device, dtype=torch.float32).expand(b, tokens)
        out = model(pixel_values=pixels, noise=noise, interpolate_pos_encoding=True)
    elif family in ("clip", "siglip", "vit"):
        # At the native image_size the interpolation is a no-op (transformers short-circuits it).
        out = model(pixel_values=pixels, interpolate_pos_encoding=True)
    elif family == "siglip2":
        b, _, height, width = pixels.shape
        h, w = height // patch_size, width // patch_size
        patches = patchify_naflex(pixels, patch_size)
        mask = torch.ones(b, h * w, dtype=torch.int32, device=pixels.device)
        shapes = torch.tensor([[h, w]] * b, dtype=torch.long, device=pixels.device)
        out = model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
    else:
        raise ValueError(f"unknown teacher family {family!r}")
    return out.last_hidden_state
