"""Precision policy of the sampler: the dtype and memory format the network runs in.

Modes (`MODES`):

- "fp32": float32 weights and activations; on CUDA, TF32 is turned off for matmuls and
  convolutions while the sampler runs (cuDNN allows TF32 convolutions by default).
- "tf32": float32 weights, with TF32 matmuls and convolutions allowed on CUDA. On the CPU
  it is exactly fp32 (TF32 is an NVIDIA tensor-core format).
- "fp16", "bf16": the network's weights and activations in float16 / bfloat16.
- "auto": the fastest of these that the device runs natively (`auto_mode`): on a GPU bf16 where
  it has bfloat16 tensor cores, else fp32; on a CPU bf16 where it has AMX, fp32 where it has no
  bfloat16 units at all, and between the two (AVX512-BF16 alone, or no readable CPU flags) what a
  quick probe of a 3x3 convolution measures faster. A CPU without bfloat16 units runs bf16 tens of
  times slower than fp32 (oneDNN emulates it), so an explicit bf16 or fp16 there warns once with
  the measured factor.

In every mode the fused ops keep GroupNorm statistics, softmax and attention's accumulation
in float32 (the reference computes them in float32 whatever its input dtype; the Triton and
CUDA kernels accumulate in float32), and the sampler keeps x_t in float32 between steps and
runs `ops.ddpm_step` in float32: only the network's forward runs in the mode's dtype.
The global TF32 flags are set only inside `Precision.scope` and restored after it.

channels_last: the network's convolution weights and its input are NHWC-strided; every op
keeps its input's memory format, so activations stay channels_last through the network.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = ("fp32", "tf32", "fp16", "bf16")
AUTO = "auto"
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# /proc/cpuinfo flags of the CPU units that run each half-precision dtype natively, best first.
CPU_UNITS = {
    torch.bfloat16: (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")),
    torch.float16: (("amx_fp16", "AMX-FP16"), ("avx512_fp16", "AVX512-FP16")),
}
LOG = logging.getLogger(__name__)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags (Linux's /proc/cpuinfo), or None where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def cpu_units(dtype: torch.dtype, flags: frozenset[str] | None) -> str | None:
    """The name of the best CPU unit among `flags` that runs `dtype` natively ("AMX", ...), else None."""
    return next((name for flag, name in CPU_UNITS.get(dtype, ()) if flag in (flags or ())), None)


def cpu_capability() -> dict[str, str | None]:
    """What the CPU rows of a benchmark record: PyTorch's kernel capability and the bf16/fp16 units."""
    flags = cpu_flags()
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_units": cpu_units(torch.bfloat16, flags),
        "fp16_units": cpu_units(torch.float16, flags),
    }


@functools.cache
def cpu_slowdown(dtype: torch.dtype, channels_last: bool = False) -> float:
    """How many times slower a 3x3 convolution (2, 64, 16, 16) runs on this CPU in `dtype` than in
    float32: the best of 3 timed calls each, after one warm-up (about 10 ms where dtype has units)."""
    weight = torch.randn(64, 64, 3, 3)
    x = torch.randn(2, 64, 16, 16)
    if channels_last:
        weight, x = (t.contiguous(memory_format=torch.channels_last) for t in (weight, x))

    def best(dt: torch.dtype) -> float:
        w, h = weight.to(dt), x.to(dt)
        F.conv2d(h, w, padding=1)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            F.conv2d(h, w, padding=1)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        return best(dtype) / best(torch.float32)


def auto_mode(device: torch.device, channels_last: bool = False) -> str:
    """The mode "auto" means on `device` (see the module docstring)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type != "cpu":
        return "fp32"
    flags = cpu_flags()
    units = cpu_units(torch.bfloat16, flags)
    if units == "AMX":
        return "bf16"
    if flags is not None and units is None:
        return "fp32"
    return "bf16" if cpu_slowdown(torch.bfloat16, channels_last) < 1.0 else "fp32"


@functools.cache
def warn_slow_cpu_mode(mode: str, channels_last: bool = False) -> None:
    """Warn once where an explicit fp16 / bf16 runs on a CPU without units for it (with the factor)."""
    dtype = DTYPES[mode]
    if dtype == torch.float32 or cpu_units(dtype, cpu_flags()) is not None:
        return
    factor = cpu_slowdown(dtype, channels_last)
    if factor > 1.5:
        LOG.warning(
            "fastddpm: this CPU has no %s units: a convolution runs %.0fx slower in %s than in fp32"
            " (measured); --precision auto or fp32 is faster here",
            mode,
            factor,
            mode,
        )


@dataclass(frozen=True)
class Precision:
    """A precision mode (one of MODES, "auto" until `resolved`, or None: the network's own dtype,
    TF32 flags untouched) and whether the network runs channels_last."""

    mode: str | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in (*MODES, AUTO):
            raise ValueError(f"unknown precision {self.mode!r}; choose one of {', '.join((*MODES, AUTO))}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be a bool, got {self.channels_last!r}")

    def resolved(self, device: torch.device) -> Precision:
        """This policy with "auto" replaced by the mode it means on `device`; an explicit fp16 or
        bf16 on a CPU without units for it warns once (see the module docstring)."""
        if self.mode == AUTO:
            return Precision(auto_mode(device, self.channels_last), self.channels_last)
        if device.type == "cpu" and self.mode in ("fp16", "bf16"):
            warn_slow_cpu_mode(self.mode, self.channels_last)
        return self

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def apply(self, unet: torch.nn.Module) -> torch.nn.Module:
        """Convert `unet` IN PLACE (as `nn.Module.to` does) to the mode's dtype and memory format,
        and return it. Mode None keeps its dtype; channels_last=False keeps its layout. Resolve
        "auto" first (`resolved`)."""
        if not isinstance(unet, torch.nn.Module):
            if self.mode is not None or self.channels_last:
                raise ValueError(
                    f"precision and channels_last apply to a torch module; {type(unet).__name__}"
                    " runs in the dtype and layout it was built with"
                )
            return unet
        if self.mode == AUTO:
            raise ValueError("precision 'auto' must be resolved for a device first (Precision.resolved)")
        if self.mode is not None:
            unet.to(DTYPES[self.mode])
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        return unet

    def check_device(self, device: torch.device) -> None:
        """Raise ValueError for a mode that cannot run on `device`."""
        if device.type == "cuda" and self.mode == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision 'bf16' needs a GPU with bfloat16 support; {device} has none")
        if device.type not in ("cpu", "cuda") and self.mode in ("fp16", "bf16"):
            raise ValueError(f"precision {self.mode!r} is supported on cpu and cuda devices, not {device}")

    def network_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x_t (N, C, H, W) float32 as the network takes it: `dtype`, in the policy's memory format."""
        return x.to(dtype).contiguous(memory_format=self.memory_format)

    @contextmanager
    def scope(self, device: torch.device) -> Iterator[None]:
        """On CUDA with mode fp32 or tf32, set TF32 for matmuls and cuDNN convolutions (on for
        tf32, off for fp32) and restore both flags on exit; elsewhere it changes nothing."""
        if device.type != "cuda" or self.mode not in ("fp32", "tf32"):
            yield
            return
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        saved = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32 = cudnn.allow_tf32 = self.mode == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved
