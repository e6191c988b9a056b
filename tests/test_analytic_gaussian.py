"""Sampling Gaussian data with its exact eps-predictor reproduces mu and sigma.

For x0 ~ N(mu, diag sigma^2), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps is Gaussian
with variance v_t = abar_t sigma^2 + 1 - abar_t, and the exact predictor is

    eps*(x_t, t) = E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / v_t.

Tolerance, derived. From n = 4096 chains the sample mean of each of the 16 dimensions
has standard error sigma / sqrt(n), and the sample standard deviation sigma / sqrt(2n)
(Gaussian data). Each check allows 5 standard errors: with 32 checks per case a correct
sampler fails one with probability about 32 * 5.7e-7 = 2e-5 (and the seeds are fixed).

The samplers are not exact at finite steps: the last step returns the posterior mean
E[x0 | x_1], never a draw, and a few large steps are a coarse discretisation. With eps*
every step is linear-Gaussian, so the exact mean and standard deviation of the
sampler's output follow from a float64 recursion (m <- A m + B, v <- A^2 v + sigma_i^2);
their distance from (mu, sigma) is the sampler's bias, added to the tolerance and
bounded itself below. Measured: `python -m tests.test_analytic_gaussian`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastddpm.sampler import Sampler
from fastddpm.schedule import DIRECT_EPS, DIRECT_XT, SIGMA, DiffusionConfig, Schedule
from fastddpm.solver_table import (
    COL_D,
    COL_EPS,
    COL_X,
    COL_Z,
    NUM_INPUTS,
    ROW_D,
    ROW_KEEP_A,
    ROW_KEEP_B,
    ROW_X,
)
from fastddpm.solvers import SOLVERS
from fastddpm.unet import UNetConfig

CHAINS = 4096
Z = 5.0  # standard errors allowed
WIDE = (np.linspace(-0.5, 0.5, 16), np.linspace(0.3, 0.9, 16))  # mu, sigma
INSIDE = (np.linspace(-0.4, 0.4, 16), np.linspace(0.05, 0.15, 16))  # |mu| + 4 sigma <= 1: clipping idles


class ExactEps(torch.nn.Module):
    """eps*(x_t, t) for x0 ~ N(mu, diag sigma^2) over 1 x 4 x 4 images; t is the original timestep."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, abar: np.ndarray) -> None:
        super().__init__()
        self.config = UNetConfig(
            in_channels=1, out_channels=1, ch=8, ch_mult=(1,), attn_resolutions=(), resolution=4, num_groups=8
        )
        self.backend = "torch"
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=torch.float32).view(1, 1, 4, 4), False)
        self.var = torch.nn.Parameter(torch.tensor(sigma**2, dtype=torch.float32).view(1, 1, 4, 4), False)
        self.register_buffer("abar", torch.tensor(abar, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].float().view(-1, 1, 1, 1)
        v = abar * self.var + 1 - abar
        return torch.sqrt(1 - abar) * (x - torch.sqrt(abar) * self.mu) / v


def exact_output_moments(schedule: Schedule, coef: np.ndarray, abar_full: np.ndarray, mu, sigma):
    """Mean and std of the sampler's output under eps*, by the float64 linear-Gaussian recursion."""
    m, v = np.zeros_like(mu), np.ones_like(mu)  # x_T ~ N(0, I)
    for i in reversed(range(len(schedule))):
        abar = abar_full[schedule.timesteps[i]]
        gain = math.sqrt(1 - abar) / (abar * sigma**2 + 1 - abar)  # d eps* / d x_t
        A = coef[i, DIRECT_XT] - coef[i, DIRECT_EPS] * gain
        B = coef[i, DIRECT_EPS] * gain * math.sqrt(abar) * mu
        m, v = A * m + B, A * A * v + coef[i, SIGMA] ** 2
    return m, np.sqrt(v)


def exact_solver_moments(table, abar_full: np.ndarray, mu, sigma):
    """The same for a solver's table: under eps* each step is affine in the state (x and the
    history slots) plus one z, so its mean m and covariance P (per dimension) follow exactly:
    m <- A m + b, P <- A P A^T + n n^T."""
    W, dest = table.weights.double().numpy(), table.dest.numpy()
    scale, ts = table.input_scale.double().numpy(), table.timesteps.numpy()
    K = 1 + table.num_slots  # state: x, then the slots
    m, P = np.zeros((K, len(mu))), np.zeros((K, K, len(mu)))
    P[0, 0] = table.init_scale**2
    for i in reversed(range(len(table))):
        abar = abar_full[int(ts[i])]
        gain = math.sqrt(1 - abar) / (abar * sigma**2 + 1 - abar) * scale[i]  # d eps / d x
        shift = -math.sqrt(1 - abar) * math.sqrt(abar) * mu / (abar * sigma**2 + 1 - abar)  # eps at x = 0
        d_gain = W[i, ROW_D, COL_X] + W[i, ROW_D, COL_EPS] * gain  # D = d_gain x + d_shift
        d_shift = W[i, ROW_D, COL_EPS] * shift
        A, b, n = np.zeros((K, K, len(mu))), np.zeros((K, len(mu))), np.zeros((K, len(mu)))
        for k in range(1, K):
            A[k, k] = 1.0  # a slot nothing writes keeps its value
        for row, slot in ((ROW_KEEP_A, dest[i, 0]), (ROW_KEEP_B, dest[i, 1]), (ROW_X, -2)):
            if slot == -1:
                continue
            k = 0 if slot == -2 else 1 + slot
            w = W[i, row]
            A[k] = 0.0
            A[k, 0] = w[COL_X] + w[COL_EPS] * gain + w[COL_D] * d_gain
            A[k, 1:] = w[NUM_INPUTS:, None]
            b[k], n[k] = w[COL_EPS] * shift + w[COL_D] * d_shift, w[COL_Z]
        m = np.einsum("ijd,jd->id", A, m) + b
        P = np.einsum("ijd,jkd,lkd->ild", A, P, A) + n[:, None] * n[None, :]
    return m[0], np.sqrt(P[0, 0])


# Bound on |bias| / sigma at 20 steps, 1.5 times the measured one (the std's; the mean's is
# 0.003 or less). Most of it is the last step's: those solvers end on D at t = 49, trailing
# spacing's last timestep, whose spread is the posterior mean's, narrower than sigma (PNDM
# steps on to t = 0).
SOLVER_BIAS = {
    "dpmpp-2m": 0.21, "dpmpp-3m": 0.19, "dpmpp-2m-sde": 0.23, "unipc": 0.2, "unipc-bh1": 0.17,
    "pndm": 0.016, "euler": 0.32, "euler-a": 0.43,
}  # fmt: skip
CASES = {  # name: (data, steps, method, variance, eta, clip_x0, bound on |bias| / sigma)
    "ancestral-fixedlarge": (WIDE, None, "ddpm", "fixedlarge", 0.0, False, 0.005),
    "ancestral-fixedsmall": (WIDE, None, "ddpm", "fixedsmall", 0.0, False, 0.015),
    "ancestral-fixedlarge-clipped": (INSIDE, None, "ddpm", "fixedlarge", 0.0, True, 0.01),
    "ancestral-fixedsmall-clipped": (INSIDE, None, "ddpm", "fixedsmall", 0.0, True, 0.08),
    "respaced50-fixedlarge": (WIDE, 50, "ddpm", "fixedlarge", 0.0, False, 0.08),
    "respaced50-fixedsmall": (WIDE, 50, "ddpm", "fixedsmall", 0.0, False, 0.17),
    "ddim50-eta0": (WIDE, 50, "ddim", "fixedlarge", 0.0, False, 0.09),
    "ddim50-eta1": (WIDE, 50, "ddim", "fixedlarge", 1.0, False, 0.17),
    # The solvers, at 20 steps of trailing spacing (whose timesteps are integers and start at T - 1).
    **{f"{name}-20": (WIDE, 20, name, "fixedlarge", 0.0, False, SOLVER_BIAS[name]) for name in SOLVERS},
}


def measure(name: str) -> dict[str, float]:
    """Sample one case; return the worst errors against (mu, sigma), in units of sigma, and its bias."""
    (mu, sigma), steps, method, variance, eta, clip, _ = CASES[name]
    full = Schedule.from_name("linear")
    model = ExactEps(mu, sigma, full.abar)
    solver = method in SOLVERS
    config = DiffusionConfig(variance=variance, clip_x0=clip, spacing="trailing" if solver else "improved")
    sampler = Sampler(model, config)
    x = (
        sampler.sample(
            CHAINS,
            steps=steps,
            method=method,
            eta=eta,
            progress=False,
            generator=torch.Generator().manual_seed(0),
        )
        .double()
        .view(CHAINS, 16)
        .numpy()
    )
    if solver:
        m, s = exact_solver_moments(sampler.step_table(steps, method), full.abar, mu, sigma)
    else:
        schedule = full if steps is None else full.respace(steps)
        m, s = exact_output_moments(
            schedule, schedule.step_coefficients(method, variance, eta), full.abar, mu, sigma
        )
    se_mean, se_std = sigma / math.sqrt(CHAINS), sigma / math.sqrt(2 * CHAINS)
    mean_err, std_err = np.abs(x.mean(0) - mu), np.abs(x.std(0, ddof=1) - sigma)
    return {
        "mean_err/sigma": float((mean_err / sigma).max()),
        "std_err/sigma": float((std_err / sigma).max()),
        "mean_excess": float(((mean_err - np.abs(m - mu)) / se_mean).max()),  # in standard errors
        "std_excess": float(((std_err - np.abs(s - sigma)) / se_std).max()),
        "mean_vs_exact": float((np.abs(x.mean(0) - m) / se_mean).max()),  # in standard errors
        "std_vs_exact": float((np.abs(x.std(0, ddof=1) - s) / se_std).max()),
        "bias_mean/sigma": float((np.abs(m - mu) / sigma).max()),
        "bias_std/sigma": float((np.abs(s - sigma) / sigma).max()),
    }


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_reproduces_the_gaussian(name):
    result = measure(name)
    # mu and sigma within Z standard errors plus the sampler's exact bias ...
    assert result["mean_excess"] <= Z and result["std_excess"] <= Z, result
    # ... the exact moments of the sampler's own chain within Z standard errors ...
    assert result["mean_vs_exact"] <= Z and result["std_vs_exact"] <= Z, result
    # ... and that bias is small.
    bound = CASES[name][-1]
    assert result["bias_mean/sigma"] <= bound and result["bias_std/sigma"] <= bound, result


if __name__ == "__main__":
    for case in CASES:
        print(case, {k: round(v, 5) for k, v in measure(case).items()})
