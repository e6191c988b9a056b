"""The op contract's cases: shape classes, their inputs, the reference's output and DESIGN.md's
measure and tolerances ("Equal means"), and the comparison of one backend's op with the reference.

`fastddpm check` runs these at production and small shapes (fastddpm.check), and first-use
verification runs the small ones of a class (fastddpm.verify). `max_error` is float32's max absolute
error (tolerance 1e-4, 1e-5 for ddpm_step), and float16's and bfloat16's max absolute error over
the output's scale max|ref| (2e-3 and 2e-2). A NaN, a wrong shape, dtype or memory format, or an
exception fails a case with its message.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import reference
from .backends import backend_op
from .precision import Precision
from .reference import memory_format_of
from .schedule import Schedule, StepTable
from .solver_table import COL_EPS, COL_X, NUM_INPUTS, NUM_ROWS, ROW_D, SolverTable

OPS = ("group_norm_silu", "attention", "ddpm_step", "multistep_update")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # DESIGN.md, "Equal means"
STEP_FP32_TOLERANCE = 1e-5
# multistep_update: each output is a float32 dot product of at most K = NUM_INPUTS + M terms (M = 3
# slots in the cases and tests: K = 7) summed in another order, with fused multiply-adds, than the
# reference sums it. Either sum is within K * 2^-24 * sum_c |w_c v_c| of the exact one (Higham,
# "Accuracy and Stability of Numerical Algorithms", 3.1); with the cases' |w| <= 1 and inputs of
# std <= 1.5 (|v| < 8 over a few thousand elements, so |D| < 16 unclipped) sum_c |w_c v_c| < 70,
# and the two sums differ by at most 2 * 7 * 6e-8 * 70 ~ 6e-5: the contract's float32 bound, 1e-4,
# holds with margin where ddpm_step's two-term 1e-5 need not.
MULTISTEP_FP32_TOLERANCE = 1e-4
SEED = 20200619  # every case draws its inputs from its own generator, seeded with this
# The ResBlock's norm, the norm in front of attention, and the up path's norm of its input and a
# skip read in place (x holds C // 2 + 1 of the C channels: a group straddles the two; add is a
# broadcast row, the U-Net's pending bias).
NORM_VARIANTS = ("add+silu", "plain", "skip")
STEP_VARIANTS = ("noise", "seed")  # z passed in, or drawn in the kernel from Philox (seed, offset)
# multistep_update: z passed in at a step that swaps two slots (each read and written), no clip; z
# from Philox at a step that keeps one row (dest -1 for the other), D clipped.
MULTISTEP_VARIANTS = ("noise", "seed+clip")
MULTISTEP_STEP = {"noise": 0, "seed+clip": 1}  # each variant's step index into solver_table()


@dataclass(frozen=True)
class Case:
    """One op at one shape class: shape is (N, C, H, W) for the norm and the step, (B, heads, L, D)
    for attention; groups only for the norm; variant one of NORM_VARIANTS or STEP_VARIANTS."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool = False
    variant: str = ""
    groups: int = 32

    @property
    def label(self) -> str:
        if self.op == "attention":
            heads, dim = self.shape[1], self.shape[3]
            return f"{heads} head{'s' if heads > 1 else ''}, D={dim}"
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{layout}, {self.variant}"


@dataclass
class Outcome:
    """A case on one backend: its error (None where none was measured), tolerance, verdict, why;
    refused: the backend raised ValueError, the contract's way of saying it cannot take an input."""

    error: float | None
    tolerance: float
    passed: bool
    message: str = ""
    refused: bool = False


def tolerance(op: str, dtype: torch.dtype) -> float:
    """DESIGN.md's bound on `max_error` for `op` in `dtype`."""
    if dtype == torch.float32 and op == "ddpm_step":
        return STEP_FP32_TOLERANCE
    if dtype == torch.float32 and op == "multistep_update":
        return MULTISTEP_FP32_TOLERANCE
    return TOLERANCE[dtype]


def max_error(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """float32: max |out - ref|; float16, bfloat16: that over max |ref| (the output's scale).
    Computed in float64; inf where out holds a NaN the reference does not."""
    diff = (out.detach().double() - ref.detach().double()).abs().max()
    if dtype != torch.float32:
        diff = diff / ref.detach().double().abs().max().clamp_min(1e-30)
    err = diff.item()
    return math.inf if math.isnan(err) else err


# --- cases and their inputs ---------------------------------------------------------------------


def small_cases(op: str, dtype: torch.dtype, channels_last: bool = False, head_dim: int = 64) -> list[Case]:
    """Small inputs of one class (fastddpm.verify): every variant of the op at a few KB."""
    if op == "group_norm_silu":
        return [Case(op, (2, 64, 4, 4), dtype, channels_last, v, 32) for v in NORM_VARIANTS]
    if op == "attention":
        return [Case(op, (1, 2, 32, head_dim), dtype)]
    if op == "multistep_update":  # float32 and contiguous only: fastddpm.ops refuses the rest
        if dtype != torch.float32 or channels_last:
            return []
        return [Case(op, (2, 3, 8, 8), dtype, False, v) for v in MULTISTEP_VARIANTS]
    return [Case(op, (2, 3, 8, 8), dtype, channels_last, v) for v in STEP_VARIANTS]


_CIFAR10_TABLES: dict[torch.device, StepTable] = {}


def cifar10_table(device: torch.device) -> StepTable:
    """The CIFAR10 schedule's ancestral step table (linear betas, T = 1000, fixedlarge) on device."""
    if device not in _CIFAR10_TABLES:
        _CIFAR10_TABLES[device] = Schedule.from_name().step_table(device=device)
    return _CIFAR10_TABLES[device]


_SOLVER_TABLES: dict[torch.device, SolverTable] = {}
SOLVER_DEST = [[1, 0], [-1, 2], [2, -1]]  # step 0 swaps slots 0 and 1; steps 1, 2 keep one row


def solver_table(device: torch.device) -> SolverTable:
    """A stochastic 3-step table with 3 history slots, weights uniform in [-1, 1] drawn from SEED
    (row D over x and eps only, as the reference reads it), on device."""
    if device not in _SOLVER_TABLES:
        S, M = len(SOLVER_DEST), 3
        weights = np.random.default_rng(SEED).uniform(-1.0, 1.0, (S, NUM_ROWS, NUM_INPUTS + M))
        weights[:, ROW_D] = 0.0
        weights[:, ROW_D, [COL_X, COL_EPS]] = [1.2, -0.6]
        _SOLVER_TABLES[device] = SolverTable.from_float64(
            "case", weights, np.array(SOLVER_DEST), np.arange(S), np.ones(S), 1.0, False, device
        )
    return _SOLVER_TABLES[device]


def make_inputs(case: Case, device: torch.device) -> tuple[tuple, dict]:
    """(args, kwargs) of the op for `case`, drawn on `device` from the case's own generator."""
    g = torch.Generator(device).manual_seed(SEED)

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device) * scale + shift

    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    if case.op == "group_norm_silu":
        N, C = case.shape[:2]
        x = randn(*case.shape, scale=2.0, shift=0.5).to(case.dtype).contiguous(memory_format=fmt)
        weight, bias = randn(C, scale=0.5, shift=1.0).to(case.dtype), randn(C, scale=0.5).to(case.dtype)
        if case.variant == "skip":
            add = randn(C).to(case.dtype).expand(N, C)
            x, skip = (part.contiguous(memory_format=fmt) for part in x.tensor_split([C // 2 + 1], dim=1))
            return (x, weight, bias, case.groups, 1e-6), {"silu": True, "add": add, "skip": skip}
        add = randn(N, C).to(case.dtype) if case.variant == "add+silu" else None
        kwargs = {"silu": case.variant == "add+silu", "add": add}
        return (x, weight, bias, case.groups, 1e-6), kwargs
    if case.op == "attention":
        B, H, L, D = case.shape
        q, k, v = (randn(B, L, H, D).to(case.dtype).transpose(1, 2) for _ in range(3))
        return (q, k, v, None), {}
    if case.op == "multistep_update":
        table = solver_table(device)
        x, eps = randn(*case.shape, scale=1.5), randn(*case.shape)
        history = randn(table.num_slots, *case.shape)
        i = MULTISTEP_STEP[case.variant]
        if case.variant == "noise":
            return (x, eps, history, i, table), {"noise": randn(*case.shape)}
        return (x, eps, history, i, table), {"seed": 1234, "offset": 5, "clip_x0": True}
    table = cifar10_table(device)
    x_t, eps = (randn(*case.shape, scale=s).to(case.dtype).contiguous(memory_format=fmt) for s in (1.5, 1.0))
    i = len(table) // 2
    if case.variant == "noise":
        noise = randn(*case.shape).to(case.dtype).contiguous(memory_format=fmt)
        return (x_t, eps, i, table), {"noise": noise}
    return (x_t, eps, i, table), {"seed": 1234, "offset": 5}


def _fp32(value):
    """A floating tensor as float32 (keeping its memory format); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


@contextmanager
def plain(device: torch.device) -> Iterator[None]:
    """No autograd, no autocast, no TF32: the reference's float32 is float32 whatever the caller set."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False), Precision("fp32").scope(device):
        yield


def result(op: str, fn: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
    """fn(*args, **kwargs), `op`'s function on a backend; for multistep_update, which writes its
    history slots, x_next stacked on the slots as it left them, (1 + M, N, C, H, W), from a copy
    of the history (the inputs serve the reference and the backend alike)."""
    if op != "multistep_update":
        return fn(*args, **kwargs)
    x, eps, history, *rest = args
    history = history.clone()
    return torch.cat([fn(x, eps, history, *rest, **kwargs)[None], history])


def reference_output(case: Case, inputs: tuple[tuple, dict], device: torch.device) -> torch.Tensor:
    """fastddpm.reference's output for `case` (see `result`), in float32 on float32 copies of the
    inputs."""
    args, kwargs = inputs
    with plain(device):
        fn = getattr(reference, case.op)
        return result(case.op, fn, tuple(map(_fp32, args)), {k: _fp32(v) for k, v in kwargs.items()})


def compare(case: Case, backend: str, inputs: tuple[tuple, dict], ref: torch.Tensor) -> Outcome:
    """Run `case` on `backend` and measure it against the reference output `ref`."""
    tol = tolerance(case.op, case.dtype)
    args, kwargs = inputs
    device = args[0].device
    try:
        with plain(device):
            out = result(case.op, backend_op(backend, case.op), args, kwargs)
    except Exception as err:  # a backend that raises fails the case, and the report says why
        why = error_line(err)
        return Outcome(None, tol, False, why, refused=isinstance(err, ValueError))
    want = (tuple(ref.shape), case.dtype, device, memory_format_of(args[0]))
    got = (tuple(out.shape), out.dtype, out.device, memory_format_of(out))
    if got != want:
        return Outcome(None, tol, False, f"returned shape, dtype, device, format {got}; expected {want}")
    err = max_error(out, ref, case.dtype)
    if math.isinf(err):
        return Outcome(None, tol, False, "NaN or inf in the output where the reference has none")
    return Outcome(err, tol, err <= tol, "" if err <= tol else f"max error {err:.3g} > tolerance {tol:g}")


def error_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def check_case(case: Case, backend: str, device: torch.device) -> Outcome:
    """`case` on `backend`, inputs and reference made here (what fastddpm.verify runs)."""
    inputs = make_inputs(case, device)
    return compare(case, backend, inputs, reference_output(case, inputs, device))


def device_name(device: torch.device) -> str:
    """The GPU's model, or the CPU's (its /proc/cpuinfo model name on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
