"""The few-step solvers for eps-prediction DDPM models, each equal to a diffusers scheduler's steps.

| name          | diffusers scheduler (its defaults, with the options below)                  |
|---------------|------------------------------------------------------------------------------|
| dpmpp-2m      | DPMSolverMultistepScheduler, solver_order=2                                  |
| dpmpp-3m      | DPMSolverMultistepScheduler, solver_order=3                                  |
| dpmpp-2m-sde  | DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=2 |
| unipc         | UniPCMultistepScheduler (solver_type="bh2", solver_order=2)                  |
| unipc-bh1     | UniPCMultistepScheduler, solver_type="bh1"                                   |
| pndm          | PNDMScheduler (PRK warm-up, then PLMS)                                       |
| euler         | EulerDiscreteScheduler                                                       |
| euler-a       | EulerAncestralDiscreteScheduler                                              |

`solver_table` builds a solver's SolverTable (fastddpm.solver_table) for a DiffusionConfig: the
config's timestep_spacing and steps_offset (a diffusers folder's scheduler config, as
`Scheduler.from_config(pipe.scheduler.config)` takes them), or the scheduler's own default spacing
where the config has Improved DDPM's ("improved", fastddpm's own checkpoints). PNDM's final abar
follows the config's set_alpha_to_one (None, a config without the key: PNDMScheduler's False).
The solvers do not clip x0 (diffusers' do not, without thresholding), unless asked to.
`SolverSteps` (fastddpm.solvers.steps) runs a table.
"""

from __future__ import annotations

import numpy as np
import torch

from ..schedule import DiffusionConfig
from ..solver_table import SolverTable
from . import dpmsolver, euler, pndm, unipc
from .linear import build
from .timesteps import euler_timesteps, multistep_timesteps, pndm_timesteps, sigmas_at

# name -> (family, options, the scheduler's default timestep_spacing)
_SOLVERS = {
    "dpmpp-2m": ("dpmsolver", {"order": 2, "sde": False}, "linspace"),
    "dpmpp-3m": ("dpmsolver", {"order": 3, "sde": False}, "linspace"),
    "dpmpp-2m-sde": ("dpmsolver", {"order": 2, "sde": True}, "linspace"),
    "unipc": ("unipc", {"order": 2, "solver_type": "bh2"}, "linspace"),
    "unipc-bh1": ("unipc", {"order": 2, "solver_type": "bh1"}, "linspace"),
    "pndm": ("pndm", {}, "leading"),
    "euler": ("euler", {"ancestral": False}, "linspace"),
    "euler-a": ("euler", {"ancestral": True}, "linspace"),
}
SOLVERS = tuple(_SOLVERS)


def check_solver_steps(name: str, steps: object) -> int:
    """A solver's steps: an int (its scheduler's set_timesteps(steps)); else a ValueError."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"the {name} solver needs steps, an int number of steps; got {steps!r}")
    return steps


def solver_table(
    name: str, diffusion: DiffusionConfig, steps: int, device: torch.device | str = "cpu"
) -> SolverTable:
    """Solver `name`'s table of `steps` steps (its scheduler's set_timesteps(steps)) for `diffusion`."""
    if name not in _SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    check_solver_steps(name, steps)
    family, options, default_spacing = _SOLVERS[name]
    schedule = diffusion.schedule()
    T = len(schedule)
    spacing = default_spacing if diffusion.spacing == "improved" else diffusion.spacing
    offset = diffusion.steps_offset
    if family == "pndm":
        if steps < pndm.PNDM_ORDER:
            raise ValueError(f"the pndm solver needs at least {pndm.PNDM_ORDER} steps, got {steps}")
        timesteps = pndm_timesteps(T, steps, spacing, offset)
        final_abar = 1.0 if diffusion.set_alpha_to_one is True else float(schedule.abar[0])
        return build(name, pndm.program(timesteps, schedule.abar, final_abar), device=device)
    if family == "euler":
        timesteps = euler_timesteps(T, steps, spacing, offset)
        sigmas = _with_final_zero(sigmas_at(schedule, timesteps))
        return build(
            name,
            euler.program(timesteps, sigmas, **options),
            init_scale=euler.init_noise_sigma(sigmas, spacing),
            final_draw=options["ancestral"],
            device=device,
        )
    timesteps = multistep_timesteps(T, steps, spacing, offset)
    if len(np.unique(timesteps)) < len(timesteps):  # diffusers' step divides by zero there
        raise ValueError(
            f"the {name} solver's {spacing} spacing visits a timestep twice at {steps} of {T} steps;"
            " take fewer steps or another spacing"
        )
    sigmas = _with_final_zero(sigmas_at(schedule, timesteps))
    solver = dpmsolver if family == "dpmsolver" else unipc
    program = solver.program(timesteps, sigmas, **options)
    return build(name, program, final_draw=options.get("sde", False), device=device)


def _with_final_zero(sigmas: np.ndarray) -> np.ndarray:
    """The noise levels (S + 1,) of S steps: final_sigmas_type "zero"."""
    return np.append(sigmas, 0.0)
