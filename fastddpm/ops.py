"""The one seam: each fused op's entry point, its input checks, and backend dispatch.

backend = "auto" picks "cuda" if that library is built and the tensors are on a CUDA device, else
"triton" on a CUDA device, else "torch" (the reference): fastddpm.backends.resolve_backend, with
the rest of the backend registry. The U-Net and the samplers call only these functions. A fused
backend is checked against the reference the first time it meets a class of inputs
(fastddpm.verify; FASTDDPM_VERIFY=0: never).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import verify
from .backends import (  # the registry, re-exported: ops is where callers find backends
    BACKEND_MODULES,
    BACKENDS,
    CONCRETE_BACKENDS,
    BackendUnavailableError,
    backend_op,
    backend_status,
    get_backend,
    resolve_backend,
)
from .reference import memory_format_of
from .schedule import StepTable
from .solver_table import SolverTable

__all__ = [
    "BACKENDS", "BACKEND_MODULES", "CONCRETE_BACKENDS", "BackendUnavailableError", "attention",
    "backend_op", "backend_status", "ddpm_step", "get_backend", "group_norm_silu", "multistep_update",
    "resolve_backend", "uint64_as_int64",
]  # fmt: skip
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _impl(op: str, name: str, x: torch.Tensor) -> Callable:
    """`op` of the backend `name` means for x, or the reference's where first-use verification found
    that backend wrong on x's class of inputs (fastddpm.verify)."""
    backend = resolve_backend(name, x.device)
    if backend != "torch" and not verify.trusted(op, backend, x.device, x.dtype, verify.layout(op, x)):
        backend = "torch"
    return backend_op(backend, op)


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; expected float32, float16 or bfloat16")


def _check_same(what: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in `others` must share `ref`'s device (what="device") or dtype (what="dtype")."""
    for name, t in others.items():
        if t is not None and getattr(t, what) != getattr(ref, what):
            raise ValueError(
                f"{name} is on {what} {getattr(t, what)} but {ref_name} is on {getattr(ref, what)}"
            )


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float = 1e-6,
    *,
    silu: bool = True,
    add: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = SiLU(GroupNorm(h + add[:, :, None, None])), statistics in float32; h = x, or with
    `skip` the channel concatenation cat([x, skip], dim=1), read from the two tensors in place.

    x: (N, C1, H, W), contiguous or channels_last; skip: None or (N, C2, H, W) in x's dtype and
    memory format; C = C1 + C2 (C1 without skip); weight, bias: (C,); add: (N, C) or None (any
    strides: a broadcast row is read in place). silu=False gives the plain GroupNorm in front of
    attention. Returns (N, C, H, W) in x's dtype and memory format.
    """
    _check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: group_norm_silu needs a non-empty (N, C, H, W)")
    N, C = x.shape[:2]
    if skip is not None:
        _check_float("skip", skip)
        if skip.dim() != 4 or skip.shape[0] != N or skip.shape[2:] != x.shape[2:] or skip.shape[1] == 0:
            raise ValueError(
                f"skip must be (N, C2, H, W) with x's N, H, W {(N, *x.shape[2:])}, got {tuple(skip.shape)}"
            )
        _check_same("dtype", "x", x, skip=skip)
        either = x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)  # 1 channel, 1x1
        if not _dense(skip) or not (either or skip.is_contiguous(memory_format=memory_format_of(x))):
            raise ValueError("skip must be in x's memory format (both contiguous, or both channels_last)")
        C += skip.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups={num_groups} must be a positive int dividing the {C} channels")
    for name, p in (("weight", weight), ("bias", bias)):
        _check_float(name, p)
        if p.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},) for {C} channels, got {tuple(p.shape)}")
    if add is not None:
        _check_float("add", add)
        if add.shape != (N, C):
            raise ValueError(f"add must have shape ({N}, {C}), got {tuple(add.shape)}")
    _check_same("device", "x", x, weight=weight, bias=bias, add=add, skip=skip)
    if not _dense(x):
        raise ValueError("x must be contiguous or channels_last")
    return _impl("group_norm_silu", backend, x)(
        x, weight, bias, num_groups, eps, silu=silu, add=add, skip=skip
    )


def _dense(x: torch.Tensor) -> bool:
    """x (N, C, H, W) is contiguous or channels_last."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v with float32 softmax; scale defaults to D^-1/2.

    q: (B, heads, Lq, D); k, v: (B, heads, Lk, D) -> (B, heads, Lq, D).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, heads, L, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim")
    _check_same("device", "q", q, k=k, v=v)
    _check_same("dtype", "q", q, k=k, v=v)
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale must be a finite number or None (D^-1/2), got {scale!r}")
    return _impl("attention", backend, q)(q, k, v, scale)


def ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    i: int | torch.Tensor,
    table: StepTable,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    clip_x0: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """One reverse step x_t -> x_{t-1} at step index i (row i of `table`, timestep table.timesteps[i]).

    x_t, eps: (N, C, H, W); i: an int, or an integer tensor of shape () or (N,) on
    the table's device (read on device, so the step can be graph-captured; its
    range is then the caller's duty). z comes from `noise` (N, C, H, W) or, with
    `seed`, from counter-based Philox at (seed, offset). seed and offset are ints in
    [0, 2**64) or int64 tensors of shape () on x_t's device, read there (their bits are
    the uint64 value), so a captured step can replay with a new offset. Steps of a table
    with no noise (DDIM, eta = 0) need neither.
    """
    _check_float("x_t", x_t)
    _check_float("eps", eps)
    if x_t.dim() != 4 or eps.shape != x_t.shape:
        raise ValueError(
            f"x_t and eps must be 4-D of one shape, got {tuple(x_t.shape)} and {tuple(eps.shape)}"
        )
    _check_same("dtype", "x_t", x_t, eps=eps)
    _check_same("device", "x_t", x_t, eps=eps, noise=noise)
    if table.coef.device != x_t.device:
        raise ValueError(f"the step table is on {table.coef.device} but x_t is on {x_t.device}")
    _check_step_index(i, len(table), x_t.shape[0])
    if table.stochastic:
        if (noise is None) == (seed is None):
            raise ValueError("this step table adds noise: pass exactly one of noise= or seed=")
        if noise is not None:
            _check_float("noise", noise)
            if noise.shape != x_t.shape:
                raise ValueError(f"noise must have shape {tuple(x_t.shape)}, got {tuple(noise.shape)}")
        else:
            _check_counter("seed", seed, x_t.device)
            _check_counter("offset", offset, x_t.device)
    return _impl("ddpm_step", backend, x_t)(
        x_t, eps, i, table, noise=noise, seed=seed, offset=offset, clip_x0=clip_x0
    )


def multistep_update(
    x: torch.Tensor,
    eps: torch.Tensor,
    history: torch.Tensor,
    i: int | torch.Tensor,
    table: SolverTable,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    clip_x0: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """One few-step solver step at step index i (fastddpm.solver_table): returns x_next and writes
    the step's kept rows into `history` in place (slots table.dest[i]; -1: not kept).

    x, eps: (N, C, H, W) float32 contiguous; history: (M, N, C, H, W) float32 contiguous, M =
    table.num_slots; i: an int, or an integer tensor of shape () on the table's device (read on
    device, so the step can be graph-captured; its range is then the caller's duty). z comes from
    `noise` (N, C, H, W) float32 or, with `seed`, from Philox at (seed, offset) as in ddpm_step;
    a table with no noise needs neither.
    """
    _check_float32("x", x)
    _check_float32("eps", eps)
    if x.dim() != 4 or eps.shape != x.shape:
        raise ValueError(f"x and eps must be 4-D of one shape, got {tuple(x.shape)} and {tuple(eps.shape)}")
    _check_float32("history", history)
    M = table.num_slots
    if history.shape != (M, *x.shape):
        raise ValueError(
            f"history must have shape {(M, *x.shape)} (the table's {M} slots of x's shape),"
            f" got {tuple(history.shape)}"
        )
    _check_same("device", "x", x, eps=eps, history=history, noise=noise)
    if table.weights.device != x.device or table.dest.device != x.device:
        raise ValueError(f"the solver table is on {table.weights.device} but x is on {x.device}")
    if isinstance(i, torch.Tensor) and i.shape != ():
        raise ValueError(
            f"the step index i must be an int or a tensor of shape (), got shape {tuple(i.shape)}"
        )
    _check_step_index(i, len(table), x.shape[0])
    if table.stochastic:
        if (noise is None) == (seed is None):
            raise ValueError("this solver table adds noise: pass exactly one of noise= or seed=")
        if noise is not None:
            _check_float32("noise", noise)
            if noise.shape != x.shape:
                raise ValueError(f"noise must have shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        else:
            _check_counter("seed", seed, x.device, "x")
            _check_counter("offset", offset, x.device, "x")
    return _impl("multistep_update", backend, x)(
        x, eps, history, i, table, noise=noise, seed=seed, offset=offset, clip_x0=clip_x0
    )


def _check_float32(name: str, t: torch.Tensor) -> None:
    """A float32 contiguous tensor (the solver step's inputs)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} has dtype {t.dtype}; multistep_update takes float32")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (multistep_update runs on the flat tensor)")


def uint64_as_int64(value: int) -> int:
    """The int64 whose bits are the uint64 `value` (two's complement), for a seed or offset tensor:
    `torch.tensor(uint64_as_int64(2**64 - 1))` holds -1, which ddpm_step reads as 2**64 - 1."""
    if not 0 <= value < 2**64:
        raise ValueError(f"{value} is not in [0, 2**64)")
    return value - 2**64 if value >= 2**63 else value


def _check_counter(name: str, value: int | torch.Tensor, device: torch.device, ref_name: str = "x_t") -> None:
    """A Philox seed or offset: an int in [0, 2**64), or an int64 tensor of shape () on `device`,
    the device of the op's input `ref_name`."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64:
            raise ValueError(f"{name} must be an int64 tensor, got dtype {value.dtype}")
        if value.shape != ():
            raise ValueError(f"{name} must be a tensor of shape (), got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on device {value.device} but {ref_name} is on {device}")
    elif not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or an int64 tensor, got {type(value).__name__}")
    elif not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")


def _check_step_index(i: int | torch.Tensor, num_steps: int, batch: int) -> None:
    if isinstance(i, torch.Tensor):
        if i.dtype.is_floating_point or i.dtype.is_complex or i.dtype == torch.bool:
            raise ValueError(f"the step index i must be an integer tensor, got dtype {i.dtype}")
        if i.shape not in ((), (1,), (batch,)):
            raise ValueError(f"the step index i must have shape (), (1,) or ({batch},), got {tuple(i.shape)}")
        if i.device.type == "cpu" and bool(((i < 0) | (i >= num_steps)).any()):
            raise ValueError(f"the step index i is out of range: the table has steps 0..{num_steps - 1}")
    elif not isinstance(i, int) or isinstance(i, bool):
        raise TypeError(f"the step index i must be an int or an integer tensor, got {type(i).__name__}")
    elif not 0 <= i < num_steps:
        raise ValueError(f"the step index i={i} is out of range: the table has steps 0..{num_steps - 1}")
