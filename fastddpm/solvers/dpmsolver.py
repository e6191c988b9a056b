"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"), multistep, as diffusers' DPMSolverMultistepScheduler runs it with its
defaults: data prediction D = (x - sigma_t eps) / alpha_t, midpoint second order,
lower_order_final, final_sigmas_type "zero" (the last step is first order and lands on D).

"dpmsolver++" is the ODE solver (orders 2 and 3); "sde-dpmsolver++" its SDE variant (Gonzalez et
al.'s SDE-DPM-Solver++(2M)), which draws z at every step.
"""

from __future__ import annotations

import math

import numpy as np

from .linear import EPS, D, Lin, Steps, X, Z
from .timesteps import alpha_sigma, lam


def program(timesteps: np.ndarray, sigmas: np.ndarray, order: int, sde: bool):
    """The solver's steps over `timesteps` (S,) visited largest first, with noise levels sigmas
    (S + 1,) ending at 0."""
    S = len(timesteps)

    def run(steps: Steps) -> None:
        outputs: list[Lin] = []  # the D of earlier steps kept, newest last
        lower_order_nums = 0
        for k in range(S):
            alpha_s0, sigma_s0 = alpha_sigma(sigmas[k])
            d = X / alpha_s0 - EPS * (sigma_s0 / alpha_s0)
            ms = [*outputs, D]  # m0 = ms[-1] is this step's D
            last_order = k == S - 1  # final_sigmas_type "zero": the last step is first order
            second_last = k == S - 2 and S < 15  # lower_order_final
            if order == 1 or lower_order_nums < 1 or last_order:
                x_next = _first_order(sigmas, k, sde)
            elif order == 2 or lower_order_nums < 2 or second_last:
                x_next = _second_order(sigmas, k, ms, sde)
            else:
                x_next = _third_order(sigmas, k, ms)
            lower_order_nums = min(lower_order_nums + 1, order)
            if order > 1:
                outputs = [*outputs, steps.keep(D)][-(order - 1) :]
            steps.add(float(timesteps[k]), d, x_next)

    return run


def _exp_neg(h: float) -> float:
    return 0.0 if math.isinf(h) else math.exp(-h)


def _first_order(sigmas: np.ndarray, k: int, sde: bool) -> Lin:
    alpha_t, sigma_t = alpha_sigma(sigmas[k + 1])
    _, sigma_s = alpha_sigma(sigmas[k])
    e = _exp_neg(lam(sigmas[k + 1]) - lam(sigmas[k]))
    if sde:
        noise = Z * (sigma_t * math.sqrt(1 - e * e))
        return X * (sigma_t / sigma_s * e) + D * (alpha_t * (1 - e * e)) + noise
    return X * (sigma_t / sigma_s) - D * (alpha_t * (e - 1.0))


def _second_order(sigmas: np.ndarray, k: int, ms: list[Lin], sde: bool) -> Lin:
    alpha_t, sigma_t = alpha_sigma(sigmas[k + 1])
    _, sigma_s0 = alpha_sigma(sigmas[k])
    lambda_t, lambda_s0, lambda_s1 = lam(sigmas[k + 1]), lam(sigmas[k]), lam(sigmas[k - 1])
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    m0, m1 = ms[-1], ms[-2]
    D0, D1 = m0, (m0 - m1) * (1.0 / r0)
    e = math.exp(-h)
    if sde:
        return (
            X * (sigma_t / sigma_s0 * e)
            + D0 * (alpha_t * (1 - e * e))
            + D1 * (0.5 * alpha_t * (1 - e * e))
            + Z * (sigma_t * math.sqrt(1 - e * e))
        )
    return X * (sigma_t / sigma_s0) - D0 * (alpha_t * (e - 1.0)) - D1 * (0.5 * alpha_t * (e - 1.0))


def _third_order(sigmas: np.ndarray, k: int, ms: list[Lin]) -> Lin:
    alpha_t, sigma_t = alpha_sigma(sigmas[k + 1])
    _, sigma_s0 = alpha_sigma(sigmas[k])
    lambda_t, lambda_s0, lambda_s1, lambda_s2 = (lam(sigmas[j]) for j in (k + 1, k, k - 1, k - 2))
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    m0, m1, m2 = ms[-1], ms[-2], ms[-3]
    D1_0, D1_1 = (m0 - m1) * (1.0 / r0), (m1 - m2) * (1.0 / r1)
    D1 = D1_0 + (D1_0 - D1_1) * (r0 / (r0 + r1))
    D2 = (D1_0 - D1_1) * (1.0 / (r0 + r1))
    e = math.exp(-h)
    return (
        X * (sigma_t / sigma_s0)
        - m0 * (alpha_t * (e - 1.0))
        + D1 * (alpha_t * ((e - 1.0) / h + 1.0))
        - D2 * (alpha_t * ((e - 1.0 + h) / h**2 - 0.5))
    )
