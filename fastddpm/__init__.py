"""fastddpm: fast, faithful sampling from DDPM models (Ho, Jain, Abbeel 2020).

import fastddpm
sampler = fastddpm.load("ddpm-cifar10-32")          # a downloaded diffusers folder
images = sampler.sample(16, generator=torch.Generator().manual_seed(0))
"""

__version__ = "0.1.0"

from .checkpoints import load, load_diffusers, load_native, load_pytorch_diffusion, save_native
from .images import save_grid, save_npz, to_uint8
from .sampler import DiffusionConfig, Sampler
from .schedule import Schedule, StepTable
from .unet import PRESETS, UNet, UNetConfig, preset

__all__ = [
    "PRESETS",
    "DiffusionConfig",
    "Sampler",
    "Schedule",
    "StepTable",
    "UNet",
    "UNetConfig",
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
