"""A diffusers folder samples with each few-step solver as diffusers does: `fastddpm.load(folder)
.sample(n, steps=S, method=name, generator=g)` against the scheduler's own loop on the same
UNet2DModel (the scheduler made from the folder's config with from_config, latents times
init_noise_sigma, scale_model_input, step with the generator), from the same seed, on a tiny
random network under google/ddpm-cifar10-32's scheduler config (leading spacing, T = 1000).

Bound 2e-4 in [0, 1] pixels: tests/test_solvers.py bounds the steps' float32 drift at 5e-4 of
the sample's size on exact model outputs; here the network's own differences (fastddpm's U-Net
against diffusers', about 1e-5) pass through the chain too. Measured: at most 4.1e-5 (euler-a
at 25 steps), 1e-5 in most.
"""

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm.solvers import SOLVERS

from .conftest import TINY_DIFFUSERS_UNET, reference_json, require_diffusers, write_diffusers_folder
from .test_pipelines_at_step_counts import pixels
from .test_solvers import SCHEDULERS, STOCHASTIC

diffusers = require_diffusers()
BOUND = 2e-4


@pytest.fixture(scope="module")
def folder_and_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-solvers")
    return folder, write_diffusers_folder(
        folder, TINY_DIFFUSERS_UNET, reference_json("scheduler_config.json"), seed=2
    )


@torch.no_grad()
def diffusers_loop(folder, model, name: str, S: int, seed: int) -> np.ndarray:
    cls, options = SCHEDULERS[name]
    config = diffusers.DDPMScheduler.from_pretrained(folder).config
    scheduler = getattr(diffusers, cls).from_config(config, **options)
    scheduler.set_timesteps(S)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(eps, t, x, **({"generator": g} if name in STOCHASTIC else {})).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("S", [10, 25])
@pytest.mark.parametrize("name", SOLVERS)
def test_solver_equals_its_diffusers_scheduler_on_the_network(folder_and_model, name, S):
    folder, model = folder_and_model
    theirs = diffusers_loop(folder, model, name, S, seed=7)
    sampler = fastddpm.load(folder)
    ours = sampler.sample(2, steps=S, method=name, generator=torch.Generator().manual_seed(7), progress=False)
    if name == "unipc-bh1":  # diffusers' last bh1 step is NaN (tests/test_solvers.py); fastddpm's is not
        assert np.isnan(theirs).any() or np.abs(pixels(ours) - theirs).max() <= BOUND
        assert np.isfinite(pixels(ours)).all()
        return
    assert np.abs(pixels(ours) - theirs).max() <= BOUND


def test_a_stochastic_solver_with_a_philox_seed_repeats_itself(folder_and_model):
    """seed= draws each step's z from Philox at the step's offset: the same seed, the same images;
    another seed, others."""
    folder, _ = folder_and_model
    sampler = fastddpm.load(folder)
    a = sampler.sample(2, steps=5, method="dpmpp-2m-sde", seed=3, progress=False)
    b = sampler.sample(2, steps=5, method="dpmpp-2m-sde", seed=3, progress=False)
    c = sampler.sample(2, steps=5, method="dpmpp-2m-sde", seed=4, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
