"""Each concrete backend of fastddpm.ops as the op tests run it: "torch" (the reference) on the CPU;
"triton" on a CUDA device, or on the CPU through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET); "cuda" on a GPU where the library can run there, else its kernels on the CPU
through the host emulator (tests/ops/emulator.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from fastddpm import ops

from .emulator import emulated_ops


@dataclass(frozen=True)
class Backend:
    """A backend on its device. group_norm_silu, attention, ddpm_step and multistep_update take
    fastddpm.ops' arguments (no backend=) and go through fastddpm.ops; `unchecked(op)` is the
    backend's own op, past fastddpm.ops' input checks (for inputs those checks refuse on the CPU)."""

    name: str
    device: torch.device
    emulated: bool = False

    def _op(self, op: str) -> Callable:
        if self.emulated:
            return getattr(emulated_ops(), op)
        return partial(getattr(ops, op), backend=self.name)

    def group_norm_silu(self, *args, **kwargs) -> torch.Tensor:
        return self._op("group_norm_silu")(*args, **kwargs)

    def attention(self, *args, **kwargs) -> torch.Tensor:
        return self._op("attention")(*args, **kwargs)

    def ddpm_step(self, *args, **kwargs) -> torch.Tensor:
        return self._op("ddpm_step")(*args, **kwargs)

    def multistep_update(self, *args, **kwargs) -> torch.Tensor:
        return self._op("multistep_update")(*args, **kwargs)

    def unchecked(self, op: str) -> Callable:
        return getattr(emulated_ops(), op) if self.emulated else ops.backend_op(self.name, op)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def backend(name: str) -> Backend:
    """`name` on the device the tests run it on; skips the calling test where it cannot run."""
    status = ops.backend_status()[name]
    if name == "torch":
        return Backend(name, torch.device("cpu"))
    if name == "triton":
        if status != "available":
            pytest.skip(f"backend 'triton': {status}")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        return Backend(name, torch.device("cpu" if interpreted else "cuda"))
    if status == "available":
        return Backend(name, torch.device("cuda"))
    emulated_ops()  # skips where no g++ can build the emulator
    return Backend(name, torch.device("cpu"), emulated=True)


def needs_gpu(b: Backend) -> None:
    """Skip unless `b` runs on a CUDA device (full DDPM sizes, CUDA graphs)."""
    if not b.on_gpu:
        pytest.skip(f"backend {b.name!r} runs on the CPU here; this case needs a CUDA device")
