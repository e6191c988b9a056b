"""Step tables for the ddpm_step tests."""

import functools

import torch

from fastddpm.schedule import NUM_COEFS, SIGMA, Schedule, StepTable

TABLES = {  # name: the table, from the CIFAR10 schedule (linear betas, T = 1000)
    "fixedlarge": lambda s: s.step_table("ddpm", "fixedlarge"),
    "fixedsmall": lambda s: s.step_table("ddpm", "fixedsmall"),
    "ddim": lambda s: s.respace("ddim50").step_table("ddim", eta=0.0),
    "ddim_eta1": lambda s: s.respace("ddim50").step_table("ddim", eta=1.0),
    "ddpm100": lambda s: s.respace(100).step_table("ddpm"),  # respaced to 100 steps
    "ddim100": lambda s: s.respace(100).step_table("ddim", eta=0.5),
    "ddim100_eta0": lambda s: s.respace(100).step_table("ddim", eta=0.0),  # adds no noise
}


@functools.cache
def table(name: str, device: torch.device) -> StepTable:
    return TABLES[name](Schedule.from_name()).to(device)


def identity_noise_table(device: torch.device) -> StepTable:
    """A one-row table with mean 0 and sigma 1: the step of x_t = eps = 0 returns z itself."""
    coef = torch.zeros(1, NUM_COEFS)
    coef[0, SIGMA] = 1.0
    return StepTable(coef=coef.to(device), timesteps=torch.zeros(1, dtype=torch.long), stochastic=True)
