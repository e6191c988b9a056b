"""One reverse step (network + update) of the CIFAR10 model on the CPU: fastddpm vs diffusers.

    pytest benchmarks/ --benchmark-only

Both networks are built from google/ddpm-cifar10-32's config (so both run its 32-head
attention), with random weights (speed does not depend on them), fp32 eager.
"""

import json
from pathlib import Path

import pytest
import torch

import fastddpm
from fastddpm import ops
from fastddpm.checkpoints import unet_config_from_diffusers

CONFIG = Path(__file__).parent.parent / "tests" / "data" / "ddpm-cifar10-32"


@pytest.fixture(scope="module", params=[1, 8], ids=lambda b: f"batch{b}")
def batch(request):
    torch.manual_seed(0)
    return torch.randn(request.param, 3, 32, 32)


@pytest.mark.benchmark(group="cpu-step-cifar10")
def test_fastddpm_step(benchmark, batch):
    config = unet_config_from_diffusers(json.loads((CONFIG / "unet_config.json").read_text()))
    sampler = fastddpm.Sampler(fastddpm.UNet(config).eval())
    table = sampler.step_table()
    t = table.timesteps[500].expand(batch.shape[0])
    noise = torch.randn_like(batch)

    @torch.no_grad()
    def step():
        return ops.ddpm_step(batch, sampler.unet(batch, t), 500, table, noise=noise)

    benchmark(step)


@pytest.mark.benchmark(group="cpu-step-cifar10")
def test_diffusers_step(benchmark, batch):
    import diffusers

    unet = diffusers.UNet2DModel.from_config(json.loads((CONFIG / "unet_config.json").read_text())).eval()
    scheduler = diffusers.DDPMScheduler.from_config(
        json.loads((CONFIG / "scheduler_config.json").read_text())
    )
    scheduler.set_timesteps(1000)
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def step():
        eps = unet(batch, 500).sample
        return scheduler.step(eps, 500, batch, generator=generator).prev_sample

    benchmark(step)
