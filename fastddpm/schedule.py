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
from dataclasses import asdict, dataclass

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
        if abar[-1] == 0.0:
            raise ValueError(
                "this schedule ends with beta_T = 1 (abar_T = 0, as jsd does): x0 cannot be predicted"
                " from eps at t = T, so the reverse step is undefined"
            )
        coef = np.zeros((len(self), NUM_COEFS), dtype=np.float64)
        coef[:, SQRT_RECIP_ABAR] = self.sqrt_recip_abar
        coef[:, SQRT_RECIPM1_ABAR] = self.sqrt_recipm1_abar
        if kind == "ddpm":
            sigma = np.exp(0.5 * self.log_variance(variance))
            coef[:, COEF_X0] = self.posterior_mean_coef1
            coef[:, COEF_XT] = self.posterior_mean_coef2
            coef[:, DIRECT_XT] = 1.0 / np.sqrt(self.alphas)
            coef[:, DIRECT_EPS] = self.betas / (np.sqrt(self.alphas) * np.sqrt(1.0 - abar))
        elif kind == "ddim":
            if eta < 0:
                raise ValueError(f"DDIM eta must be >= 0, got {eta}")
            sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
            dir_xt = np.sqrt(np.maximum(1 - abar_prev - sigma**2, 0.0))
            coef[:, COEF_X0] = np.sqrt(abar_prev) - dir_xt * np.sqrt(abar) / np.sqrt(1 - abar)
            coef[:, COEF_XT] = dir_xt / np.sqrt(1 - abar)
            coef[:, DIRECT_XT] = np.sqrt(abar_prev / abar)
            coef[:, DIRECT_EPS] = np.sqrt(abar_prev) * self.sqrt_recipm1_abar - dir_xt
        else:
            raise ValueError(f"unknown step kind {kind!r}; choose one of {', '.join(STEP_KINDS)}")
        coef[:, SIGMA] = sigma
        coef[0, SIGMA] = 0.0
        return coef

    def step_table(
        self,
        kind: str = "ddpm",
        variance: str = "fixedlarge",
        eta: float = 0.0,
        device: torch.device | str = "cpu",
    ) -> StepTable:
        coef = self.step_coefficients(kind, variance, eta)
        return StepTable(
            coef=torch.tensor(coef, dtype=torch.float32, device=device),
            timesteps=torch.tensor(self.timesteps, dtype=torch.long, device=device),
            stochastic=bool(np.any(coef[:, SIGMA] > 0)),
        )


@dataclass(frozen=True)
class StepTable:
    """The reverse-step coefficients as device tensors, cast once from float64.

    coef: (S, NUM_COEFS) float32, row i for step index i.
    timesteps: (S,) int64, the original t the network receives at step index i.
    stochastic: whether any step adds noise (False for DDIM with eta = 0).
    """

    coef: torch.Tensor
    timesteps: torch.Tensor
    stochastic: bool

    def __len__(self) -> int:
        return self.coef.shape[0]

    def to(self, device: torch.device | str) -> StepTable:
        return StepTable(self.coef.to(device), self.timesteps.to(device), self.stochastic)


# --- The diffusion a model was trained with, and the step table a sampler runs -----------------

METHODS = STEP_KINDS  # the sampling methods: ancestral (and respaced) DDPM, and DDIM
# A respacing string: "ddim50", or section counts "10,20,30" (space_timesteps).
SPACING = re.compile(r"ddim[1-9][0-9]*|[1-9][0-9]*(,[1-9][0-9]*)*")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and how to sample it: beta schedule, variance, clipping."""

    beta_schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: str = "fixedlarge"
    clip_x0: bool = True

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
    """The table a sampler runs for `diffusion`: all T steps (steps None) or respaced to `steps` (an
    int S or a spacing string), by `method` ("ddpm" or "ddim" with `eta`), with `variance` (None:
    the config's), on `device`. ValueError naming a bad argument."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    steps = check_steps(steps)
    eta = check_eta(eta, method)
    schedule = diffusion.schedule()
    if steps is not None and steps != len(schedule):
        schedule = schedule.respace(steps)
    return schedule.step_table(method, variance or diffusion.variance, eta, device=device)
