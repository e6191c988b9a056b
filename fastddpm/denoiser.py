"""The denoiser eps_theta(x_t, t) as the reverse loop sees it.

`Denoiser` is what every sampler samples with: the U-Net (through `TorchDenoiser`, which applies
the precision policy), fastddpm.ort.OnnxDenoiser and fastddpm.trt.TensorRTDenoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .precision import Precision
from .unet import UNetConfig


class Denoiser(Protocol):
    """eps_theta: x_t (N, C, H, W) float32 on `device`, t (N,) int64 timesteps -> eps float32
    (N, C, H, W). `config` gives the image shape (in_channels, resolution); `backend` is the
    fastddpm.ops backend of the reverse step between calls; `dtype` the network's input dtype."""

    @property
    def config(self) -> UNetConfig: ...

    @property
    def backend(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class TorchDenoiser:
    """A torch eps-network (the U-Net, or any module with its `config` and `backend`) as a Denoiser.

    `network` is what runs (the module, or `torch.compile` of it); x_t goes in in the module's
    dtype and the precision's memory format, eps comes out float32. Device and dtype are the first
    parameter's, read at each access: the module may be moved or converted after this is built.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        precision: Precision,
    ) -> None:
        self.module, self.network, self.precision = module, network, precision

    @property
    def config(self) -> UNetConfig:
        return self.module.config

    @property
    def backend(self) -> str:
        return self.module.backend

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def weights(self) -> tuple:
        """What a captured call bakes in of the module: train/eval mode, and each parameter's and
        buffer's address, dtype and strides."""
        m = self.module
        return (m.training,) + tuple(
            (t.data_ptr(), t.dtype, t.stride()) for t in (*m.parameters(), *m.buffers())
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(self.precision.network_input(x, self.dtype), t).float()
