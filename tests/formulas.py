"""The DDPM and DDIM reverse step written straight from the papers, in float64 numpy: the
truth that fastddpm and diffusers are both measured against."""

import math

import numpy as np

from fastddpm.schedule import Schedule


def step_in_float64(s: Schedule, kind: str, variance: str, eta: float, i: int, x, eps, z, clip: bool):
    """The reverse step written straight from the paper's formulas, in float64 numpy."""
    abar, abar_prev = s.abar[i], s.abar_prev[i]
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    if kind == "ddpm":
        sigma = 0.0 if i == 0 else math.exp(0.5 * s.log_variance(variance)[i])
        if clip:
            mean = s.posterior_mean_coef1[i] * np.clip(x0, -1, 1) + s.posterior_mean_coef2[i] * x
        else:
            mean = (x - s.betas[i] / math.sqrt(1 - abar) * eps) / math.sqrt(1 - s.betas[i])
    else:
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        if clip:
            x0 = np.clip(x0, -1, 1)
        eps_from_x0 = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        mean = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma**2) * eps_from_x0
    return mean + sigma * z
