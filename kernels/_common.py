"""Helpers the kernel files share: interpreter mode, device checks and guard, SM count, sizes."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from fastddpm.reference import memory_format_of

__all__ = ["INTERPRET", "check_device", "device_guard", "memory_format_of", "next_pow2", "num_sms"]

# Triton decides at decoration time whether a kernel is interpreted, so read the flag once, at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# H100 SXM; used to plan launches where no CUDA device can be asked (the interpreter).
DEFAULT_SMS = 132


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (DEFAULT_SMS off CUDA, so plans match an H100)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def check_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Triton kernels run on CUDA tensors; on the CPU only through the interpreter (TRITON_INTERPRET=1).
    Meta tensors pass: they carry shapes only, the custom op's fake runs and no kernel launches (this
    is how benchmarks.counter counts a forward)."""
    for name, t in tensors.items():
        if t is None or t.device.type in ("cuda", "meta") or (INTERPRET and t.device.type == "cpu"):
            continue
        raise ValueError(
            f"{op} (backend 'triton'): {name} is on {t.device}; the Triton kernels run on CUDA devices,"
            " or on the CPU only through Triton's interpreter (TRITON_INTERPRET=1 set before import)"
        )


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Where to launch for tensors on `device`: Triton launches on the current CUDA device (and its
    stream), so a launch for tensors on another GPU runs under torch.cuda.device(device); nothing
    to enter off CUDA (the interpreter on the CPU, meta tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
