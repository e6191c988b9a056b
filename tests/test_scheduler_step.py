"""One reverse step equals diffusers' DDPMScheduler.step (and DDIMScheduler.step).

Both are also measured against the step in float64 (tests/formulas.py). fastddpm builds
its tables in float64 and casts once, and stays within 1e-6 of it. diffusers builds its
tables in float32 and takes beta_t = 1 - abar_t / abar_{t-1} there, which cancels at
small t: it is up to 1.8e-4 away from float64 at t = 1 (measured with these inputs). So
the bound against diffusers is 2e-4, and the tight bound is against float64.
"""

import numpy as np
import pytest
import torch

from fastddpm import ops
from fastddpm.schedule import Schedule

from .conftest import require_diffusers
from .formulas import step_in_float64

diffusers = require_diffusers()

BOUND_VS_FLOAT64 = 1e-6
BOUND_VS_DIFFUSERS = 2e-4


def step_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)


def check(ours, theirs, schedule, kind, variance, eta, i, sample, eps, noise, clip) -> None:
    truth = step_in_float64(
        schedule,
        kind,
        variance,
        eta,
        i,
        sample.double().numpy(),
        eps.double().numpy(),
        noise.double().numpy(),
        clip,
    )
    assert np.abs(ours.double().numpy() - truth).max() <= BOUND_VS_FLOAT64
    assert (ours - theirs).abs().max().item() <= BOUND_VS_DIFFUSERS


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t", [999, 500, 10, 1, 0])
def test_ddpm_step_equals_ddpm_scheduler(variance, clip, t):
    scheduler = diffusers.DDPMScheduler(beta_schedule="linear", variance_type=variance, clip_sample=clip)
    scheduler.set_timesteps(1000)
    sample, eps = step_inputs(t)
    theirs = scheduler.step(eps, t, sample, generator=torch.Generator().manual_seed(t)).prev_sample
    schedule = Schedule.from_name("linear")
    ours_variance = variance.replace("_", "")
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(t))  # diffusers' draw
    ours = ops.ddpm_step(
        sample, eps, t, schedule.step_table("ddpm", ours_variance), noise=noise, clip_x0=clip
    )
    check(ours, theirs, schedule, "ddpm", ours_variance, 0.0, t, sample, eps, noise, clip)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("i", [49, 25, 1, 0])
def test_ddim_step_equals_ddim_scheduler(eta, clip, i):
    """With clipping, fastddpm's DDIM re-derives eps from the clipped x0: diffusers'
    use_clipped_model_output=True."""
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True)
    scheduler.set_timesteps(50)
    t = int(scheduler.timesteps[49 - i])
    sample, eps = step_inputs(i)
    noise = torch.randn(sample.shape)
    theirs = scheduler.step(
        eps, t, sample, eta=eta, use_clipped_model_output=clip, variance_noise=noise
    ).prev_sample
    schedule = Schedule.from_name("linear").respace("ddim50")
    table = schedule.step_table("ddim", eta=eta)
    assert int(table.timesteps[i]) == t
    ours = ops.ddpm_step(sample, eps, i, table, noise=noise if table.stochastic else None, clip_x0=clip)
    check(ours, theirs, schedule, "ddim", "fixedlarge", eta, i, sample, eps, noise, clip)
