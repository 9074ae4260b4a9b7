"""Training precision and memory format: detected, checked, resolved into settings.json, kept on resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from dinomix_cache.data.preprocess import PreprocessSettings
from dinomix_cache.errors import UserError
from dinomix_cache.settings_codec import settings_to_json
from stage1_extract.runner import run_extraction
from stage2_train.evaluate.inference import inference_precision
from stage2_train.train import precision
from stage2_train.train.loop import train
from stage2_train.train.precision import (
    cpu_bf16_native,
    cpu_bf16_problem,
    resolve_memory_format,
    resolve_precision,
    student_autocast,
)
from stage2_train.train.run_folder import RunFolder
from stage2_train.train.run_schema import train_settings_from_json
from stage2_train.train.settings import PRESETS, TrainSettings, preset
from tests.tiny import tiny_settings, tiny_train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_explicit_precisions_are_kept_and_auto_follows_the_hardware(monkeypatch):
    assert resolve_precision("float32", CUDA) == "float32"
    assert resolve_precision("bfloat16", CPU) == "bfloat16"
    assert resolve_precision("auto", CUDA) == "bfloat16"  # as before: bf16 autocast on every GPU
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    assert resolve_precision("auto", CPU, 2, (16, 32, 32), 4) == "float32"
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_problem", lambda *a: None)
    assert resolve_precision("auto", CPU, 2, (16, 32, 32), 4) == "bfloat16"
    monkeypatch.setattr(precision, "cpu_bf16_problem", lambda *a: "Conv3d 32->32 off by 1")
    assert resolve_precision("auto", CPU, 2, (16, 32, 32), 4) == "float32"
    with pytest.raises(ValueError):
        resolve_precision("float16", CPU)


def test_memory_format_rule(monkeypatch):
    monkeypatch.setattr(precision, "cpu_amx", lambda: False)
    assert resolve_memory_format("auto", CPU, "float32") == "channels_last"
    assert resolve_memory_format("auto", CPU, "bfloat16") == "channels_last"
    assert resolve_memory_format("auto", CUDA, "bfloat16") == "contiguous"
    monkeypatch.setattr(precision, "cpu_amx", lambda: True)
    assert resolve_memory_format("auto", CPU, "bfloat16") == "contiguous"
    assert resolve_memory_format("auto", CPU, "float32") == "channels_last"
    assert resolve_memory_format("channels_last", CUDA, "float32") == "channels_last"
    with pytest.raises(ValueError):
        resolve_memory_format("auto", CPU, "auto")


def test_autocast_and_inference_precision(monkeypatch):
    assert student_autocast(CPU, "bfloat16").fast_dtype == torch.bfloat16
    assert student_autocast(CPU, "bfloat16")._enabled and not student_autocast(CPU, "float32")._enabled
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    assert inference_precision("bfloat16", CPU) == "float32"  # no native bf16 here: float32
    assert inference_precision("float32", CUDA) == "float32"
    assert inference_precision("bfloat16", CUDA) == "bfloat16"


class _WrongBf16Conv(torch.nn.Conv3d):
    """A convolution whose bf16 weight gradient is wrong (as oneDNN's on depth-2 inputs)."""

    def forward(self, x):
        y = super().forward(x)
        if torch.is_autocast_enabled("cpu"):
            y = _Garbage.apply(y, self.weight)
        return y


class _Garbage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, w):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g, torch.full((2, 2, 3, 3, 3), 1e30)  # garbage added to the weight's gradient


def test_the_check_finds_a_wrong_convolution(monkeypatch):
    sound = torch.nn.Conv3d(2, 2, 3, padding=1)
    wrong = _WrongBf16Conv(2, 2, 3, padding=1)
    precision._SOUNDNESS.clear()
    monkeypatch.setattr(precision, "_conv_layers", lambda width, crop: [(sound, (2, 4, 8, 8))])
    state = torch.get_rng_state()
    assert cpu_bf16_problem(2, (64, 128, 128), 2) is None
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    monkeypatch.setattr(precision, "_conv_layers", lambda width, crop: [(sound, (2, 4, 8, 8)), (wrong, (2, 2, 4, 4))])
    problem = cpu_bf16_problem(2, (32, 64, 64), 2)
    assert problem is not None and "weight gradient" in problem and "2x4x4" in problem
    precision._SOUNDNESS.clear()


def test_the_check_runs_on_the_real_network():
    # Whatever this CPU answers, the check runs the VNet's convolutions and answers None or one line.
    answer = cpu_bf16_problem(2, (16, 32, 32), 2)
    assert answer is None or ("Conv" in answer and "relative" in answer)


def test_presets_resolve(monkeypatch):
    # The bf16 check itself is tested above; at the paper's width and crop it takes minutes on a CPU.
    checked = []
    monkeypatch.setattr(precision, "cpu_bf16_problem", lambda *shape: checked.append(shape))
    for name in PRESETS:
        s = preset(name, "s.zarr")
        assert s.precision == "auto" and s.memory_format == "auto"
        r = s.resolved(CPU)
        assert r.precision in ("float32", "bfloat16") and r.memory_format in ("contiguous", "channels_last")
        assert r.out is not None
    if precision.cpu_bf16_native():  # the check is asked with each preset's own shapes
        assert (32, (64, 128, 128), 4) in checked and (8, (48, 64, 64), 4) in checked
    cpu = preset("cpu", "s.zarr")
    assert (cpu.width, cpu.crop, cpu.dropout, cpu.normalization) == (8, (48, 64, 64), False, "instance")
    assert preset("paper", "s.zarr").normalization == "batch"
    with pytest.raises(ValueError):
        preset("gpu-huge", "s.zarr")
    with pytest.raises(ValueError):
        TrainSettings(cache="s.zarr", precision="half")
    with pytest.raises(ValueError, match="--normalization"):
        TrainSettings(cache="s.zarr", normalization="group")


def test_old_settings_json_keeps_float32_on_cpu():
    data = settings_to_json(TrainSettings(cache="s.zarr"))
    del data["precision"], data["memory_format"]
    old = train_settings_from_json(json.dumps(data), "settings.json")
    assert old.memory_format == "contiguous"
    assert old.precision == ("bfloat16" if torch.cuda.is_available() else "float32")


@pytest.fixture(scope="module")
def deep_store(phantom_dir, tmp_path_factory):
    # 48 slices: no level of the VNet has depth 2, the shape oneDNN's avx512_core_bf16 kernel gets wrong
    out = tmp_path_factory.mktemp("precision") / "s.zarr"
    run_extraction(tiny_settings(phantom_dir, out, preprocess=PreprocessSettings(target_shape=(48, 32, 32))))
    return out


def _weights(run):
    ckpt = RunFolder(run).load_checkpoint("latest")
    return {**{f"s.{k}": v for k, v in ckpt["networks"]["student"].items()},
            **{f"e.{k}": v for k, v in ckpt["networks"]["ema"].items()}}


def test_run_records_resolved_precision_and_resumes_bit_exact(deep_store, tmp_path):
    base = tiny_train(deep_store, crop=(48, 32, 32), targets="cache")
    straight = train(replace(base, out=tmp_path / "a"), max_steps=4)
    saved = json.loads((straight / "settings.json").read_text())
    expected = resolve_precision("auto", CPU, 2, (48, 32, 32), 4)
    assert saved["precision"] == expected and saved["memory_format"] == resolve_memory_format("auto", CPU, expected)
    if cpu_bf16_native():
        assert expected == "bfloat16"  # this network's convolutions pass the check on native-bf16 CPUs
    half = train(replace(base, out=tmp_path / "b"), max_steps=2)
    resumed = train(None, resume=half, max_steps=4)
    assert json.loads((resumed / "settings.json").read_text())["precision"] == expected
    a, b = _weights(straight), _weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_explicit_bf16_with_wrong_convolutions_is_refused(deep_store, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_problem", lambda *a: "Conv3d 8->8 kernel 3x3x3 off by inf")
    with pytest.raises(UserError, match="--precision float32"):
        train(tiny_train(deep_store, tmp_path / "r", crop=(48, 32, 32), epochs=1, precision="bfloat16",
                         targets="cache"), max_steps=1)
    assert not (tmp_path / "r").exists()
