"""Euler's method on the probability-flow ODE in Karras et al.'s (2022) sigma parameterization
(k-diffusion's sample_euler), and its ancestral variant (sample_euler_ancestral), as diffusers'
EulerDiscreteScheduler and EulerAncestralDiscreteScheduler run them with their defaults.

The sample is x_ve = x / sqrt(abar) at noise level sigma; the network sees x_ve / sqrt(sigma^2 + 1)
and D = x_ve - sigma eps; dx/dsigma = (x_ve - D) / sigma.
"""

from __future__ import annotations

import math

import numpy as np

from .linear import EPS, D, Steps, X, Z


def init_noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """x_T's scale: the largest sigma (linspace, trailing), or sqrt(sigma_max^2 + 1) (leading)."""
    top = float(np.max(sigmas))
    return top if spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)


def program(timesteps: np.ndarray, sigmas: np.ndarray, ancestral: bool):
    """The solver's steps over `timesteps` (S,) visited largest first, with noise levels sigmas
    (S + 1,) ending at 0."""

    def run(steps: Steps) -> None:
        for k, t in enumerate(timesteps):
            sigma, sigma_to = sigmas[k], sigmas[k + 1]
            derivative = (X - D) * (1.0 / sigma)
            if ancestral:
                sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
                sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
                x_next = X + derivative * (sigma_down - sigma) + Z * sigma_up
            else:
                x_next = X + derivative * (sigma_to - sigma)
            steps.add(float(t), X - EPS * sigma, x_next, input_scale=1.0 / math.sqrt(sigma**2 + 1))

    return run
