"""DDIM as diffusers' DDIMScheduler steps by default (use_clipped_model_output=False): x0 clipped,
but the direction term keeps the network's own eps,

    x_prev = sqrt(abar_prev) clamp(x0) + sqrt(1 - abar_prev - sigma^2) eps + sigma z,

which with clipping is not the fused DDPM step's form (that one re-derives eps from the clipped
x0, use_clipped_model_output=True). Built from a DDIM step table's float64 columns.
"""

from __future__ import annotations

import numpy as np
import torch

from ..schedule import COEF_X0, COEF_XT, SIGMA, SQRT_RECIP_ABAR, SQRT_RECIPM1_ABAR
from ..solver_table import SolverTable
from .linear import EPS, D, Steps, X, Z, build


def ddim_eps_table(
    coef: np.ndarray, timesteps: np.ndarray, final_draw: bool, device: torch.device | str = "cpu"
) -> SolverTable:
    """The SolverTable of a DDIM step table's float64 coef (S, NUM_COEFS) and timesteps (S,), in
    diffusers' default form (run it with clip_x0=True)."""

    def run(steps: Steps) -> None:
        for i in reversed(range(len(timesteps))):
            a, b = coef[i, SQRT_RECIP_ABAR], coef[i, SQRT_RECIPM1_ABAR]
            sqrt_abar, sqrt_one_minus_abar = 1.0 / a, b / a
            direction = coef[i, COEF_XT] * sqrt_one_minus_abar  # sqrt(1 - abar_prev - sigma^2)
            sqrt_abar_prev = coef[i, COEF_X0] + coef[i, COEF_XT] * sqrt_abar
            x_prev = D * sqrt_abar_prev + EPS * direction + Z * coef[i, SIGMA]
            steps.add(float(timesteps[i]), X * a - EPS * b, x_prev)

    return build("ddim", run, final_draw=final_draw, device=device)
