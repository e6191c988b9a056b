"""diffusers' timestep spacing: the timesteps, and every step of a run, of DDPMScheduler and
DDIMScheduler (use_clipped_model_output=True) after set_timesteps(S), against
`diffusers_step_table` through the reference step.

Each step is checked twice, on the same x_t, model output and noise:
- against the scheduler's own step code run in float64 on fastddpm's float64 abar (the scheduler
  with its alphas_cumprod, one and final_alpha_cumprod replaced). This checks the formulas (which
  prev_t, which abar_prev, which variance, where noise is added) and leaves only fastddpm's
  float32: a table cast once from float64 (relative error 6e-8 per coefficient) and float32
  arithmetic on |x_t|, |eps| < 6, where the unclipped x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
  cancels terms up to 160 times larger than itself, times a coefficient of x0 that is small
  exactly where sqrt(1/abar) is large. Measured: at most 5.0e-7 over every case; the bound is 1e-6.
- against the stock scheduler, which builds abar by a float32 cumprod and takes
  beta = 1 - abar_t / abar_prev in float32. That cancels when the step is short: at S = 1000 the
  step at t = 1 is 1.8e-4 off float64 (tests/test_scheduler_step.py's inputs); here at most 9.8e-5
  at S = 1000 and 1.5e-5 at S <= 100, where beta is larger. The bound is 2e-4, that file's.
"""

import copy

import numpy as np
import pytest
import torch

from fastddpm.reference import ddpm_step
from fastddpm.schedule import (
    DIFFUSERS_SPACINGS,
    SIGMA,
    Schedule,
    diffusers_step_table,
    diffusers_timesteps,
    previous_timesteps,
)

from .conftest import require_diffusers

diffusers = require_diffusers()

T = 1000
STEPS = (10, 50, 100, 1000)
OFFSETS = (0, 1)
SHAPE = (3, 4, 4)
BOUND_VS_FLOAT64 = 1e-6
BOUND_VS_DIFFUSERS = 2e-4

# (kind, variance_type, eta, set_alpha_to_one): DDPM with clip_sample, DDIM takes no variance_type.
DDPM_CASES = [("ddpm", "fixed_small", 0.0, True), ("ddpm", "fixed_large", 0.0, True)]
DDIM_CASES = [("ddim", None, eta, one) for eta in (0.0, 0.5) for one in (True, False)]
SPACING_CASES = [
    (spacing, offset, S)
    for spacing in DIFFUSERS_SPACINGS
    for offset in OFFSETS
    for S in STEPS
    if not (spacing == "leading" and offset and S == T)  # timestep T: outside the schedule
]


def make_scheduler(
    kind: str, variance: str | None, set_alpha_to_one: bool, spacing: str, offset: int, S: int
):
    common = dict(
        num_train_timesteps=T,
        beta_schedule="linear",
        clip_sample=True,
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    if kind == "ddpm":
        scheduler = diffusers.DDPMScheduler(variance_type=variance, **common)
    else:
        scheduler = diffusers.DDIMScheduler(set_alpha_to_one=set_alpha_to_one, **common)
    scheduler.set_timesteps(S)
    return scheduler


def in_float64(scheduler, schedule: Schedule):
    """The scheduler with fastddpm's float64 abar, so that its step runs in float64."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.alphas_cumprod = torch.from_numpy(schedule.abar.copy())
    if isinstance(scheduler, diffusers.DDPMScheduler):
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    else:
        final = 1.0 if scheduler.config.set_alpha_to_one else schedule.abar[0]
        scheduler.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
    return scheduler


def step_inputs(schedule: Schedule, timesteps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and a model output (S, *SHAPE) float32, row i at timesteps[i]: x_t from an x0 in
    [-1.2, 1.2] and the output near the true eps, so that the clip acts on some elements only."""
    g = torch.Generator().manual_seed(len(timesteps))
    n = (len(timesteps), *SHAPE)
    x0 = torch.rand(n, generator=g, dtype=torch.float64) * 2.4 - 1.2
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    abar = torch.from_numpy(schedule.abar[timesteps]).view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    return x_t.float(), (eps + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).float()


def noise(i: int, dtype: torch.dtype) -> torch.Tensor:
    """Step index i's z, as DDPMScheduler draws it from a generator seeded i."""
    return torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(i), dtype=dtype)


def step_errors(kind, variance, eta, set_alpha_to_one, spacing, offset, S) -> tuple[float, float]:
    """The largest difference of the reference step over all step indices from the scheduler's
    step in float64, and from the stock scheduler's."""
    stock = make_scheduler(kind, variance, set_alpha_to_one, spacing, offset, S)
    schedule = Schedule.from_name("linear", T)
    exact = in_float64(stock, schedule)
    ours_variance = variance.replace("_", "") if variance else "fixedlarge"
    table = diffusers_step_table(schedule, S, spacing, offset, kind, ours_variance, eta, set_alpha_to_one)
    timesteps = table.timesteps.numpy()
    assert np.array_equal(timesteps[::-1], stock.timesteps.numpy())
    x_t, eps = step_inputs(schedule, timesteps)
    z32 = torch.cat([noise(i, torch.float32) for i in range(S)])
    z64 = torch.cat([noise(i, torch.float64) for i in range(S)]) if kind == "ddpm" else z32.double()
    index = torch.arange(S)
    ours32 = ddpm_step(x_t, eps, index, table, noise=z32)
    ours64 = ddpm_step(x_t, eps, index, table, noise=z64.float())
    vs_float64 = vs_stock = 0.0
    for i in range(S):
        t = stock.timesteps[S - 1 - i]
        row = slice(i, i + 1)
        results = []
        for scheduler, dtype, z in ((exact, torch.float64, z64), (stock, torch.float32, z32)):
            x, e = x_t[row].to(dtype), eps[row].to(dtype)
            if kind == "ddpm":
                g = torch.Generator().manual_seed(i)
                results.append(scheduler.step(e, t, x, generator=g).prev_sample)
            else:
                results.append(
                    scheduler.step(
                        e, t, x, eta=eta, use_clipped_model_output=True, variance_noise=z[row].to(dtype)
                    ).prev_sample
                )
        vs_float64 = max(vs_float64, (ours64[row].double() - results[0]).abs().max().item())
        vs_stock = max(vs_stock, (ours32[row] - results[1]).abs().max().item())
    return vs_float64, vs_stock


@pytest.mark.parametrize("spacing, offset, S", SPACING_CASES)
@pytest.mark.parametrize("kind, variance, eta, set_alpha_to_one", DDPM_CASES + DDIM_CASES)
def test_every_step_equals_the_diffusers_scheduler(kind, variance, eta, set_alpha_to_one, spacing, offset, S):
    vs_float64, vs_stock = step_errors(kind, variance, eta, set_alpha_to_one, spacing, offset, S)
    assert vs_float64 <= BOUND_VS_FLOAT64
    assert vs_stock <= BOUND_VS_DIFFUSERS


@pytest.mark.parametrize("spacing", DIFFUSERS_SPACINGS)
@pytest.mark.parametrize("S", [1, 3, 7, 999])
def test_timesteps_equal_set_timesteps_at_odd_step_counts(spacing, S):
    scheduler = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=0)
    scheduler.set_timesteps(S)
    assert np.array_equal(diffusers_timesteps(T, S, spacing)[::-1], scheduler.timesteps.numpy())


def test_previous_timesteps_as_each_scheduler_takes_them():
    """DDPMScheduler steps to the next visited timestep; DDIMScheduler to t - T // S, which in
    linspace spacing is another timestep than the next one visited."""
    t = diffusers_timesteps(T, 10, "linspace")
    assert list(t[:3]) == [0, 111, 222]
    assert list(previous_timesteps(t, "ddpm", T)[:3]) == [-1, 0, 111]
    assert list(previous_timesteps(t, "ddim", T)[:3]) == [-100, 11, 122]


def test_the_last_step_adds_noise_where_its_timestep_is_above_zero():
    """DDPMScheduler adds noise where t > 0: with steps_offset 1 the last step (t = 1) adds some,
    with fixed_large sqrt(1 - abar_1)."""
    schedule = Schedule.from_name("linear", T)
    for offset, sigma in ((0, 0.0), (1, np.sqrt(1 - schedule.abar[1]))):
        table = diffusers_step_table(schedule, 50, "leading", offset, "ddpm", "fixedlarge")
        assert table.coef[0, SIGMA].item() == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("spacing", DIFFUSERS_SPACINGS)
@pytest.mark.parametrize(
    "kind, variance, eta",
    [("ddpm", "fixedlarge", 0.0), ("ddpm", "fixedsmall", 0.0), ("ddim", "fixedlarge", 0.5)],
)
def test_all_steps_give_the_full_schedules_table_bit_for_bit(spacing, kind, variance, eta):
    """At S = T (steps_offset 0) every spacing visits every t, and its table is today's full one."""
    schedule = Schedule.from_name("linear", T)
    full = schedule.step_table(kind, variance, eta)
    table = diffusers_step_table(schedule, T, spacing, 0, kind, variance, eta)
    assert torch.equal(table.coef, full.coef) and torch.equal(table.timesteps, full.timesteps)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: diffusers_timesteps(T, 10, "even"), "unknown timestep spacing 'even'"),
        (lambda: diffusers_timesteps(T, 1001), "cannot take 1001 steps out of 1000"),
        (lambda: diffusers_timesteps(T, 0), "steps must be an int >= 1"),
        (lambda: diffusers_timesteps(T, 10, steps_offset=-1), "steps_offset must be an int >= 0"),
        (lambda: diffusers_timesteps(T, 1000, "leading", 1), "leaves \\[0, 1000\\)"),
        (lambda: previous_timesteps(np.arange(3), "plms", T), "unknown step kind 'plms'"),
        (
            lambda: Schedule.from_name().respace(10).pair_coefficients([1], [0]),
            "needs the full schedule",
        ),
        (lambda: Schedule.from_name().pair_coefficients([1], [1]), "0 <= prev_t < t"),
        (lambda: Schedule.from_name().pair_coefficients([1], [0], variance="learned"), "unknown variance"),
        (lambda: Schedule.from_name().pair_coefficients([1], [0], final_abar=0.0), "final_abar"),
    ],
)
def test_bad_arguments_are_one_line_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
