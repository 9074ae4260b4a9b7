"""Precision and memory format of the student: what ``auto`` resolves to on this device, and whether a
CPU's bf16 convolutions can be trusted.

The resolved values are written into the run's settings.json and kept on resume. On a GPU ``auto`` is
bf16 autocast and contiguous tensors; on a CPU it is bf16 only where the CPU computes bf16 in hardware
and its convolutions pass :func:`cpu_bf16_problem`, and channels-last except bf16 on an AMX CPU.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from stage2_train.method.networks import VNet

__all__ = [
    "BF16_TOLERANCE",
    "MEMORY_FORMATS",
    "PRECISIONS",
    "MemoryFormat",
    "Precision",
    "bf16_native",
    "cpu_amx",
    "cpu_bf16_native",
    "cpu_bf16_problem",
    "resolve_memory_format",
    "resolve_precision",
    "student_autocast",
    "torch_memory_format",
]

Precision = Literal["auto", "float32", "bfloat16"]
MemoryFormat = Literal["auto", "contiguous", "channels_last"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
MEMORY_FORMATS: tuple[MemoryFormat, ...] = get_args(MemoryFormat)
# A bf16 convolution is taken as computed correctly when its output, input gradient and weight gradient are
# within this relative (Frobenius) distance of float32's; correct ones measured 0.002-0.004, wrong ones
# 0.9 to inf (garbage).
BF16_TOLERANCE = 0.05


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 convolutions in hardware: AVX512-BF16 or AMX tiles, through oneDNN.

    Without either, bf16 on a CPU is emulated with float32 arithmetic and is slower than float32."""
    cpu = torch.cpu
    has = [getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.backends.mkldnn.is_available() and any(has)


def cpu_amx() -> bool:
    """Whether this CPU has AMX tiles (e.g. Xeon Sapphire Rapids)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def bf16_native(device: torch.device) -> bool:
    """bf16 autocast is native on ``device``: any CUDA device (as the project always assumed), or a CPU
    with :func:`cpu_bf16_native`."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native())


def _conv_layers(width: int, crop: tuple[int, int, int]) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """One module per distinct convolution of a width-``width`` VNet on a ``crop``, with its input's
    (C, D, H, W) shape."""
    net = VNet(in_channels=1, num_classes=2, width=width, dropout=False)
    seen: dict[tuple, tuple[nn.Module, tuple[int, ...]]] = {}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        shape = tuple(args[0].shape[1:])
        key = (type(module).__name__, module.in_channels, module.out_channels, module.kernel_size, module.stride,
               module.padding, shape)
        seen.setdefault(key, (module, shape))

    for m in net.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net.eval()(torch.zeros(1, 1, *crop))
    return list(seen.values())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm().clamp_min(1e-30))


_SOUNDNESS: dict[tuple, str | None] = {}


def cpu_bf16_problem(width: int, crop: tuple[int, int, int], batch: int) -> str | None:
    """None if every convolution of the VNet at this width, crop and batch computes correctly under CPU bf16
    autocast; else which one does not.

    oneDNN 3.12's ``jit_bf16:avx512_core_bf16`` convolution (an AVX512-BF16 CPU such as AMD EPYC Zen 4)
    returns garbage weight gradients for a 3x3x3 convolution whose input has depth 2 (the deepest level of
    a crop 32 slices deep): relative errors of 1 to inf, different on every call. Each distinct convolution
    of the network (kernel, stride, channels, input shape) is therefore run once in float32 and once under
    bf16 autocast on random data, forward and backward (and forward alone at batch 1, as in validation), and
    compared with :data:`BF16_TOLERANCE`. Takes 0.1-2 s on a CPU; the answer is kept for the process. The
    global random generator is left untouched.
    """
    key = (width, tuple(crop), batch)
    if key in _SOUNDNESS:
        return _SOUNDNESS[key]
    problem = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for module, shape in _conv_layers(width, tuple(crop)):
            for b, backward in ((batch, True), (1, False)):
                x = torch.rand(b, *shape, requires_grad=backward)
                results = []
                for bf16 in (False, True):
                    module.zero_grad(set_to_none=True)
                    x.grad = None
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(backward):
                        y = module(x).float()
                    grads: tuple[torch.Tensor, ...] = ()
                    if backward:
                        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
                        y.backward(g)
                        grads = (x.grad.clone(), module.weight.grad.clone())
                    results.append((y.detach(), *grads))
                errors = [_relative(b16, f32) for b16, f32 in zip(results[1], results[0], strict=True)]
                if not all(e <= BF16_TOLERANCE for e in errors):  # also catches NaN
                    what = ("output", "input gradient", "weight gradient")
                    worst = max(range(len(errors)), key=lambda i: errors[i] if errors[i] == errors[i] else float("inf"))
                    kernel, spatial = "x".join(map(str, module.kernel_size)), "x".join(map(str, shape[1:]))
                    problem = (f"{type(module).__name__} {module.in_channels}->{module.out_channels} kernel {kernel} "
                               f"on batch {b} x {spatial}: bf16 {what[worst]} off by {errors[worst]:.3g} (relative)")
                    break
            if problem:
                break
    _SOUNDNESS[key] = problem
    return problem


def resolve_precision(precision: str, device: torch.device, width: int | None = None,
                      crop: tuple[int, int, int] | None = None, batch: int = 1) -> str:
    """``auto`` → ``bfloat16`` on a GPU, and on a CPU with native bf16 (:func:`cpu_bf16_native`) whose bf16
    convolutions compute correctly for this network (:func:`cpu_bf16_problem`, checked when ``width`` and
    ``crop`` are given); ``float32`` otherwise. An explicit ``float32``/``bfloat16`` is kept.

    Raises:
        ValueError: an unknown name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if not bf16_native(device):
        return "float32"
    if device.type == "cpu" and width is not None and crop is not None and cpu_bf16_problem(width, crop, batch):
        return "float32"
    return "bfloat16"


def resolve_memory_format(memory_format: str, device: torch.device, precision: str) -> str:
    """``auto`` → ``channels_last`` (``torch.channels_last_3d``) on a CPU, except bf16 on an AMX CPU, where
    contiguous tensors were measured faster; ``contiguous`` on a GPU. An explicit value is kept.

    Raises:
        ValueError: an unknown name, or a precision that is not resolved.
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}: choose one of {', '.join(MEMORY_FORMATS)}")
    if precision not in PRECISIONS[1:]:
        raise ValueError(f"resolve the precision first (got {precision!r})")
    if memory_format != "auto":
        return memory_format
    if device.type != "cpu" or (precision == "bfloat16" and cpu_amx()):
        return "contiguous"
    return "channels_last"


def torch_memory_format(memory_format: str) -> torch.memory_format:
    """``channels_last`` → ``torch.channels_last_3d``, ``contiguous`` → ``torch.contiguous_format``."""
    return torch.channels_last_3d if memory_format == "channels_last" else torch.contiguous_format


def student_autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The precision of student forwards (training and inference alike): bf16 autocast when ``precision``
    is ``bfloat16`` (or ``auto`` on a device with native bf16, :func:`bf16_native`), plain float32
    otherwise. Callers cast the outputs to float32 before losses or softmax."""
    enabled = resolve_precision(precision, device) == "bfloat16"
    return torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16,
                          enabled=enabled)
