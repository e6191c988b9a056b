"""Precision policy of the sampler: the dtype and memory format the network runs in.

Modes (`MODES`):

- "fp32": float32 weights and activations; on CUDA, TF32 is turned off for matmuls and
  convolutions while the sampler runs (cuDNN allows TF32 convolutions by default).
- "tf32": float32 weights, with TF32 matmuls and convolutions allowed on CUDA. On the CPU
  it is exactly fp32 (TF32 is an NVIDIA tensor-core format).
- "fp16", "bf16": the network's weights and activations in float16 / bfloat16.

In every mode the fused ops keep GroupNorm statistics, softmax and attention's accumulation
in float32 (the reference computes them in float32 whatever its input dtype; the Triton and
CUDA kernels accumulate in float32), and the sampler keeps x_t in float32 between steps and
runs `ops.ddpm_step` in float32: only the network's forward runs in the mode's dtype.
The global TF32 flags are set only inside `Precision.scope` and restored after it.

channels_last: the network's convolution weights and its input are NHWC-strided; every op
keeps its input's memory format, so activations stay channels_last through the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

MODES = ("fp32", "tf32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """A precision mode (one of MODES, or None: the network's own dtype, TF32 flags untouched)
    and whether the network runs channels_last."""

    mode: str | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown precision {self.mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be a bool, got {self.channels_last!r}")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def apply(self, unet: torch.nn.Module) -> torch.nn.Module:
        """Convert `unet` IN PLACE (as `nn.Module.to` does) to the mode's dtype and memory format,
        and return it. Mode None keeps its dtype; channels_last=False keeps its layout."""
        if not isinstance(unet, torch.nn.Module):
            if self.mode is not None or self.channels_last:
                raise ValueError(
                    f"precision and channels_last apply to a torch module; {type(unet).__name__}"
                    " runs in the dtype and layout it was built with"
                )
            return unet
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
