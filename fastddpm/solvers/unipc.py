"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models") as diffusers' UniPCMultistepScheduler runs it with its defaults: data
prediction, order 2, lower_order_final, the corrector UniC after every step but the first,
final_sigmas_type "zero". B(h) = h ("bh1") or e^h - 1 ("bh2").

Each step first corrects the previous step's predicted x with this step's D (UniC), keeps the
corrected x, then predicts the next x from it (UniP): both linear in x, eps and kept values.
"""

from __future__ import annotations

import math

import numpy as np

from .linear import EPS, D, Lin, Steps, X
from .timesteps import alpha_sigma, lam


def program(timesteps: np.ndarray, sigmas: np.ndarray, order: int, solver_type: str):
    """The solver's steps over `timesteps` (S,) visited largest first, with noise levels sigmas
    (S + 1,) ending at 0."""
    S = len(timesteps)

    def run(steps: Steps) -> None:
        outputs: list[Lin] = []  # the D of earlier steps kept, newest last
        last_sample: Lin | None = None
        this_order = lower_order_nums = 0
        for k in range(S):
            alpha_s, sigma_s = alpha_sigma(sigmas[k])
            d = X / alpha_s - EPS * (sigma_s / alpha_s)
            ms = [*outputs, D]
            sample = X
            if k > 0 and last_sample is not None:  # UniC, with the last step's order
                sample = _update(sigmas, k - 1, last_sample, ms, this_order, solver_type, corrector=True)
            this_order = min(order, S - k, lower_order_nums + 1)
            x_next = _update(sigmas, k, sample, ms, this_order, solver_type, corrector=False)
            lower_order_nums = min(lower_order_nums + 1, order)
            last_sample = steps.keep(sample)
            outputs = [*outputs, steps.keep(D)][-order:]
            steps.add(float(timesteps[k]), d, x_next)

    return run


def _update(
    sigmas: np.ndarray, k: int, x: Lin, ms: list[Lin], order: int, solver_type: str, corrector: bool
) -> Lin:
    """UniP (corrector False: from x at sigmas[k] to sigmas[k + 1], with ms[-1] the D at sigmas[k])
    or UniC (corrector True: x is the last step's sample at sigmas[k], ms[-1] the D at sigmas[k + 1]
    and ms[-2] the one at sigmas[k]), of `order`."""
    alpha_t, sigma_t = alpha_sigma(sigmas[k + 1])
    _, sigma_s0 = alpha_sigma(sigmas[k])
    lambda_s0 = lam(sigmas[k])
    h = lam(sigmas[k + 1]) - lambda_s0
    # UniP's m0 is this step's D; UniC's m0 is the last step's, and model_t = this step's D.
    m0 = ms[-2] if corrector else ms[-1]
    history = ms[:-2] if corrector else ms[:-1]  # m_i, newest last
    rks, D1s = [], []
    for i in range(1, order):
        s_i = k - i
        rk = (lam(sigmas[s_i]) - lambda_s0) / h
        rks.append(rk)
        D1s.append((history[-i] - m0) * (1.0 / rk))
    rks.append(1.0)
    hh = -h
    h_phi_1 = -1.0 if math.isinf(hh) else math.expm1(hh)
    B_h = hh if solver_type == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0
    R, b, factorial_i = [], [], 1
    for i in range(1, order + 1):
        R.append(np.power(rks, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial_i
    x_t = x * (sigma_t / sigma_s0) - m0 * (alpha_t * h_phi_1)
    if corrector:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(np.array(R), np.array(b)))
        res = sum(D1 * rho for D1, rho in zip(D1s, rhos[:-1], strict=False)) + (ms[-1] - m0) * rhos[-1]
        return x_t - res * (alpha_t * B_h)
    if not D1s:
        return x_t
    rhos = [0.5] if order == 2 else list(np.linalg.solve(np.array(R)[:-1, :-1], np.array(b)[:-1]))
    res = sum(D1 * rho for D1, rho in zip(D1s, rhos, strict=True))
    return x_t - res * (alpha_t * B_h)
