"""The timesteps and noise levels each diffusers solver visits after `set_timesteps(S)`, in float64.

diffusers' schedulers differ in how they space S steps (timestep_spacing "leading", "trailing",
"linspace"): DPMSolverMultistepScheduler and UniPCMultistepScheduler take S of S + 1 points,
Euler's schedulers S points with fractional "linspace" timesteps, PNDMScheduler DDPM's rule.
sigma = sqrt((1 - abar) / abar) is the noise level of the variance-exploding form
x_ve = x / sqrt(abar); alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma alpha_t are the
variance-preserving ones; lambda = log(alpha_t / sigma_t) is half the log-SNR.
"""

from __future__ import annotations

import numpy as np

from ..schedule import DIFFUSERS_SPACINGS, Schedule


def _check(spacing: str, steps: int, T: int) -> None:
    if spacing not in DIFFUSERS_SPACINGS:
        choices = ", ".join(DIFFUSERS_SPACINGS)
        raise ValueError(f"unknown timestep spacing {spacing!r} for a solver; choose one of {choices}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")


def multistep_timesteps(T: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """DPMSolverMultistepScheduler's and UniPCMultistepScheduler's timesteps, (S,) int64 in the
    order they are visited (largest first)."""
    _check(spacing, steps, T)
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + steps_offset
    else:
        t = np.arange(T, 0, -T / steps).round() - 1
    return _in_range(t.astype(np.int64), T)


def euler_timesteps(T: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """EulerDiscreteScheduler's and EulerAncestralDiscreteScheduler's timesteps, (S,) float64 (float32
    values, as diffusers keeps them: fractional in linspace spacing), largest first."""
    _check(spacing, steps, T)
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1]
    elif spacing == "leading":
        t = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.float32) + steps_offset
    else:
        t = np.arange(T, 0, -T / steps).round().astype(np.float32) - 1
    return _in_range(t.astype(np.float64), T)


def pndm_timesteps(T: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """PNDMScheduler's `_timesteps` (before its Runge-Kutta warm-up is laid out), (S,) int64,
    smallest first as PNDMScheduler keeps them."""
    _check(spacing, steps, T)
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps).round()
    elif spacing == "leading":
        t = (np.arange(0, steps) * (T // steps)).round() + steps_offset
    else:
        t = np.round(np.arange(T, 0, -T / steps))[::-1] - 1
    return _in_range(t.astype(np.int64), T)


def _in_range(t: np.ndarray, T: int) -> np.ndarray:
    if t.min() < 0 or t.max() >= T:
        raise ValueError(f"the spacing leaves [0, {T}): timesteps {t.min()}..{t.max()}")
    return t


def sigmas_at(schedule: Schedule, timesteps: np.ndarray) -> np.ndarray:
    """sigma(t) = sqrt((1 - abar_t) / abar_t) at (possibly fractional) timesteps, linearly
    interpolated between integer t as diffusers does, then rounded to float32 as diffusers keeps
    them, (S,) float64."""
    sigmas = np.sqrt((1.0 - schedule.abar) / schedule.abar)
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas).astype(np.float32).astype(np.float64)


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the variance-preserving form at VE noise level sigma."""
    alpha_t = 1.0 / np.sqrt(sigma**2 + 1.0)
    return float(alpha_t), float(sigma * alpha_t)


def lam(sigma: float) -> float:
    """lambda = log(alpha_t) - log(sigma_t); +inf at sigma = 0."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return float(np.log(alpha_t) - np.log(sigma_t))
