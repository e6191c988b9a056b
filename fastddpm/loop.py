"""The reverse loop, one for every sampler (Algorithm 2 over a step table):

    x_T ~ N(0, I);  for i = S-1 .. 0:  x <- step i (eps = eps_theta(x, timesteps[i]), then the update)

`sample` owns what every sampler shares: the argument checks, batching, drawing x_T
(fastddpm.noise), the progress bar, the callbacks and the finite check. A `StepStrategy` owns how
a step runs: `EagerSteps` (the `Denoiser`, then fastddpm.ops.ddpm_step), the CUDA graph runner
(fastddpm.graphs), an ONNX step graph (fastddpm.ort) and a TensorRT engine (fastddpm.trt). A
strategy is told x_T, the table, clip_x0 and the batch's noise (`start`) and returns a `StepRun`,
which the loop advances one step at a time. The few-step solvers (fastddpm.solvers) are
SolverTables (fastddpm.solver_table) run by SolverSteps or the graph runner; their history slots
live in the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from tqdm.auto import tqdm

from . import ops
from .noise import BatchNoise
from .reference import predict_x0, solver_x0
from .schedule import StepTable
from .solver_table import SolverTable
from .unet import UNetConfig

# callback(step_index, t, x_t, x0_pred): x_t (as the sampler holds it: a solver's own parameterization)
# and x0_pred are float32 (N, C, H, W); t is the network's timestep (a float where it is fractional).
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class NonFiniteSamplesError(ValueError):
    """A batch of samples holds NaN or Inf: the model or the schedule is broken."""


class Denoiser(Protocol):
    """eps_theta, as every sampler runs it: the U-Net (through fastddpm.sampler.TorchDenoiser),
    fastddpm.ort.OnnxDenoiser, fastddpm.trt.TensorRTDenoiser. Called on x_t (N, C, H, W) float32
    on `device` and t (N,) int64 timesteps, it returns eps float32 (N, C, H, W). `config` gives
    the image shape (in_channels, resolution); `backend` is the fastddpm.ops backend of the reverse
    step between calls; `dtype` the network's input dtype."""

    @property
    def config(self) -> UNetConfig: ...

    @property
    def backend(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class StepRun(Protocol):
    """One batch's reverse process under a strategy. `x` is x_t after the steps run so far, float32
    (N, C, H, W) (it may be a buffer the next step overwrites)."""

    x: torch.Tensor

    def step(self, i: int) -> torch.Tensor | None:
        """Step index i: x_t -> x_{t-1}. Returns the step's eps (N, C, H, W), or None for a strategy
        whose step does not expose it (an ONNX step graph, which takes no callback)."""
        ...


class StepStrategy(Protocol):
    """How the steps of a batch run; the loop starts one run per batch, one batch at a time."""

    def start(
        self, x_T: torch.Tensor, table: StepTable | SolverTable, clip_x0: bool, noise: BatchNoise
    ) -> StepRun:
        """A run of every step of `table` from x_T (N, C, H, W) float32, drawing from `noise`
        (a SolverTable's strategy is fastddpm.solvers.steps.SolverSteps)."""
        ...


class EagerSteps:
    """Each step as it reads: eps = denoiser(x_t, t), then ops.ddpm_step on the denoiser's backend."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser

    def start(self, x_T: torch.Tensor, table: StepTable, clip_x0: bool, noise: BatchNoise) -> _EagerRun:
        return _EagerRun(self.denoiser, x_T, table, clip_x0, noise)


class _EagerRun:
    """One batch's eager steps: x is replaced by each step's result."""

    def __init__(
        self, denoiser: Denoiser, x_T: torch.Tensor, table: StepTable, clip_x0: bool, noise: BatchNoise
    ) -> None:
        self.denoiser, self.x, self.table, self.clip_x0, self.noise = denoiser, x_T, table, clip_x0, noise

    def step(self, i: int) -> torch.Tensor:
        x, table = self.x, self.table
        eps = self.denoiser(x, table.timesteps[i].expand(x.shape[0]))
        noise = self.noise.step(i, x) if table.stochastic else {}
        self.x = ops.ddpm_step(x, eps, i, table, clip_x0=self.clip_x0, backend=self.denoiser.backend, **noise)
        return eps


def check_count(name: str, value: object) -> int:
    """A positive int (not a bool), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@torch.no_grad()
def sample(
    strategy: StepStrategy,
    table: StepTable | SolverTable,
    n: int,
    image_shape: tuple[int, int, int],
    device: torch.device,
    *,
    clip_x0: bool,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    x_T: torch.Tensor | None = None,
    start_step: int | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
    callback_every: int = 100,
    scope: Callable[[torch.device], AbstractContextManager] = lambda device: contextlib.nullcontext(),
) -> torch.Tensor:
    """n samples float32 (n, *image_shape) on `device`: batches of `batch_size` (default n), each
    run through every step of `table`, i = S-1 .. 0, by `strategy` inside `scope(device)`.

    Noise from `generator` or Philox `seed` (fastddpm.noise), not both. x_T: the starting noise
    (n, *image_shape), else drawn from that source. start_step: the step index to start at (default
    S-1); it needs x_T, the x_t at that step. callback(i, t, x_t, x0_pred) runs after step i when
    i % callback_every == 0, with x_t as it was before the step and x0_pred from it and the step's
    eps. Raises NonFiniteSamplesError for a batch holding NaN or Inf.
    """
    check_count("n", n)
    batch_size = n if batch_size is None else check_count("batch_size", batch_size)
    check_count("callback_every", callback_every)
    if seed is not None:
        if generator is not None:
            raise ValueError("pass at most one of generator= and seed=")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if start_step is not None:
        if x_T is None:
            raise ValueError("start_step needs x_T: the x_t to start the reverse process from")
        S = len(table)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < S:
            raise ValueError(f"start_step must be an int in [0, {S - 1}], got {start_step!r}")
        # Steps start_step..0 keep their rows: the loop over the shortened table is the chain's tail.
        table = table.head(start_step + 1)
    x0_of = solver_x0 if isinstance(table, SolverTable) else predict_x0
    shape = (n, *image_shape)
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")

    out = []
    with tqdm(total=len(table) * -(-n // batch_size), disable=not progress, unit="step") as bar:
        for b, start in enumerate(range(0, n, batch_size)):
            size = min(batch_size, n - start)
            noise = BatchNoise(len(table), generator, seed, b, table.final_draw)
            if x_T is not None:
                x = x_T[start : start + size].to(device, torch.float32)
            else:
                x = noise.x_T((size, *image_shape), device)
            with scope(device):
                run = strategy.start(x, table, clip_x0, noise)
                for i in reversed(range(len(table))):
                    due = callback is not None and i % callback_every == 0
                    x_t = run.x.clone() if due else None  # as it was before the step
                    eps = run.step(i)
                    if due:
                        callback(i, table.timesteps[i].item(), x_t, x0_of(x_t, eps, i, table, clip_x0))
                    bar.update(1)
                x0 = run.x.clone()  # the run's buffer may be the next batch's
            _check_finite(x0, b, start)
            out.append(x0)
    return torch.cat(out)


def _check_finite(x0: torch.Tensor, b: int, start: int) -> None:
    """Raise NonFiniteSamplesError if batch b's samples x0 (k, C, H, W), images start.., hold NaN or Inf:
    one reduction and one host sync per batch."""
    if not bool(torch.isfinite(x0).all()):
        kind = "NaN" if bool(torch.isnan(x0).any()) else "Inf"
        raise NonFiniteSamplesError(
            f"batch {b} (images {start}..{start + x0.shape[0] - 1}) produced non-finite values ({kind});"
            " the model or the schedule is broken"
        )
