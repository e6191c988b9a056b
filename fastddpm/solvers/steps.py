"""The step strategy of a SolverTable (fastddpm.loop.StepStrategy): each step calls the network on
input_scale[i] x at timesteps[i], then the solver's fused update (ops.multistep_update, on the
denoiser's backend) with the run's history slots (zeros at the start). Eager: the CUDA graph
runner (fastddpm.graphs) captures the DDPM step only so far."""

from __future__ import annotations

import torch

from .. import ops
from ..loop import Denoiser, EagerSteps, StepRun
from ..noise import BatchNoise
from ..schedule import StepTable
from ..solver_table import SolverTable


class SolverSteps:
    """Runs the steps of a SolverTable with `denoiser`."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser

    def start(self, x_T: torch.Tensor, table: SolverTable, clip_x0: bool, noise: BatchNoise) -> _SolverRun:
        # A TorchDenoiser (which has the torch module) embeds any real t; ONNX and TensorRT graphs
        # take int64 timesteps.
        if table.timesteps.dtype.is_floating_point and not hasattr(self.denoiser, "module"):
            raise ValueError(
                f"the {table.name} solver visits fractional timesteps here, which only a torch network"
                " takes; choose --spacing leading or trailing"
            )
        return _SolverRun(self.denoiser, x_T, table, clip_x0, noise)


class _SolverRun:
    """One batch's solver steps: x (N, C, H, W) float32 in the solver's parameterization (x_T times
    init_scale), and the history slots (M, N, C, H, W)."""

    def __init__(
        self, denoiser: Denoiser, x_T: torch.Tensor, table: SolverTable, clip_x0: bool, noise: BatchNoise
    ) -> None:
        self.denoiser, self.table, self.clip_x0, self.noise = denoiser, table, clip_x0, noise
        self.x = x_T * table.init_scale
        self.history = x_T.new_zeros((table.num_slots, *x_T.shape))

    def step(self, i: int) -> torch.Tensor:
        x, table = self.x, self.table
        eps = self.denoiser(x * table.input_scale[i], table.timesteps[i].expand(x.shape[0]))
        eps = eps.contiguous()  # a channels_last network's eps: the update runs on flat tensors
        noise = self.noise.step(i, x) if table.stochastic else {}
        self.x = ops.multistep_update(
            x, eps, self.history, i, table, clip_x0=self.clip_x0, backend=self.denoiser.backend, **noise
        )
        return eps


class Eager:
    """Eager steps of either kind of table: EagerSteps for a StepTable, SolverSteps for a
    SolverTable (the Sampler's strategy without CUDA graphs, and the graph runner's fallback)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.ddpm, self.solver = EagerSteps(denoiser), SolverSteps(denoiser)

    def start(
        self, x_T: torch.Tensor, table: StepTable | SolverTable, clip_x0: bool, noise: BatchNoise
    ) -> StepRun:
        strategy = self.solver if isinstance(table, SolverTable) else self.ddpm
        return strategy.start(x_T, table, clip_x0, noise)
