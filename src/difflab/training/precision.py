"""How a network is executed: numeric precision (fp32, bf16 or fp16 autocast) and the memory layout of its weights.

One place decides both, for training and for sampling, because on CPU they interact: oneDNN's fp32 convolutions
are fastest channels-last (NHWC), its bf16 ones NCHW (the ``mnist-ddpm`` CPU U-Net, batch 128, two Zen 4 cores:
bf16 NCHW 1.5-1.6x faster than fp32 NHWC per training step, bf16 NHWC 0.9x; ``benchmarks/cpu_precision.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: bf16 where the hardware runs it natively, else fp32
SAMPLING_PRECISIONS = ("fp32", "bf16")  # fp16 without a gradient scaler is fine for inference, but untested here


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU flags (Linux ``/proc/cpuinfo``) list ``avx512_bf16`` or ``amx_bf16``.

    Elsewhere (no such file) it answers False: oneDNN still runs bf16 there, by emulation, often slower than fp32.
    The answer is cached per file.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision ``auto`` stands for on ``device``: ``bf16`` on a CPU with native bf16 (:func:`cpu_has_native_bf16`;
    1.5-1.9x faster training here) or a GPU that supports it, else ``fp32`` (emulated bf16 is often slower than
    fp32); any other precision as it is."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def check_precision(
    precision: str, device: torch.device, allowed: tuple[str, ...] = PRECISIONS, key: str = "precision"
) -> None:
    """A one-line :class:`ConfigError` for a precision this device cannot run (fp16 needs CUDA, bf16 a GPU
    that supports it); ``key`` is the config key the message names."""
    if precision not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"{key}=fp16 needs a CUDA GPU (its gradient scaler is CUDA-only); device is {device.type}: "
            f"use {key}=bf16 or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key}=bf16 is not supported by this GPU: use {key}=fp16 or fp32")


def check_config_precisions(config: Any, device: torch.device, prefix: str = "") -> None:
    """:func:`check_precision` of every ``precision`` field of a (nested) config dataclass on ``device``, so a
    recipe refuses, say, ``train.precision=fp16`` on a CPU before it creates its run folder, naming the key."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        key = f"{prefix}{field.name}"
        if field.name == "precision" and isinstance(value, str):
            check_precision(value, device, key=key)
        else:
            check_config_precisions(value, device, f"{key}.")


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32; ``auto`` resolved first)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format_for(device: torch.device | str, precision: str = "fp32") -> torch.memory_format:
    """The weight layout a convolutional network runs fastest in: channels-last for fp32 on CPU, else NCHW.

    On CUDA the choice is left at NCHW (difflab's GPU configs are not tuned for layout).
    """
    if torch.device(device).type == "cpu" and resolve_precision(precision, device) == "fp32":
        return torch.channels_last
    return torch.contiguous_format


def to_fast_layout(model: nn.Module, device: torch.device | str, precision: str = "fp32") -> nn.Module:
    """``model`` with its weights in :func:`memory_format_for` ``(device, precision)`` (in place, returned)."""
    return model.to(memory_format=memory_format_for(device, precision))


class AutocastModel(nn.Module):
    """``model`` evaluated under ``precision`` autocast, its output cast back to float32.

    For sampling: the network runs in bf16, the sampler's updates of ``x`` stay in fp32. Call as ``model``.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, precision: str) -> None:
        super().__init__()
        self.model = model
        self.device = torch.device(device)
        self.precision = precision

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped model's output for the same arguments (e.g. x_t (B, ...), t (B,) -> (B, ...)), as float32."""
        with autocast(self.device, self.precision):
            out = self.model(*args, **kwargs)
        return out.float()
