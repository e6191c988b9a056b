"""The table a few-step solver runs: each step an elementwise linear map, cast once from float64.

Every solver fastddpm offers (DPM-Solver++, UniPC, PNDM, Euler; fastddpm.solvers builds them)
takes a step as a linear combination of the sample x (the network's input point), the network's
eps, the step's x0 prediction D, the noise z and values kept from earlier steps ("history
slots"). Row i of `weights` (step index i, as in StepTable) holds four rows over the columns
[x, eps, D, z, slot_0 .. slot_{M-1}]:

    D      = clamp?(W[0, x] x + W[0, eps] eps)   (its other weights are 0; clamped with clip_x0)
    keep_a = W[1] . inputs  -> slot dest[i, 0]   (dest -1: not kept)
    keep_b = W[2] . inputs  -> slot dest[i, 1]
    x_next = W[3] . inputs

all from the inputs as they were before the step wrote anything. Before the network sees x it is
multiplied by `input_scale[i]` (Euler's 1 / sqrt(sigma^2 + 1); 1 elsewhere), and x_T by
`init_scale` (Euler's init_noise_sigma).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

# Columns of a weights row.
COL_X, COL_EPS, COL_D, COL_Z = 0, 1, 2, 3
NUM_INPUTS = 4  # slot k is column NUM_INPUTS + k
# Rows of a step's weights.
ROW_D, ROW_KEEP_A, ROW_KEEP_B, ROW_X = 0, 1, 2, 3
NUM_ROWS = 4


@dataclass(frozen=True)
class SolverTable:
    """A solver's steps as device tensors, row i for step index i (the loop runs i = S-1 .. 0).

    weights: (S, NUM_ROWS, NUM_INPUTS + M) float32; dest: (S, 2) int64 slot indices, -1 for none;
    timesteps: (S,) the t the network receives, int64 (float32 where a solver visits fractional
    timesteps, as Euler's linspace spacing does); input_scale: (S,) float32; init_scale: x_T's
    factor; num_slots: M; stochastic: whether any step adds noise; final_draw: whether the last
    step draws z from a torch.Generator too (BatchNoise); name: the solver's name.
    """

    name: str
    weights: torch.Tensor
    dest: torch.Tensor
    timesteps: torch.Tensor
    input_scale: torch.Tensor
    init_scale: float
    stochastic: bool
    final_draw: bool

    @classmethod
    def from_float64(
        cls,
        name: str,
        weights: np.ndarray,
        dest: np.ndarray,
        timesteps: np.ndarray,
        input_scale: np.ndarray,
        init_scale: float,
        final_draw: bool,
        device: torch.device | str = "cpu",
    ) -> SolverTable:
        """The table of float64 weights (S, NUM_ROWS, NUM_INPUTS + M), int dest (S, 2), timesteps
        (S,) and input_scale (S,), cast once onto `device`."""
        S = len(timesteps)
        if weights.ndim != 3 or weights.shape[:2] != (S, NUM_ROWS) or weights.shape[2] < NUM_INPUTS:
            raise ValueError(f"weights must be ({S}, {NUM_ROWS}, >= {NUM_INPUTS}), got {weights.shape}")
        if dest.shape != (S, 2) or input_scale.shape != (S,):
            raise ValueError(f"dest must be ({S}, 2) and input_scale ({S},)")
        if not np.all(np.isfinite(weights)):
            raise ValueError(f"the {name} table has non-finite weights")
        if np.any(np.delete(weights[:, ROW_D], [COL_X, COL_EPS], axis=1)):
            raise ValueError(f"the {name} table's D rows weigh more than x and eps")
        M = weights.shape[2] - NUM_INPUTS
        if np.any((dest < -1) | (dest >= M)) or np.any((dest[:, 0] == dest[:, 1]) & (dest[:, 0] >= 0)):
            raise ValueError(f"the {name} table's dest must be distinct slots in [0, {M}) or -1")
        fractional = not np.array_equal(timesteps, np.round(timesteps))
        return cls(
            name=name,
            weights=torch.tensor(weights, dtype=torch.float32, device=device),
            dest=torch.tensor(dest, dtype=torch.int64, device=device),
            timesteps=torch.tensor(
                timesteps, dtype=torch.float32 if fractional else torch.int64, device=device
            ),
            input_scale=torch.tensor(input_scale, dtype=torch.float32, device=device),
            init_scale=float(init_scale),
            stochastic=bool(np.any(weights[:, :, COL_Z] != 0)),
            final_draw=final_draw,
        )

    def __len__(self) -> int:
        return self.weights.shape[0]

    @property
    def num_slots(self) -> int:
        return self.weights.shape[2] - NUM_INPUTS

    def head(self, n: int) -> SolverTable:
        """Step indices 0..n-1: the chain's tail from step n-1, starting from an x_t of the
        variance-preserving form (scaled by 1 / input_scale[n - 1] into the solver's). A solver
        that keeps history (num_slots > 0) has no tail: ValueError."""
        if self.num_slots:
            raise ValueError(
                f"start_step: the {self.name} solver keeps history, so it starts at its first step only"
            )
        rows = slice(n)
        return replace(
            self,
            weights=self.weights[rows],
            dest=self.dest[rows],
            timesteps=self.timesteps[rows],
            input_scale=self.input_scale[rows],
            init_scale=1.0 / float(self.input_scale[n - 1]),
        )

    def to(self, device: torch.device | str) -> SolverTable:
        return replace(
            self,
            weights=self.weights.to(device),
            dest=self.dest.to(device),
            timesteps=self.timesteps.to(device),
            input_scale=self.input_scale.to(device),
        )
