"""fastddpm: fast, faithful sampling from DDPM models (Ho, Jain, Abbeel 2020).

import fastddpm
sampler = fastddpm.load("ddpm-cifar10-32")          # a downloaded diffusers folder
images = sampler.sample(16, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import os

from . import checkpoints
from ._version import __version__
from .checkpoints import save_native
from .images import save_grid, save_npz, to_uint8
from .sampler import Sampler
from .schedule import DiffusionConfig, Schedule, StepTable
from .unet import PRESETS, UNet, UNetConfig, preset

__all__ = [
    "PRESETS",
    "DiffusionConfig",
    "Sampler",
    "Schedule",
    "StepTable",
    "UNet",
    "UNetConfig",
    "__version__",
    "load",
    "load_diffusers",
    "load_native",
    "load_pytorch_diffusion",
    "preset",
    "save_grid",
    "save_native",
    "save_npz",
    "to_uint8",
]


def load(
    path: str | os.PathLike,
    *,
    preset_name: str | None = None,
    allow_pickle: bool = False,
    backend: str = "auto",
) -> Sampler:
    """A Sampler for any supported checkpoint: a diffusers folder, a native .safetensors, or a
    pytorch_diffusion file (which needs `preset_name`); see fastddpm.checkpoints.load."""
    return Sampler(
        *checkpoints.load(path, preset_name=preset_name, allow_pickle=allow_pickle, backend=backend)
    )


def load_diffusers(
    folder: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    paper_attention: bool = False,
    backend: str = "auto",
) -> Sampler:
    """A Sampler for a downloaded diffusers DDPM folder; see fastddpm.checkpoints.load_diffusers."""
    unet, diffusion = checkpoints.load_diffusers(
        folder, allow_pickle=allow_pickle, paper_attention=paper_attention, backend=backend
    )
    return Sampler(unet, diffusion)


def load_native(path: str | os.PathLike, *, backend: str = "auto") -> Sampler:
    """A Sampler for a file written by `save_native`; see fastddpm.checkpoints.load_native."""
    return Sampler(*checkpoints.load_native(path, backend=backend))


def load_pytorch_diffusion(
    path: str | os.PathLike, preset_name: str, *, allow_pickle: bool = False, backend: str = "auto"
) -> Sampler:
    """A Sampler for a pytorch_diffusion checkpoint of network `preset_name`; see
    fastddpm.checkpoints.load_pytorch_diffusion."""
    return Sampler(
        *checkpoints.load_pytorch_diffusion(path, preset_name, allow_pickle=allow_pickle, backend=backend)
    )
