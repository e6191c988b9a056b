"""Beta schedules and every coefficient table of DDPM, computed in float64.

Notation follows Ho et al. (2020) and the original code (diffusion_utils_2.py):
alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s, with 0-based indices
t = 0..T-1 (paper step t+1). All tables are float64 numpy arrays; `StepTable`
casts the ones the reverse step needs to a device tensor exactly once.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from . import config_schema

BETA_SCHEDULES = ("linear", "cosine", "quad", "const", "jsd", "sigmoid")
VARIANCES = ("fixedlarge", "fixedsmall")
STEP_KINDS = ("ddpm", "ddim")

# Columns of StepTable.coef, one row per step index i (see `ddpm_step`).
SQRT_RECIP_ABAR = 0  # sqrt(1/abar): x0 = a * x_t - b * eps
SQRT_RECIPM1_ABAR = 1  # sqrt(1/abar - 1)
COEF_X0 = 2  # mean = coef_x0 * x0 + coef_xt * x_t       (clipped-x0 form)
COEF_XT = 3
DIRECT_XT = 4  # mean = direct_xt * x_t - direct_eps * eps  (direct eps form)
DIRECT_EPS = 5
SIGMA = 6  # x_{t-1} = mean + sigma * z; 0 at the last step
NUM_COEFS = 7


def beta_schedule(
    name: str,
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> np.ndarray:
    """Betas (T,) float64 for a named schedule.

    linear, quad, const and jsd are the original code's; cosine is Nichol &
    Dhariwal (2021) with s = 0.008 and betas capped at 0.999; sigmoid spans
    sigmoid(-6..6) between beta_start and beta_end.
    """
    T = config_schema.value(
        config_schema.DIFFUSION["num_timesteps"], num_timesteps, "schedule", "num_timesteps"
    )
    for key, beta in (("beta_start", beta_start), ("beta_end", beta_end)):
        config_schema.value(config_schema.DIFFUSION[key], beta, "schedule", key)
    if beta_start > beta_end:
        raise ValueError(f"schedule: beta_start {beta_start} is above beta_end {beta_end}")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name == "const":
        betas = np.full(T, beta_end, dtype=np.float64)
    elif name == "jsd":
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif name == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64)))
        betas = s * (beta_end - beta_start) + beta_start
    elif name == "cosine":

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
            dtype=np.float64,
        )
    else:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    _check_betas(betas)
    return betas


def _check_betas(betas: np.ndarray) -> None:
    """Betas must be a non-empty 1-D array, every value finite and in (0, 1]."""
    if betas.ndim != 1 or not len(betas) or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must be a non-empty 1-D array with every value in (0, 1] (none NaN)")


def _check_abar(abar: np.ndarray) -> None:
    """abar_t = 0 (beta_t = 1, as jsd ends) leaves x0 undefined from eps: a ValueError."""
    if np.any(abar == 0.0):
        raise ValueError(
            "this schedule ends with beta_T = 1 (abar_T = 0, as jsd does): x0 cannot be predicted"
            " from eps at t = T, so the reverse step is undefined"
        )


def _ddim_sigma(abar: np.ndarray, abar_prev: np.ndarray, eta: float) -> np.ndarray:
    """DDIM's sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev), (S,) float64."""
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    return eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)


def _step_columns(
    kind: str, abar: np.ndarray, abar_prev: np.ndarray, betas: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """The (S, NUM_COEFS) float64 table of steps from abar to abar_prev with betas = 1 - abar/abar_prev
    and noise scale sigma, all (S,). ddpm: the posterior mean. ddim: x_{t-1} = sqrt(abar_prev) x0 +
    sqrt(1 - abar_prev - sigma^2) eps + sigma z with eps re-derived from x0, which gives the same two
    linear forms."""
    coef = np.zeros((len(abar), NUM_COEFS), dtype=np.float64)
    coef[:, SQRT_RECIP_ABAR] = np.sqrt(1.0 / abar)
    coef[:, SQRT_RECIPM1_ABAR] = np.sqrt(1.0 / abar - 1.0)
    if kind == "ddpm":
        alphas = 1.0 - betas
        coef[:, COEF_X0] = betas * np.sqrt(abar_prev) / (1.0 - abar)
        coef[:, COEF_XT] = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
        coef[:, DIRECT_XT] = 1.0 / np.sqrt(alphas)
        coef[:, DIRECT_EPS] = betas / (np.sqrt(alphas) * np.sqrt(1.0 - abar))
    else:
        dir_xt = np.sqrt(np.maximum(1 - abar_prev - sigma**2, 0.0))
        coef[:, COEF_X0] = np.sqrt(abar_prev) - dir_xt * np.sqrt(abar) / np.sqrt(1 - abar)
        coef[:, COEF_XT] = dir_xt / np.sqrt(1 - abar)
        coef[:, DIRECT_XT] = np.sqrt(abar_prev / abar)
        coef[:, DIRECT_EPS] = np.sqrt(abar_prev) * coef[:, SQRT_RECIPM1_ABAR] - dir_xt
    coef[:, SIGMA] = sigma
    return coef


def space_timesteps(num_timesteps: int, spacing: int | str) -> list[int]:
    """The timesteps kept when respacing T steps to fewer (Improved DDPM rule).

    `spacing` is an int S (S evenly strided steps, first and last kept), a
    string "S1,S2,..." (that many steps in each of equal sections of [0, T)),
    or "ddimS" (the DDIM rule: every T//S-th step from 0).
    Returns sorted original timesteps.
    """
    T = num_timesteps
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        S = int(spacing[4:])
        for stride in range(1, T):
            if len(range(0, T, stride)) == S:
                return list(range(0, T, stride))
        raise ValueError(f"cannot make exactly {S} DDIM steps out of {T}")
    counts = [spacing] if isinstance(spacing, int) else [int(c) for c in spacing.split(",")]
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} (T = {T})")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0  # accumulated, not multiplied, exactly as Improved DDPM rounds
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return kept


@dataclass(frozen=True)
class Schedule:
    """All per-step tables of a (possibly respaced) DDPM, float64, shape (S,).

    `timesteps[i]` is the original t the network receives at step index i;
    for the full schedule it is i itself. The tables derived from the betas (alphas, abar and
    what follows from them) are computed on first access and kept: every later access returns
    the same array, read-only.
    """

    betas: np.ndarray
    timesteps: np.ndarray

    @classmethod
    def from_name(
        cls,
        name: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> Schedule:
        betas = beta_schedule(name, num_timesteps, beta_start, beta_end)
        return cls(betas=betas, timesteps=np.arange(num_timesteps))

    @classmethod
    def from_betas(cls, betas: np.ndarray | list[float]) -> Schedule:
        betas = np.asarray(betas, dtype=np.float64)
        _check_betas(betas)
        return cls(betas=betas, timesteps=np.arange(len(betas)))

    def __post_init__(self) -> None:
        if len(self.betas) != len(self.timesteps):
            raise ValueError("betas and timesteps must have the same length")

    def __len__(self) -> int:
        return len(self.betas)

    def respace(self, spacing: int | str) -> Schedule:
        """Keep fewer steps: beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}."""
        keep = space_timesteps(len(self), spacing)
        abar = self.abar[keep]
        abar_prev = np.append(1.0, abar[:-1])
        return Schedule(betas=1.0 - abar / abar_prev, timesteps=self.timesteps[keep])

    @staticmethod
    def _kept(values: np.ndarray) -> np.ndarray:
        """A table as every access shares it: read-only."""
        values.flags.writeable = False
        return values

    @functools.cached_property
    def alphas(self) -> np.ndarray:
        return self._kept(1.0 - self.betas)

    @functools.cached_property
    def abar(self) -> np.ndarray:
        return self._kept(np.cumprod(self.alphas))

    @functools.cached_property
    def abar_prev(self) -> np.ndarray:
        return self._kept(np.append(1.0, self.abar[:-1]))

    @functools.cached_property
    def sqrt_recip_abar(self) -> np.ndarray:
        return self._kept(np.sqrt(1.0 / self.abar))

    @functools.cached_property
    def sqrt_recipm1_abar(self) -> np.ndarray:
        return self._kept(np.sqrt(1.0 / self.abar - 1.0))

    @functools.cached_property
    def beta_tilde(self) -> np.ndarray:
        """Posterior variance of q(x_{t-1} | x_t, x0)."""
        return self._kept(self.betas * (1.0 - self.abar_prev) / (1.0 - self.abar))

    @functools.cached_property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Coefficient of x0 in the posterior mean."""
        return self._kept(self.betas * np.sqrt(self.abar_prev) / (1.0 - self.abar))

    @functools.cached_property
    def posterior_mean_coef2(self) -> np.ndarray:
        """Coefficient of x_t in the posterior mean."""
        return self._kept((1.0 - self.abar_prev) * np.sqrt(self.alphas) / (1.0 - self.abar))

    def log_variance(self, variance: str) -> np.ndarray:
        """fixedlarge: log([beta_tilde[1], beta[1:]]); fixedsmall: log(max(beta_tilde, 1e-20)).

        Index 0 adds no noise (the last step is noiseless), so a one-step schedule, which has no
        beta_tilde[1], takes beta[0] there."""
        if variance == "fixedlarge":
            first = self.beta_tilde[1] if len(self) > 1 else self.betas[0]
            return np.log(np.append(first, self.betas[1:]))
        if variance == "fixedsmall":
            return np.log(np.maximum(self.beta_tilde, 1e-20))
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")

    def step_coefficients(
        self, kind: str = "ddpm", variance: str = "fixedlarge", eta: float = 0.0
    ) -> np.ndarray:
        """The (S, NUM_COEFS) float64 table that `ddpm_step` reads; see the column names above.

        ddpm: the posterior mean with sigma = exp(log_variance / 2).
        ddim: x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z with
        sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev) and eps
        re-derived from x0, which gives the same two linear forms.
        Sigma is 0 at step index 0: no noise is added to the final sample.
        """
        abar, abar_prev = self.abar, self.abar_prev
        _check_abar(abar)
        if kind == "ddpm":
            sigma = np.exp(0.5 * self.log_variance(variance))
        elif kind == "ddim":
            sigma = _ddim_sigma(abar, abar_prev, eta)
        else:
            raise ValueError(f"unknown step kind {kind!r}; choose one of {', '.join(STEP_KINDS)}")
        coef = _step_columns(kind, abar, abar_prev, self.betas, sigma)
        coef[0, SIGMA] = 0.0
        return coef

    def pair_coefficients(
        self,
        timesteps: np.ndarray,
        prev_timesteps: np.ndarray,
        kind: str = "ddpm",
        variance: str = "fixedlarge",
        eta: float = 0.0,
        final_abar: float = 1.0,
    ) -> np.ndarray:
        """The (S, NUM_COEFS) float64 table of the steps t_i -> prev_t_i of this full schedule, row i
        for step index i, as diffusers' DDPMScheduler and DDIMScheduler compute them.

        timesteps, prev_timesteps: (S,) ints (`diffusers_timesteps`, `previous_timesteps`). Each step
        takes abar_prev = abar[prev_t], or `final_abar` where prev_t < 0 (DDPMScheduler: 1;
        DDIMScheduler: final_alpha_cumprod), and its own beta = 1 - abar_t / abar_prev.
        ddpm: the posterior mean; variance fixedsmall: max(beta_tilde, 1e-20) with
        beta_tilde = (1 - abar_prev) / (1 - abar_t) beta, fixedlarge: beta; sigma = sqrt(variance)
        at every t > 0 and 0 at t = 0 (DDPMScheduler adds noise where t > 0, so a last step at
        t > 0 adds some).
        ddim: eps re-derived from the clipped x0 (use_clipped_model_output=True) and
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)) at every step.
        """
        if len(self.timesteps) != len(self) or not np.array_equal(self.timesteps, np.arange(len(self))):
            raise ValueError("pair_coefficients needs the full schedule, not a respaced one")
        t = np.asarray(timesteps, dtype=np.int64)
        prev = np.asarray(prev_timesteps, dtype=np.int64)
        if t.ndim != 1 or t.shape != prev.shape or not len(t):
            raise ValueError("timesteps and prev_timesteps must be non-empty 1-D arrays of one length")
        if t.min() < 0 or t.max() >= len(self) or np.any(prev >= t):
            raise ValueError(f"each step needs 0 <= prev_t < t < {len(self)} (prev_t < 0: the final abar)")
        if not 0.0 < final_abar <= 1.0:
            raise ValueError(f"final_abar must be in (0, 1], got {final_abar}")
        abar = self.abar[t]
        _check_abar(abar)
        abar_prev = np.where(prev >= 0, self.abar[np.maximum(prev, 0)], final_abar)
        betas = 1.0 - abar / abar_prev
        if kind == "ddpm":
            if variance == "fixedlarge":
                sigma = np.sqrt(betas)
            elif variance == "fixedsmall":
                sigma = np.sqrt(np.maximum((1.0 - abar_prev) / (1.0 - abar) * betas, 1e-20))
            else:
                raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
            sigma = np.where(t > 0, sigma, 0.0)
        elif kind == "ddim":
            sigma = _ddim_sigma(abar, abar_prev, eta)
        else:
            raise ValueError(f"unknown step kind {kind!r}; choose one of {', '.join(STEP_KINDS)}")
        return _step_columns(kind, abar, abar_prev, betas, sigma)

    def step_table(
        self,
        kind: str = "ddpm",
        variance: str = "fixedlarge",
        eta: float = 0.0,
        device: torch.device | str = "cpu",
    ) -> StepTable:
        return StepTable.from_float64(
            self.step_coefficients(kind, variance, eta), self.timesteps, device=device
        )


@dataclass(frozen=True)
class StepTable:
    """The reverse-step coefficients as device tensors, cast once from float64.

    coef: (S, NUM_COEFS) float32, row i for step index i.
    timesteps: (S,) int64, the original t the network receives at step index i.
    stochastic: whether any step adds noise (False for DDIM with eta = 0).
    final_draw: whether the last step (i = 0) draws z from a torch.Generator too. diffusers'
    schedulers do where its t > 0 (DDPM) or eta > 0 (DDIM), so the draws stay in their order;
    Improved DDPM's tables add no noise there and draw none.
    """

    coef: torch.Tensor
    timesteps: torch.Tensor
    stochastic: bool
    final_draw: bool = False

    @classmethod
    def from_float64(
        cls,
        coef: np.ndarray,
        timesteps: np.ndarray,
        final_draw: bool = False,
        device: torch.device | str = "cpu",
    ) -> StepTable:
        """The table of float64 coef (S, NUM_COEFS) and timesteps (S,), cast once onto `device`."""
        return cls(
            coef=torch.tensor(coef, dtype=torch.float32, device=device),
            timesteps=torch.tensor(timesteps, dtype=torch.long, device=device),
            stochastic=bool(np.any(coef[:, SIGMA] > 0)),
            final_draw=final_draw,
        )

    def __len__(self) -> int:
        return self.coef.shape[0]

    def to(self, device: torch.device | str) -> StepTable:
        return replace(self, coef=self.coef.to(device), timesteps=self.timesteps.to(device))

    def head(self, n: int) -> StepTable:
        """Step indices 0..n-1: the chain's tail from step n-1."""
        return replace(self, coef=self.coef[:n], timesteps=self.timesteps[:n])


# --- diffusers' timestep spacing ----------------------------------------------------------------
# "improved" is the Improved-DDPM rule of `space_timesteps` (`Schedule.respace`); the others are
# diffusers' `timestep_spacing` (`diffusers_timesteps`), whose steps `diffusers_step_table` builds.
SPACINGS = ("improved", "leading", "trailing", "linspace")
DIFFUSERS_SPACINGS = SPACINGS[1:]


def diffusers_timesteps(
    num_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
    """The timesteps DDPMScheduler and DDIMScheduler visit after `set_timesteps(steps)`, (S,) int64
    in step-index order (row i is step index i: `scheduler.timesteps` reversed).

    With T = num_timesteps and k = 0..S-1: leading: k (T // S) + steps_offset; trailing:
    round(T - k T / S) - 1; linspace: round(k (T - 1) / (S - 1)). diffusers adds steps_offset in
    leading spacing only. ValueError for a timestep outside [0, T).
    """
    T, S = num_timesteps, steps
    if spacing not in DIFFUSERS_SPACINGS:
        raise ValueError(
            f"unknown timestep spacing {spacing!r}; choose one of {', '.join(DIFFUSERS_SPACINGS)}"
        )
    for name, value, low in (("num_timesteps", T, 1), ("steps", S, 1), ("steps_offset", steps_offset, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if S > T:
        raise ValueError(f"cannot take {S} steps out of {T}")
    if spacing == "leading":
        t = np.arange(S) * (T // S) + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / S))[::-1] - 1
    else:
        t = np.linspace(0, T - 1, S).round()
    t = t.astype(np.int64)
    if len(t) != S or t[0] < 0 or t[-1] >= T:
        raise ValueError(
            f"{spacing} spacing of {S} steps with steps_offset {steps_offset} leaves [0, {T}):"
            f" timesteps {t[0]}..{t[-1]}"
        )
    return t


def previous_timesteps(timesteps: np.ndarray, kind: str, num_timesteps: int) -> np.ndarray:
    """Each step's prev_t as diffusers' step computes it, (S,) int64 in step-index order; negative:
    past t = 0 (the scheduler's final abar).

    ddpm (DDPMScheduler.previous_timestep): the next timestep visited, timesteps[i - 1], and -1 at
    i = 0. ddim (DDIMScheduler.step): t - T // S, which in trailing and linspace spacing need not
    be a visited timestep.
    """
    t = np.asarray(timesteps, dtype=np.int64)
    if kind == "ddpm":
        return np.append(-1, t[:-1])
    if kind == "ddim":
        return t - num_timesteps // len(t)
    raise ValueError(f"unknown step kind {kind!r}; choose one of {', '.join(STEP_KINDS)}")


def diffusers_step_table(
    schedule: Schedule,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    kind: str = "ddpm",
    variance: str = "fixedlarge",
    eta: float = 0.0,
    set_alpha_to_one: bool = True,
    device: torch.device | str = "cpu",
) -> StepTable:
    """The table of `steps` steps of the full `schedule` as diffusers' DDPMScheduler (kind ddpm) or
    DDIMScheduler (kind ddim, with use_clipped_model_output=True) runs them after set_timesteps,
    with that scheduler's `timestep_spacing` and `steps_offset` (`diffusers_timesteps`),
    `variance_type` (ddpm) and `eta` and `set_alpha_to_one` (ddim: the final abar is 1, else
    abar_0; `Schedule.pair_coefficients`), on `device`."""
    coef, timesteps, final_draw = diffusers_step_coefficients(
        schedule, steps, spacing, steps_offset, kind, variance, eta, set_alpha_to_one
    )
    return StepTable.from_float64(coef, timesteps, final_draw, device)


def diffusers_step_coefficients(
    schedule: Schedule,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    kind: str = "ddpm",
    variance: str = "fixedlarge",
    eta: float = 0.0,
    set_alpha_to_one: bool = True,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """`diffusers_step_table`'s float64 coefficients (S, NUM_COEFS), timesteps (S,) and final_draw."""
    timesteps = diffusers_timesteps(len(schedule), steps, spacing, steps_offset)
    prev = previous_timesteps(timesteps, kind, len(schedule))
    final_abar = 1.0 if kind == "ddpm" or set_alpha_to_one else float(schedule.abar[0])
    coef = schedule.pair_coefficients(timesteps, prev, kind, variance, eta, final_abar)
    stochastic = bool(np.any(coef[:, SIGMA] > 0))
    return coef, timesteps, stochastic and bool(timesteps[0] > 0 if kind == "ddpm" else eta > 0)


# --- The diffusion a model was trained with, and the step table a sampler runs -----------------

METHODS = STEP_KINDS  # the sampling methods: ancestral (and respaced) DDPM, and DDIM
# A respacing string: "ddim50", or section counts "10,20,30" (space_timesteps).
SPACING = re.compile(r"ddim[1-9][0-9]*|[1-9][0-9]*(,[1-9][0-9]*)*")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and how to sample it: beta schedule, variance, clipping, spacing."""

    beta_schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: str = "fixedlarge"
    clip_x0: bool = True
    # Which timesteps a respaced sampler visits (SPACINGS): "improved" (Improved DDPM's rule, the
    # default of fastddpm's own checkpoints) or diffusers' timestep_spacing with its steps_offset
    # (a diffusers folder's scheduler config); set_alpha_to_one: the final abar of DDIM and PNDM is
    # 1, else abar_0; None (a config without the key): each scheduler's default, DDIM's True and
    # PNDM's False.
    spacing: str = "improved"
    steps_offset: int = 0
    set_alpha_to_one: bool | None = None

    def __post_init__(self) -> None:
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; choose one of {', '.join(VARIANCES)}")
        config_schema.check_diffusion(asdict(self), "DiffusionConfig")  # types and ranges, as loaders
        self.schedule()  # rejects an unknown schedule name now, not at sampling time

    def schedule(self) -> Schedule:
        return Schedule.from_name(self.beta_schedule, self.num_timesteps, self.beta_start, self.beta_end)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown diffusion config keys: {sorted(unknown)}")
        return cls(**d)


def check_steps(steps: object) -> int | str | None:
    """`steps` as Sampler.sample takes it: None, a positive int, or a spacing string; else a ValueError."""
    if steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        return steps
    if isinstance(steps, str) and SPACING.fullmatch(steps):
        return int(steps) if steps.isdigit() else steps
    raise ValueError(
        f"steps must be None (all T), a positive int, or a spacing like '10,20' or 'ddim50', got {steps!r}"
    )


def check_eta(eta: object, method: str) -> float:
    """DDIM's eta: a finite number >= 0, and nonzero only with method 'ddim'; else a ValueError."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if eta != 0 and method != "ddim":
        raise ValueError(f"eta applies to method 'ddim' (--sampler ddim), not {method!r}; got eta={eta}")
    return float(eta)


def step_table(
    diffusion: DiffusionConfig,
    steps: int | str | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
    variance: str | None = None,
    device: torch.device | str = "cpu",
) -> StepTable:
    """The table a sampler runs for `diffusion`: all T steps (steps None or T) or respaced to
    `steps`, by `method` ("ddpm" or "ddim" with `eta`), with `variance` (None: the config's), on
    `device`. An int S respaces by the config's spacing: Improved DDPM's rule, or diffusers'
    scheduler's (`diffusers_step_table`); a string ("10,20", "ddim50") is always Improved DDPM's.
    ValueError naming a bad argument."""
    return StepTable.from_float64(*step_coefficients(diffusion, steps, method, eta, variance), device)


def step_coefficients(
    diffusion: DiffusionConfig,
    steps: int | str | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
    variance: str | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """`step_table`'s float64 coefficients (S, NUM_COEFS), timesteps (S,) and final_draw."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    steps = check_steps(steps)
    eta = check_eta(eta, method)
    variance = variance or diffusion.variance
    schedule = diffusion.schedule()
    if isinstance(steps, int) and steps != len(schedule) and diffusion.spacing in DIFFUSERS_SPACINGS:
        return diffusers_step_coefficients(
            schedule, steps, diffusion.spacing, diffusion.steps_offset, method, variance, eta,
            diffusion.set_alpha_to_one is not False,
        )  # fmt: skip
    if steps is not None and steps != len(schedule):
        schedule = schedule.respace(steps)
    return schedule.step_coefficients(method, variance, eta), schedule.timesteps, False
