"""Each few-step solver's steps equal its diffusers scheduler's, step by step and at the end.

On the same model outputs: a smooth eps function of (x, t) (the exact eps of Gaussian data plus a
wiggle, so that x0 predictions stay of data size), run through the scheduler's own loop
(init_noise_sigma, scale_model_input, step with a generator) and through fastddpm's table with
reference.multistep_update, from the same seed. Checked at every step: the timestep, the network's
input and the sample. Bound: 5e-4 relative to the sample's size (its largest element, at least 1;
Euler's samples have size sigma_max ~ 160). diffusers computes each step in float32 from float32
noise levels and float32 abar; fastddpm's weights are exact in float64, rounded once, so the two
drift apart by float32 rounding over the chain: measured at most 2.5e-4 over these 128 runs
(largest at 50 steps, in the SDE and ancestral solvers), 1e-5 to 5e-5 in most.
"""

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import reference
from fastddpm.noise import BatchNoise
from fastddpm.schedule import DiffusionConfig
from fastddpm.solvers import SOLVERS, solver_table

from .conftest import require_diffusers

diffusers = require_diffusers()
RTOL = 5e-4
STOCHASTIC = ("dpmpp-2m-sde", "euler-a")
SCHEDULERS = {
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "dpmpp-2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-bh1": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
}
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def scheduler(name: str, spacing: str, steps_offset: int = 0):
    """The diffusers scheduler of solver `name`, from a DDPMScheduler's config as a user makes it."""
    cls, options = SCHEDULERS[name]
    base = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=steps_offset).config
    return getattr(diffusers, cls).from_config(base, **options)


def eps_fn(x: torch.Tensor, t: torch.Tensor, s: float = 0.5) -> torch.Tensor:
    """The exact eps of data N(0, s^2 I) at (x_t, t), plus 0.05 sin(3 x)."""
    abar = float(np.interp(float(t), np.arange(1000), ABAR))
    return (np.sqrt(1 - abar) * x / (abar * s * s + 1 - abar)).float() + 0.05 * torch.sin(3 * x)


def same_timesteps(table, sched) -> None:
    """The table visits the scheduler's timesteps (its rows are in step-index order, reversed)."""
    np.testing.assert_array_equal(table.timesteps.flip(0).double().numpy(), sched.timesteps.double().numpy())


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest difference relative to the sample's size (its largest element, at least 1)."""
    return float((ours - theirs).abs().max()) / max(1.0, float(theirs.abs().max()))


def steps_side_by_side(name: str, spacing: str, S: int):
    """Run solver `name` and its scheduler side by side on eps_fn from seed 0; yield per step k
    (t, fastddpm's network input and the scheduler's, fastddpm's sample and the scheduler's)."""
    sched = scheduler(name, spacing)
    sched.set_timesteps(S)
    table = solver_table(name, DiffusionConfig(spacing=spacing), S)
    assert len(table) == len(sched.timesteps)
    same_timesteps(table, sched)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g) * sched.init_noise_sigma
    noise = BatchNoise(len(table), torch.Generator().manual_seed(0), None, 0, table.final_draw)
    y = noise.x_T(tuple(x.shape), torch.device("cpu")) * table.init_scale
    history = torch.zeros(table.num_slots, *y.shape)
    for k, t in enumerate(sched.timesteps):
        i = len(table) - 1 - k
        model_input = sched.scale_model_input(x, t)
        ours_input = y * table.input_scale[i]
        eps = eps_fn(model_input, t)
        x = sched.step(eps, t, x, **({"generator": g} if name in STOCHASTIC else {})).prev_sample
        y = reference.multistep_update(
            y, eps, history, i, table, **(noise.step(i, y) if table.stochastic else {})
        )
        # UniPC bh1's last step is NaN in diffusers (alpha_t B(h) = -inf times a zero correction, at
        # final sigma 0); its limit, which fastddpm takes, is the step's x0 prediction, as bh2's.
        expected = sched.model_outputs[-1] if name == "unipc-bh1" and i == 0 and x.isnan().any() else x
        yield t, ours_input, model_input, y, expected


@pytest.mark.parametrize("S", [5, 10, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", SOLVERS)
def test_each_step_equals_the_diffusers_scheduler(name, spacing, S):
    for k, (t, ours_input, model_input, y, expected) in enumerate(steps_side_by_side(name, spacing, S)):
        assert relative(ours_input, model_input) <= RTOL, f"network input at step {k}"
        assert relative(y, expected) <= RTOL, f"step {k} (t={int(t)}): {relative(y, expected):.2e}"


def test_steps_offset_is_the_schedulers():
    for name in ("dpmpp-2m", "pndm", "euler"):
        sched = scheduler(name, "leading", steps_offset=1)
        sched.set_timesteps(10)
        table = solver_table(name, DiffusionConfig(spacing="leading", steps_offset=1), 10)
        np.testing.assert_array_equal(
            table.timesteps.flip(0).double().numpy(), sched.timesteps.double().numpy()
        )


def test_improved_spacing_takes_each_schedulers_own_default():
    for name, spacing in (("dpmpp-2m", "linspace"), ("pndm", "leading"), ("euler-a", "linspace")):
        ours = solver_table(name, DiffusionConfig(spacing="improved"), 10)
        sched = scheduler(name, spacing)
        sched.set_timesteps(10)
        np.testing.assert_array_equal(
            ours.timesteps.flip(0).double().numpy(), sched.timesteps.double().numpy()
        )


def test_history_slots_are_few():
    """Kept values share slots once no later step reads them: DPM-Solver++ 2M keeps one D."""
    config = DiffusionConfig(spacing="leading")
    slots = {name: solver_table(name, config, 25).num_slots for name in SOLVERS}
    assert slots == {
        "dpmpp-2m": 1, "dpmpp-3m": 2, "dpmpp-2m-sde": 1, "unipc": 3, "unipc-bh1": 3, "pndm": 5,
        "euler": 0, "euler-a": 0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "dpmpp-9m", "steps": 10}, "unknown sampling method 'dpmpp-9m'"),
        ({"method": "dpmpp-2m"}, "the dpmpp-2m solver needs steps"),
        ({"method": "unipc", "steps": "ddim10"}, "the unipc solver needs steps"),
        ({"method": "euler", "steps": 10, "eta": 0.5}, "eta applies to method 'ddim'"),
        ({"method": "euler", "steps": 10, "variance": "fixedsmall"}, "variance applies to methods"),
        ({"method": "pndm", "steps": 3}, "the pndm solver needs at least 4 steps"),
        ({"method": "dpmpp-2m", "steps": 2000}, "steps must be an int in [1, 1000]"),
        ({"method": "dpmpp-2m", "steps": 1000, "spacing": "linspace"}, "visits a timestep twice"),
        ({"method": "dpmpp-2m", "steps": 10, "spacing": "sideways"}, "spacing"),
    ],
)
def test_bad_solver_arguments_name_the_problem(kwargs, message):
    sampler = fastddpm.Sampler(SmallEps(), DiffusionConfig())
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        sampler.sample(1, progress=False, **kwargs)


def test_start_step_is_refused_for_a_solver():
    sampler = fastddpm.Sampler(SmallEps(), DiffusionConfig())
    with pytest.raises(ValueError, match="starts at its first step only"):
        sampler.sample(
            1, steps=10, method="dpmpp-2m", x_T=torch.zeros(1, 1, 4, 4), start_step=3, progress=False
        )


class SmallEps(torch.nn.Module):
    """A stand-in eps network on 1 x 4 x 4 images (eps = 0.1 x), with the U-Net's config."""

    def __init__(self) -> None:
        super().__init__()
        from fastddpm.unet import UNetConfig

        self.config = UNetConfig(
            in_channels=1, out_channels=1, ch=8, ch_mult=(1,), attn_resolutions=(), resolution=4, num_groups=8
        )
        self.backend = "torch"
        self.scale = torch.nn.Parameter(torch.tensor(0.1), requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scale * x


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w, d: d.__setitem__((0, 0), 5), "dest must be distinct slots in"),
        (lambda w, d: d.__setitem__((1, slice(None)), 0), "dest must be distinct slots in"),
        (lambda w, d: w.__setitem__((0, 0, 3), 0.5), "D rows weigh more than x and eps"),
        (lambda w, d: w.__setitem__((2, 3, 0), np.nan), "non-finite weights"),
    ],
)
def test_a_damaged_table_is_refused(change, message):
    from fastddpm.solver_table import SolverTable

    weights, dest = np.zeros((3, 4, 6)), np.full((3, 2), -1)
    weights[:, 0, :2], dest[0] = 1.0, [0, 1]
    change(weights, dest)
    with pytest.raises(ValueError, match=message):
        SolverTable.from_float64("t", weights, dest, np.arange(3.0), np.ones(3), 1.0, False)


@pytest.mark.parametrize("name", [*SOLVERS, "ddim"])
def test_a_channels_last_network_samples_as_the_contiguous_one(name):
    """The network's NHWC eps is made contiguous for the update: the same images to float32 noise."""
    from .conftest import tiny_unet

    config = DiffusionConfig(num_timesteps=50)
    nchw = fastddpm.Sampler(tiny_unet(backend="torch"), config).sample(
        2, steps=5, method=name, seed=1, progress=False
    )
    nhwc = fastddpm.Sampler(tiny_unet(backend="torch"), config, channels_last=True)
    assert torch.allclose(nhwc.sample(2, steps=5, method=name, seed=1, progress=False), nchw, atol=1e-5)
