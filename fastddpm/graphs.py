"""The graph runner: on CUDA, one whole reverse step captured as a CUDA graph, replayed S times.

A DDPM sample is S calls of the same network. At small batch the GPU waits on the host launching
the U-Net's hundreds of kernels; a CUDA graph launches them all with one call. `GraphRunner`,
a step strategy of the reverse loop (fastddpm.loop), captures one step

    t = timesteps[i];  eps = predict_eps(x, t)
    x <- ddpm_step(x, eps, i, seed, offset = base + i);  i <- i - 1

or, for a few-step solver's table (fastddpm.solver_table), eps = predict_eps(input_scale[i] x, t)
and x <- multistep_update(x, eps, history, i, ...) with the history slots a static buffer too,

where x (N, C, H, W) float32, i, seed and base are static device buffers, and replays it for
every step: per step the host does one `graph.replay()` and nothing else. The step index i
lives on the device and the graph itself decrements it; the network's timestep is gathered on
the device from the runner's copy of `table.timesteps`; the fused `ops.ddpm_step` reads its
table row at i, and draws z in the kernel from Philox with the seed and the offset read from
device scalars (`ops.ddpm_step` takes them as 0-d int64 tensors). Before each batch the host
writes x_T into x, S - 1 into i, the seed and the batch's base offset; after the last replay x
holds x_0, which is copied out (the buffer is reused by the next batch).

The noise is the sampler's seeded mode (`Sampler.sample(seed=...)`): step i of batch b draws
at offset `noise.noise_offset(b, S, i)`, the offset the eager loop passes as an int, so a
replayed run gives the eager run's images. A torch.Generator cannot be replayed (each replay
would reuse the captured draws), so steps that draw from one run eagerly; a table whose steps
add no noise (DDIM with eta = 0) needs no seed and is captured whatever its x_T came from.

Capture: a warm-up of two steps on a side stream first (Triton's JIT, cuDNN/cuBLAS handles and
workspaces, the CUDA library's device queries stay out of the graph), then the capture, in
"thread_local" error mode. Graphs are cached by everything a capture bakes in: device, batch
shape, the network's dtype, memory format and parameters (their addresses: a graph reads the
weights where they were at capture, and the tensors the U-Net derives from them, fastddpm.folds,
which each run refreshes in place), the resolved backend, the table's contents (the runner
keeps its own copy: a sampler builds a new table per call), clip_x0, whether the steps draw
noise, the TF32 flags and train/eval mode. The seed is not part of the key (it is a device
scalar), so a sharded run with a seed per shard reuses one graph. At most `max_graphs` are
kept (least recently used first out); all share one memory pool, since they never run at the
same time and every buffer read after a replay is held by its graph.

Callbacks (x0 predictions every k steps): the graph stays whole. The loop copies x_t before a
step that has one and, after the replay, calls callback(i, t, x_t, x0_pred) with x0_pred
computed from that copy and the graph's static eps buffer, outside the graph: the arguments
equal the eager steps'.

Fallback: eager steps (fastddpm.solvers.steps.Eager), with a one-line notice (a warning of the
`fastddpm.graphs` logger, which Python prints to stderr when logging is not configured) once per
cause and runner, where the runner cannot serve: not a CUDA device (silent unless the graph was
requested), steps that draw from a generator, or a capture that failed (that key is then not
tried again).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

import torch

from . import ops
from .loop import Denoiser, StepRun
from .noise import BatchNoise
from .schedule import StepTable
from .solver_table import SolverTable
from .solvers.steps import Eager

WARMUP_STEPS = 2
LOG = logging.getLogger(__name__)


class GraphedStep:
    """One reverse step at a fixed batch on static buffers: x (N, C, H, W) float32, the step index
    i, the seed and the base offset (0-d int64), and eps (N, C, H, W) float32, the step's output.

    A StepRun: `start` writes x_T, i = S - 1, the seed and the base offset; `step` runs the body
    itself until `capture()`, then one replay of its graph. Before a capture the loop therefore
    samples eagerly with exactly the work the graph will hold (which is how the CPU tests check
    that work).
    """

    def __init__(
        self,
        predict_eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        backend: str,
        table: StepTable | SolverTable,
        x_T: torch.Tensor,
        clip_x0: bool,
    ) -> None:
        device = x_T.device
        self.predict_eps, self.backend, self.clip_x0 = predict_eps, backend, clip_x0
        self.seeded = table.stochastic  # steps that add noise draw it in-kernel from (seed, base + i)
        # A graph reads these addresses at every replay: its own copies, alive as long as it is.
        self.table = replace(table, **{name: getattr(table, name).clone() for name in _table_tensors(table)})
        self.solver = isinstance(table, SolverTable)
        # A solver's history slots (M, N, C, H, W), zeroed at each start.
        self.history = x_T.new_zeros((table.num_slots, *x_T.shape)) if self.solver else None
        self.x = x_T.detach().clone()
        self.eps: torch.Tensor | None = None  # set by each step before a capture, then the graph's output
        self.i = torch.full((), len(table) - 1, dtype=torch.int64, device=device)
        self.seed = torch.zeros((), dtype=torch.int64, device=device)
        self.base = torch.zeros((), dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self) -> torch.Tensor:
        """x <- x_{t-1}, i <- i - 1; returns eps. Only device work: it is what the graph holds."""
        t = self.table.timesteps.index_select(0, self.i.view(1)).expand(self.x.shape[0])
        noise = {"seed": self.seed, "offset": self.base + self.i} if self.seeded else {}
        options = {"clip_x0": self.clip_x0, "backend": self.backend, **noise}
        if self.solver:  # the network sees input_scale[i] x; the update writes the history slots
            eps = self.predict_eps(self.x * self.table.input_scale.index_select(0, self.i.view(1)), t)
            eps = eps.contiguous()  # a channels_last network's eps: the update runs on flat tensors
            x_prev = ops.multistep_update(self.x, eps, self.history, self.i, self.table, **options)
        else:
            eps = self.predict_eps(self.x, t)
            x_prev = ops.ddpm_step(self.x, eps, self.i, self.table, **options)
        self.x.copy_(x_prev)
        self.i.sub_(1)
        return eps

    def start(self, x_T: torch.Tensor, seed: int | None, base_offset: int) -> GraphedStep:
        """Ready a run from x_T (N, C, H, W) float32 whose step i draws at offset base_offset + i."""
        if self.solver:
            self.x.copy_(x_T * self.table.init_scale)
            self.history.zero_()
        else:
            self.x.copy_(x_T)
        self.i.fill_(len(self.table) - 1)
        if self.seeded:
            self.seed.fill_(ops.uint64_as_int64(seed))
            self.base.fill_(ops.uint64_as_int64(base_offset))
        return self

    def step(self, i: int) -> torch.Tensor:
        """Step i (the device's own i, which the loop's matches): a replay of the graph once
        captured, else the body. Returns eps, the static buffer once captured."""
        if self.graph is not None:
            with torch.cuda.device(self.x.device):
                self.graph.replay()
        else:
            self.eps = self._step()
        return self.eps

    def capture(self, pool: tuple) -> None:
        """Warm up on a side stream, then capture the step into a CUDA graph using memory `pool`."""
        device = self.x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.i.fill_(len(self.table) - 1)  # a valid step index even for a one-step table
                self._step()
            if self.solver:
                self.history.zero_()  # the warm-up wrote slots that start() zeroes too
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.eps = self._step()  # the graph's static output: every replay rewrites it
        self.graph = graph


class GraphRunner:
    """Whole-step CUDA graphs for one denoiser, a step strategy (see the module docstring).

    weights: what a capture bakes in of the denoiser's parameters, for the cache key (for a torch
    network TorchDenoiser.weights; `tuple` for one without). requested: True (the caller asked: a
    fallback is noticed, on the CPU too) or None (use graphs where possible: eager on the CPU
    silently). max_graphs: how many captured steps to keep.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        weights: Callable[[], tuple] = tuple,
        requested: bool | None = None,
        max_graphs: int = 8,
    ) -> None:
        self.denoiser, self.weights = denoiser, weights
        self.requested, self.max_graphs = requested, max_graphs
        self.eager = Eager(denoiser)
        self._graphs: OrderedDict[tuple, GraphedStep] = OrderedDict()
        self.captures = 0  # graphs captured so far (a cache hit captures none)
        self._failed: set[tuple] = set()
        self._noticed: set[str] = set()
        self._pools: dict[torch.device, tuple] = {}

    def _notice(self, cause: str, message: str) -> None:
        if cause not in self._noticed:
            self._noticed.add(cause)
            LOG.warning("fastddpm: no CUDA graph: %s; sampling eagerly", message)

    def start(
        self, x_T: torch.Tensor, table: StepTable | SolverTable, clip_x0: bool, noise: BatchNoise
    ) -> StepRun:
        """A run of graph replays from x_T (N, C, H, W) float32, or of eager steps where the runner
        cannot serve."""
        device = x_T.device
        if device.type != "cuda":
            if self.requested:
                self._notice("device", f"the sampler runs on {device}; CUDA graphs need a CUDA device")
            return self.eager.start(x_T, table, clip_x0, noise)
        if table.stochastic and not noise.philox:
            self._notice(
                "generator",
                "the steps draw their noise from a torch.Generator, which a graph cannot replay"
                " (sample(seed=...) or --noise philox draws it in the kernel)",
            )
            return self.eager.start(x_T, table, clip_x0, noise)
        key = self._key(x_T, table, clip_x0)
        if key in self._failed:
            return self.eager.start(x_T, table, clip_x0, noise)
        # Capture on x_T's device, whichever device is current: a graph's streams, memory pool
        # and kernels all belong to the device current when it is made.
        with torch.cuda.device(device):
            step = self._graphs.get(key) or self._capture(key, x_T, table, clip_x0)
        if step is None:
            return self.eager.start(x_T, table, clip_x0, noise)
        self._graphs.move_to_end(key)
        return step.start(x_T, noise.seed, noise.offset(0) if noise.philox else 0)

    def _capture(
        self, key: tuple, x_T: torch.Tensor, table: StepTable | SolverTable, clip_x0: bool
    ) -> GraphedStep | None:
        backend = ops.resolve_backend(self.denoiser.backend, x_T.device)
        if x_T.device not in self._pools:
            self._pools[x_T.device] = torch.cuda.graph_pool_handle()
        try:
            step = GraphedStep(self.denoiser, backend, table, x_T, clip_x0)
            step.capture(self._pools[x_T.device])
        except Exception as err:  # any failure to capture: the eager steps still work
            self._failed.add(key)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self._notice(f"capture:{backend}", f"capturing the step failed ({type(err).__name__}: {reason})")
            return None
        self.captures += 1
        self._graphs[key] = step
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return step

    def _key(self, x_T: torch.Tensor, table: StepTable | SolverTable, clip_x0: bool) -> tuple:
        """Everything a capture bakes in (the module docstring lists it)."""
        contents = hashlib.sha256(type(table).__name__.encode())
        for name in _table_tensors(table):
            contents.update(getattr(table, name).cpu().numpy().tobytes())
        contents.update(repr(getattr(table, "init_scale", None)).encode())
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        backend = ops.resolve_backend(self.denoiser.backend, x_T.device)
        weights = hashlib.sha256(repr(self.weights()).encode()).hexdigest()
        return (
            x_T.device,
            tuple(x_T.shape),
            backend,
            weights,
            contents.hexdigest(),
            table.stochastic,
            clip_x0,
            tf32,
        )

    @property
    def cached(self) -> int:
        """How many captured steps the cache holds."""
        return len(self._graphs)


def _table_tensors(table: StepTable | SolverTable) -> tuple[str, ...]:
    """The names of a table's device tensors: what a graph reads, and what its key hashes."""
    if isinstance(table, SolverTable):
        return ("weights", "dest", "timesteps", "input_scale")
    return ("coef", "timesteps")
