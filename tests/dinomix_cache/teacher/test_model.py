"""Tests for dinomix_cache.teacher.model with tiny random checkpoints saved locally (no hub access)."""

from __future__ import annotations

import hashlib
import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

from dinomix_cache.errors import UserError
from dinomix_cache.teacher import families as fam
from dinomix_cache.teacher.model import RANDOM_LABEL, Teacher, TeacherSettings, load_teacher
from dinomix_cache.teacher.random_init import RANDOM_TEACHERS

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def _dinov3():
    return transformers.DINOv3ViTModel(
        transformers.DINOv3ViTConfig(**VIT, intermediate_size=64, patch_size=16, num_register_tokens=4)
    )


def _dinov2():
    return transformers.Dinov2Model(
        transformers.Dinov2Config(**VIT, mlp_ratio=2, image_size=32, patch_size=8)
    )


def _dinov2_reg():
    cfg = transformers.Dinov2WithRegistersConfig(
        **VIT, mlp_ratio=2, image_size=32, patch_size=8, num_register_tokens=2
    )
    return transformers.Dinov2WithRegistersModel(cfg)


def _clip_full():
    vision = dict(**VIT, intermediate_size=64, image_size=32, patch_size=8)
    cfg = transformers.CLIPConfig(
        text_config=dict(TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=1), vision_config=vision
    )
    return transformers.CLIPModel(cfg)


def _siglip_vision():
    cfg = transformers.SiglipVisionConfig(**VIT, intermediate_size=64, image_size=32, patch_size=8)
    return transformers.SiglipVisionModel(cfg)


def _siglip2_full():
    vision = dict(**VIT, intermediate_size=64, num_patches=16, patch_size=8)
    cfg = transformers.Siglip2Config(
        text_config=dict(TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=1), vision_config=vision
    )
    return transformers.Siglip2Model(cfg)


def _vit_classifier():
    # A fine-tuned ViT folder as users bring them: classification head, no pooler.
    cfg = transformers.ViTConfig(**VIT, intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    return transformers.ViTForImageClassification(cfg)


def _vit_mae_pretraining():
    # An MAE folder as published: encoder and decoder, mask ratio 0.75.
    cfg = transformers.ViTMAEConfig(**VIT, intermediate_size=64, image_size=32, patch_size=8, decoder_hidden_size=16,
                                    decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=32)
    return transformers.ViTMAEForPreTraining(cfg)


# name -> (builder, vision class, expected prefix tokens, slice size to test (non-native where possible))
FAMILIES = {
    "dinov3": (_dinov3, transformers.DINOv3ViTModel, 5, (48, 32)),
    "dinov2": (_dinov2, transformers.Dinov2Model, 1, (40, 24)),
    "dinov2_registers": (_dinov2_reg, transformers.Dinov2WithRegistersModel, 3, (24, 40)),
    "clip": (_clip_full, transformers.CLIPVisionModel, 1, (40, 24)),
    "clip_native": (_clip_full, transformers.CLIPVisionModel, 1, (32, 32)),
    "siglip": (_siglip_vision, transformers.SiglipVisionModel, 0, (24, 40)),
    "siglip2": (_siglip2_full, transformers.Siglip2VisionModel, 0, (40, 24)),
    "vit": (_vit_classifier, transformers.ViTModel, 1, (40, 24)),
    "vit_mae": (_vit_mae_pretraining, transformers.ViTMAEModel, 1, (32, 32)),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random checkpoints of every family, saved as safetensors (built once per module)."""
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    torch.manual_seed(0)
    for name, (build, *_rest) in FAMILIES.items():
        if name == "clip_native":
            continue
        path = root / name
        build().save_pretrained(path)
        paths[name] = path
    paths["clip_native"] = paths["clip"]
    return paths


def _reference(teacher: Teacher, name: str, path, slices: torch.Tensor) -> torch.Tensor:
    """Hand computation through the raw HF model: repeat to 3 channels, normalise, slice off the prefix."""
    _, vision_cls, prefix, _ = FAMILIES[name]
    if name == "vit_mae":
        # MAE's encoder is a plain ViT: the same weights in a ViTModel give the unmasked, unshuffled tokens.
        vision_cls = transformers.ViTModel
    model = vision_cls.from_pretrained(path, dtype=torch.float32).eval()
    mean = torch.tensor(teacher.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.std).view(1, 3, 1, 1)
    x = (slices[:, None].repeat(1, 3, 1, 1) - mean) / std
    b, _, height, width = x.shape
    p = model.config.patch_size
    h, w = height // p, width // p
    with torch.no_grad():
        if name.startswith("siglip2"):
            # The image processor's own patchify (numpy, channels first) fixes the expected ordering.
            patches = torch.stack([torch.from_numpy(convert_image_to_patches(img.numpy(), p)) for img in x])
            out = model(
                pixel_values=patches,
                pixel_attention_mask=torch.ones(b, h * w, dtype=torch.int32),
                spatial_shapes=torch.tensor([[h, w]] * b),
            )
        elif name.startswith(("clip", "siglip", "vit")):
            out = model(pixel_values=x, interpolate_pos_encoding=(height, width) != (32, 32))
        else:
            out = model(pixel_values=x)
    hidden = out.last_hidden_state
    assert hidden.shape[1] == prefix + h * w
    return hidden[:, prefix:].reshape(b, h, w, -1)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_hand_computation(checkpoints, name):
    _, vision_cls, prefix, (height, width) = FAMILIES[name]
    teacher = load_teacher(TeacherSettings(source=str(checkpoints[name]), device="cpu"))
    assert isinstance(teacher.model, vision_cls)
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert teacher.num_prefix_tokens == prefix
    assert teacher.family == fam.FAMILY_BY_MODEL_TYPE[teacher.model_type]
    assert (teacher.mean, teacher.std) == fam.DEFAULT_NORM[teacher.family]
    assert not teacher.is_random

    gen = torch.Generator().manual_seed(1)
    slices = torch.rand(3, height, width, generator=gen)
    out = teacher.forward_slices(slices)
    p = teacher.patch_size
    assert out.shape == (3, height // p, width // p, teacher.hidden_size)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert teacher.grid_shape((height, width)) == (height // p, width // p)
    torch.testing.assert_close(
        out, _reference(teacher, name, checkpoints[name], slices), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(out, teacher.forward_slices(slices))  # deterministic (DINOv3 RoPE in eval mode)


def test_dinov3_train_mode_would_jitter(checkpoints):
    """Sanity check that eval() matters: in train mode DINOv3's RoPE augmentation changes the features."""
    teacher = load_teacher(TeacherSettings(source=str(checkpoints["dinov3"])))
    slices = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = teacher.forward_slices(slices)
    teacher.model.train()
    try:
        assert not torch.equal(ref, teacher.forward_slices(slices))
    finally:
        teacher.model.eval()


def test_siglip2_patch_order_matches_processor():
    pixels = torch.rand(2, 3, 32, 48)
    ours = fam.patchify_naflex(pixels, 16)
    ref = np.stack([convert_image_to_patches(img.numpy(), 16) for img in pixels])
    assert torch.equal(ours, torch.from_numpy(ref))


def test_input_size_resizes_bilinear(checkpoints):
    teacher = load_teacher(TeacherSettings(source=str(checkpoints["dinov3"]), input_size=(64, 48)))
    assert teacher.resolved_input_size((40, 40)) == (64, 48)
    slices = torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(3))
    out = teacher.forward_slices(slices)
    assert out.shape == (2, 4, 3, 32)
    resized = F.interpolate(slices[:, None], size=(64, 48), mode="bilinear", align_corners=False)[:, 0]
    plain = load_teacher(TeacherSettings(source=str(checkpoints["dinov3"])))
    torch.testing.assert_close(out, plain.forward_slices(resized), atol=1e-5, rtol=1e-5)


def test_preprocessor_config_sets_normalisation(checkpoints, tmp_path):
    import shutil

    path = tmp_path / "dino"
    shutil.copytree(checkpoints["dinov3"], path)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.43, 0.411, 0.296], "image_std": [0.213, 0.156, 0.143]})
    )
    teacher = load_teacher(TeacherSettings(source=str(path)))
    assert teacher.mean == (0.43, 0.411, 0.296) and teacher.std == (0.213, 0.156, 0.143)
    slices = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(4))
    ref = _reference(teacher, "dinov3", path, slices)
    torch.testing.assert_close(teacher.forward_slices(slices), ref, atol=1e-5, rtol=1e-5)


def test_input_size_not_multiple_of_patch(checkpoints):
    with pytest.raises(UserError, match=r"170x160.*patch size 16.*160 or 176"):
        load_teacher(TeacherSettings(source="random:tiny", input_size=(170, 160)))
    teacher = load_teacher(TeacherSettings(source=str(checkpoints["dinov3"])))
    with pytest.raises(UserError, match=r"100x96.*patch size 16"):
        teacher.forward_slices(torch.rand(1, 100, 96))
    with pytest.raises(UserError):
        teacher.identity((100, 96))


def test_missing_directory_is_user_error(tmp_path):
    before = sorted(tmp_path.rglob("*"))
    missing = tmp_path / "no" / "such" / "teacher"
    with pytest.raises(UserError) as info:
        load_teacher(TeacherSettings(source=str(missing)))
    msg = str(info.value)
    assert "\n" not in msg
    for part in (str(missing), "gated", "hf auth login", "hf download", "--teacher", "random:vits16"):
        assert part in msg
    assert sorted(tmp_path.rglob("*")) == before


def test_uncached_hub_id_offline_is_user_error(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(
        UserError, match=r"could not be loaded \(not in the local Hugging Face cache.*gated.*--teacher"
    ):
        load_teacher(TeacherSettings(source="dinomix-test/definitely-not-cached"))
    assert list(cache.rglob("*")) == []  # a failed load writes nothing


def test_hub_id_loads_offline_from_the_cache(checkpoints, tmp_path, monkeypatch):
    """A hub id resolves through the hub cache layout offline; identity records the commit hash."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--dinomix-test--tiny-dinov3"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((checkpoints["dinov3"] / name).read_bytes())
    (snapshot / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, "image_std": 0.25}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    teacher = load_teacher(TeacherSettings(source="dinomix-test/tiny-dinov3"))
    ident = teacher.identity((32, 32))
    assert ident["revision"] == commit and ident["label"] == "pretrained"
    assert (
        ident["weights_sha256"] == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
    )
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.std == (0.25, 0.25, 0.25)
    slices = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(6))
    ref = _reference(teacher, "dinov3", checkpoints["dinov3"], slices)
    torch.testing.assert_close(teacher.forward_slices(slices), ref, atol=1e-5, rtol=1e-5)
    assert (
        load_teacher(TeacherSettings(source="dinomix-test/tiny-dinov3", revision=commit)).identity((32, 32))
        == ident
    )
    with pytest.raises(UserError, match="could not be loaded"):
        load_teacher(TeacherSettings(source="dinomix-test/tiny-dinov3", revision="v9"))


def test_pickle_only_checkpoint_is_refused(checkpoints, tmp_path):
    path = tmp_path / "bin_only"
    path.mkdir()
    (path / "config.json").write_text((checkpoints["dinov3"] / "config.json").read_text())
    torch.save(_dinov3().state_dict(), path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no \.safetensors weights.*pytorch_model\.bin"):
        load_teacher(TeacherSettings(source=str(path)))


def test_unsupported_model_type(tmp_path):
    cfg = transformers.SwinConfig(embed_dim=8, depths=[1], num_heads=[1], image_size=32, patch_size=4)
    transformers.SwinModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="model_type 'swin'"):
        load_teacher(TeacherSettings(source=str(tmp_path)))


def test_revision_with_local_dir_is_user_error(checkpoints):
    with pytest.raises(UserError, match="revision"):
        load_teacher(TeacherSettings(source=str(checkpoints["dinov3"]), revision="main"))


def test_random_tiny_is_deterministic():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_teacher(TeacherSettings(source="random:tiny"))
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    b = load_teacher(TeacherSettings(source="random:tiny"))
    assert a.is_random and a.family == "dinov3" and a.num_prefix_tokens == 5
    assert (a.hidden_size, a.patch_size) == (128, 16)
    assert a.model.config.layerscale_value == 1e-5 and not a.model.training
    slices = torch.rand(4, 160, 160)
    out = a.forward_slices(slices)
    assert out.shape == (4, 10, 10, 128)
    assert torch.equal(out, b.forward_slices(slices))
    ident = a.identity((160, 160))
    assert ident == b.identity((160, 160))
    assert ident["label"] == RANDOM_LABEL
    assert RANDOM_LABEL in a.describe() and "random:tiny" in a.describe()
    json.dumps(ident)


def test_unknown_random_name():
    with pytest.raises(UserError) as info:
        load_teacher(TeacherSettings(source="random:vitg14"))
    for name in RANDOM_TEACHERS:
        assert f"random:{name}" in str(info.value)


def test_identity(checkpoints):
    path = checkpoints["dinov3"]
    base = load_teacher(TeacherSettings(source=str(path)))
    ident = base.identity((32, 32))
    json.dumps(ident)
    expected_keys = {
        "source",
        "label",
        "family",
        "model_type",
        "model_class",
        "revision",
        "weights_sha256",
        "config_sha256",
        "hidden_size",
        "patch_size",
        "num_prefix_tokens",
        "input_size",
        "mean",
        "std",
        "dtype",
        "layer",
    }
    assert set(ident) == expected_keys
    assert ident["label"] == "pretrained" and ident["revision"] is None
    assert ident["model_class"] == "DINOv3ViTModel" and ident["input_size"] == [32, 32]
    assert ident["weights_sha256"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert ident["layer"] == "last_hidden_state"
    assert base.identity((48, 32)) != ident
    sized = load_teacher(TeacherSettings(source=str(path), input_size=(48, 48)))
    assert sized.identity((32, 32))["input_size"] == [48, 48]
    bf16 = load_teacher(TeacherSettings(source=str(path), dtype="bfloat16"))
    assert bf16.identity((32, 32)) != ident and bf16.identity((32, 32))["dtype"] == "bfloat16"
    cpu = load_teacher(TeacherSettings(source=str(path), device="cpu"))
    assert cpu.identity((32, 32)) == ident  # the device is not part of the identity
    # CLIP: full checkpoint, vision tower hashed through its config; different family -> different identity
    clip = load_teacher(TeacherSettings(source=str(checkpoints["clip"])))
    assert clip.identity((32, 32))["config_sha256"] != ident["config_sha256"]


def test_bfloat16_runs_on_cpu_close_to_float32():
    slices = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(5))
    fp32 = load_teacher(TeacherSettings(source="random:tiny")).forward_slices(slices)
    teacher = load_teacher(TeacherSettings(source="random:tiny", dtype="bfloat16"))
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    bf16 = teacher.forward_slices(slices)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    cos = F.cosine_similarity(bf16.flatten(0, 2), fp32.flatten(0, 2), dim=-1)
    assert cos.min() > 0.98
    assert (bf16 - fp32).abs().mean() < 0.1 * fp32.abs().mean()


def test_bad_dtype_and_device():
    with pytest.raises(UserError, match="dtype"):
        load_teacher(TeacherSettings(source="random:tiny", dtype="int8"))
    with pytest.raises(UserError, match="device"):
        load_teacher(TeacherSettings(source="random:tiny", device="gpu0"))
