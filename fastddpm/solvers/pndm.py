"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") as diffusers'
PNDMScheduler runs it with its defaults: three pseudo Runge-Kutta steps of four network calls each
(PRK), then pseudo linear multistep steps (PLMS, a 4th-order Adams-Bashforth combination of eps),
each step a transfer x_t -> x_prev by the paper's eq. (9).
"""

from __future__ import annotations

import math

import numpy as np

from .linear import EPS, Lin, Steps, X

PNDM_ORDER = 4


def layout(timesteps: np.ndarray, num_timesteps: int) -> np.ndarray:
    """The network's timesteps, one per call: PNDMScheduler.timesteps from its `_timesteps` (S,)
    (ascending): the PRK calls at t, t - dt/2, t - dt/2, t - dt for the last PNDM_ORDER - 1 steps,
    then the PLMS calls (S + 9 calls in all)."""
    half = num_timesteps // len(timesteps) // 2
    prk = np.array(timesteps[-PNDM_ORDER:]).repeat(2) + np.tile(np.array([0, half]), PNDM_ORDER)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    return np.concatenate([prk, timesteps[:-3][::-1]]).astype(np.int64)


def program(timesteps: np.ndarray, abar: np.ndarray, final_abar: float):
    """The solver's steps over its `_timesteps` (S,) (ascending), on the schedule's abar (T,);
    final_abar is abar before t = 0 (set_alpha_to_one: 1, else abar_0)."""
    S, T = len(timesteps), len(abar)
    calls = layout(timesteps, T)
    n_prk = len(calls) - (S - 3)
    dt = T // S

    def prev_sample(sample: Lin, t: int, prev_t: int, model_output: Lin) -> Lin:
        a_t = abar[t]
        a_prev = abar[prev_t] if prev_t >= 0 else final_abar
        sample_coeff = math.sqrt(a_prev / a_t)
        denom = a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev)
        return sample * sample_coeff - model_output * ((a_prev - a_t) / denom)

    def run(steps: Steps) -> None:
        ets: list[Lin] = []  # kept eps, newest last
        cur_model_output: Lin = Lin()
        cur_sample: Lin | None = None
        for c, t_call in enumerate(calls):
            t_call = int(t_call)
            d = X * math.sqrt(1 / abar[t_call]) - EPS * math.sqrt(1 / abar[t_call] - 1)
            if c < n_prk:
                prev_t = t_call - (0 if c % 2 else dt // 2)
                t = int(calls[c // 4 * 4])
                model_output = EPS
                if c % 4 == 0:
                    ets.append(steps.keep(EPS))
                    cur_model_output = ets[-1] * (1 / 6)
                    cur_sample = steps.keep(X)
                    source = X  # this call's sample is the kept one
                elif c % 4 in (1, 2):
                    cur_model_output = steps.keep(cur_model_output + EPS * (1 / 3))
                    source = cur_sample
                else:
                    model_output = cur_model_output + EPS * (1 / 6)
                    cur_model_output = Lin()
                    source = cur_sample
                x_next = prev_sample(source, t, prev_t, model_output)
            else:
                e4, e3, e2 = ets[-3:]
                model_output = (EPS * 55 - e2 * 59 + e3 * 37 - e4 * 9) * (1 / 24)
                ets = [*ets[-3:], steps.keep(EPS)]
                x_next = prev_sample(X, t_call, t_call - dt, model_output)
            steps.add(float(t_call), d, x_next)

    return run
