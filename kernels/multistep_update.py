"""The fused few-step solver update in Triton: one elementwise linear map per step (fastddpm.solver_table).

x, eps (N, C, H, W) and the history slots (M, N, C, H, W), float32 contiguous, run as flat tensors.
Row i of the table's weights (S, NUM_ROWS, NUM_INPUTS + M) and dest (S, 2) are read on the device
at the step index i, a scalar argument or a 0-d device tensor; so a CUDA graph replays the step
with whatever i the tensor holds. Per element:

    D      = clamp?(W[ROW_D, x] x + W[ROW_D, eps] eps)
    keep_a = W[ROW_KEEP_A] . [x, eps, D, z, slot_0 .. slot_{M-1}]   -> history[dest[i, 0]]
    keep_b = W[ROW_KEEP_B] . [...]                                   -> history[dest[i, 1]]
    x_next = W[ROW_X] . [...]

every input read before any slot is written (a slot may be read and written in one step); dest -1
(or any slot outside 0..M-1) writes nothing. A slot (or z) whose weights in the three rows are all
0 is not loaded (drawn): a branch on values every program reads alike. An i outside the table is
never clamped: x_next is NaN everywhere and no slot is written.

z is read from `noise`, or drawn with Philox4x32-10 at (seed, offset) exactly as kernels/ddpm_step.py
draws it (its helpers; element j of the flat tensor takes lane j % 4 of counter group j // 4), so
it equals fastddpm.reference.philox_normal. A tile is [BLOCK // 4, 4]: one Philox call per four
elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm import custom_ops, solver_table
from fastddpm.custom_ops import MultistepArgs
from fastddpm.solver_table import SolverTable

from ._common import check_device, device_guard
from .ddpm_step import MASK32, NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, _block, _lanes, _philox_normal4

# The table's columns and rows (fastddpm.solver_table), as constants the kernel reads.
COL_X = tl.constexpr(solver_table.COL_X)
COL_EPS = tl.constexpr(solver_table.COL_EPS)
COL_D = tl.constexpr(solver_table.COL_D)
COL_Z = tl.constexpr(solver_table.COL_Z)
NUM_INPUTS = tl.constexpr(solver_table.NUM_INPUTS)
ROW_D = tl.constexpr(solver_table.ROW_D)
ROW_KEEP_A = tl.constexpr(solver_table.ROW_KEEP_A)
ROW_KEEP_B = tl.constexpr(solver_table.ROW_KEEP_B)
ROW_X = tl.constexpr(solver_table.ROW_X)
NUM_ROWS = tl.constexpr(solver_table.NUM_ROWS)


@triton.jit
def _w(row, ok, r: tl.constexpr, c: tl.constexpr, K: tl.constexpr):
    """Weight (r, c) of the step's (NUM_ROWS, K) block at `row`; NaN where the step index is bad."""
    return tl.load(row + r * K + c, mask=ok, other=float("nan"))


@triton.jit(do_not_specialize=["i_scalar", "seed", "off_lo", "off_hi"])
def _multistep_update_kernel(
    x_ptr,
    eps_ptr,
    noise_ptr,
    history_ptr,
    out_ptr,
    weights_ptr,
    dest_ptr,
    i_ptr,
    i_scalar,
    num_steps,
    numel,
    seed,
    off_lo,
    off_hi,
    seed_ptr,
    offset_ptr,
    M: tl.constexpr,
    I_ON_DEVICE: tl.constexpr,
    NOISE: tl.constexpr,
    SEED_ON_DEVICE: tl.constexpr,
    OFFSET_ON_DEVICE: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One tile of BLOCK elements of the flat (N*C*H*W) tensors. Grid: (cdiv(numel, BLOCK),).

    M: the history slots. I_ON_DEVICE: i is i_ptr[0], else i_scalar. NOISE (NOISE_NONE,
    NOISE_TENSOR, NOISE_PHILOX): where z comes from. SEED_ON_DEVICE / OFFSET_ON_DEVICE: read the
    seed / offset from seed_ptr[0] / offset_ptr[0] (int64 bits of the uint64) instead of the arguments.
    """
    if SEED_ON_DEVICE:
        seed = tl.load(seed_ptr)
    if OFFSET_ON_DEVICE:
        offset = tl.load(offset_ptr)
        off_lo = offset & 0xFFFFFFFF
        off_hi = (offset >> 32) & 0xFFFFFFFF
    if I_ON_DEVICE:
        i = tl.load(i_ptr).to(tl.int64)
    else:
        i = i_scalar.to(tl.int64)

    # Row i of the table: its (NUM_ROWS, K) weights and its two destination slots.
    K: tl.constexpr = NUM_INPUTS + M
    i_ok = (i >= 0) & (i < num_steps)
    i_row = tl.where(i_ok, i, 0)
    row = weights_ptr + i_row * (NUM_ROWS * K)
    dest_a = tl.load(dest_ptr + i_row * 2, mask=i_ok, other=-1)
    dest_b = tl.load(dest_ptr + i_row * 2 + 1, mask=i_ok, other=-1)

    # The tile: row g is the flat tensors' 4-element Philox group g.
    g = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    lane = tl.arange(0, 4)
    j = g[:, None] * 4 + lane[None, :]
    mask = j < numel

    # D, the step's x0 prediction, then the three rows over x, eps and D.
    x = tl.load(x_ptr + j, mask=mask, other=0.0)
    e = tl.load(eps_ptr + j, mask=mask, other=0.0)
    d = _w(row, i_ok, ROW_D, COL_X, K) * x + _w(row, i_ok, ROW_D, COL_EPS, K) * e
    if CLIP:
        d = tl.minimum(tl.maximum(d, -1.0), 1.0)
    keep_a = _w(row, i_ok, ROW_KEEP_A, COL_X, K) * x + _w(row, i_ok, ROW_KEEP_A, COL_EPS, K) * e
    keep_a += _w(row, i_ok, ROW_KEEP_A, COL_D, K) * d
    keep_b = _w(row, i_ok, ROW_KEEP_B, COL_X, K) * x + _w(row, i_ok, ROW_KEEP_B, COL_EPS, K) * e
    keep_b += _w(row, i_ok, ROW_KEEP_B, COL_D, K) * d
    x_next = _w(row, i_ok, ROW_X, COL_X, K) * x + _w(row, i_ok, ROW_X, COL_EPS, K) * e
    x_next += _w(row, i_ok, ROW_X, COL_D, K) * d

    # z, where this step weighs it.
    if NOISE != NOISE_NONE:
        wa = _w(row, i_ok, ROW_KEEP_A, COL_Z, K)
        wb = _w(row, i_ok, ROW_KEEP_B, COL_Z, K)
        wx = _w(row, i_ok, ROW_X, COL_Z, K)
        if (wa != 0.0) | (wb != 0.0) | (wx != 0.0):
            if NOISE == NOISE_TENSOR:
                z = tl.load(noise_ptr + j, mask=mask, other=0.0)
            else:
                z0, z1, z2, z3 = _philox_normal4(g, seed, off_lo, off_hi)
                z = _lanes(lane, z0, z1, z2, z3)
            keep_a += wa * z
            keep_b += wb * z
            x_next += wx * z

    # The slots this step weighs, each read once, all before any is written.
    for k in tl.static_range(M):
        wa = _w(row, i_ok, ROW_KEEP_A, NUM_INPUTS + k, K)
        wb = _w(row, i_ok, ROW_KEEP_B, NUM_INPUTS + k, K)
        wx = _w(row, i_ok, ROW_X, NUM_INPUTS + k, K)
        if (wa != 0.0) | (wb != 0.0) | (wx != 0.0):
            v = tl.load(history_ptr + k * numel + j, mask=mask, other=0.0)
            keep_a += wa * v
            keep_b += wb * v
            x_next += wx * v

    # A destination outside 0..M-1 (-1: none) writes nothing.
    if (dest_a >= 0) & (dest_a < M):
        tl.store(history_ptr + dest_a * numel + j, keep_a, mask=mask)
    if (dest_b >= 0) & (dest_b < M):
        tl.store(history_ptr + dest_b * numel + j, keep_b, mask=mask)
    tl.store(out_ptr + j, x_next, mask=mask)


def _warps(block: int) -> int:
    """4 elements per thread: x, eps, D, z, the three rows and the Philox state are live at once,
    and ddpm_step's 8 spill registers on sm_90 (tests/test_triton_gpu_compile.py)."""
    return max(4, block // 128)


def launch_multistep_update(
    x: torch.Tensor,
    eps: torch.Tensor,
    history: torch.Tensor,
    i: int | torch.Tensor,
    weights: torch.Tensor,
    dest: torch.Tensor,
    stochastic: bool,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    clip_x0: bool = False,
    block: int | None = None,
) -> torch.Tensor:
    """Launch; returns x_next (N, C, H, W) and writes history (M, N, C, H, W) in place. Inputs
    checked by fastddpm.ops (float32 contiguous).

    i: the step index, an int or an integer tensor of shape (); weights, dest: the SolverTable's
    (S, NUM_ROWS, NUM_INPUTS + M) float32 and (S, 2) int64. z is `noise` where given, else Philox
    at (seed, offset). `block` (elements per program, a power of two >= 4) overrides the heuristic.
    """
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    num_slots = weights.shape[2] - solver_table.NUM_INPUTS
    weights = weights.float().contiguous()
    dest = dest.long().contiguous()
    if isinstance(i, torch.Tensor):
        i_arg = i.reshape(1).to(device=x.device, dtype=torch.int64)
        i_scalar = 0
    else:
        i_arg, i_scalar = weights, int(i)  # weights: any pointer, never read as i

    noise_mode = NOISE_NONE
    if stochastic:
        noise_mode = NOISE_TENSOR if noise is not None else NOISE_PHILOX
    seed_ptr = seed if isinstance(seed, torch.Tensor) else weights  # weights: never read as a seed
    offset_ptr = offset if isinstance(offset, torch.Tensor) else weights
    seed = 0 if seed is None or isinstance(seed, torch.Tensor) else int(seed)
    offset = 0 if isinstance(offset, torch.Tensor) else int(offset)

    block = block or min(_block(numel, x.device), 1024)  # at most 8 warps
    with device_guard(x.device):
        _multistep_update_kernel[(triton.cdiv(numel, block),)](
            x, eps, noise if noise_mode == NOISE_TENSOR else x, history if num_slots else x, out,
            weights, dest, i_arg, i_scalar, weights.shape[0], numel,
            seed, offset & MASK32, offset >> 32, seed_ptr, offset_ptr,
            M=num_slots, I_ON_DEVICE=i_arg is not weights, NOISE=int(noise_mode),
            SEED_ON_DEVICE=seed_ptr is not weights, OFFSET_ON_DEVICE=offset_ptr is not weights,
            CLIP=clip_x0, BLOCK=block, num_warps=_warps(block),
        )  # fmt: skip
    return out


def check_multistep_update(
    x: torch.Tensor, eps: torch.Tensor, history: torch.Tensor, noise: torch.Tensor | None, table: SolverTable
) -> None:
    """What only this kernel imposes (fastddpm.ops checks the rest)."""
    check_device("multistep_update", x=x, eps=eps, history=history, noise=noise, table=table.weights)


# --- the custom op torch.ops.fastddpm_triton.multistep_update (writes history in place) ----------


def _forward(args: MultistepArgs) -> torch.Tensor:
    return launch_multistep_update(
        args.x,
        args.eps,
        args.history,
        args.i,
        args.weights,
        args.dest,
        args.stochastic,
        noise=args.noise,
        seed=args.seed,
        offset=args.offset,
        clip_x0=args.clip_x0,
    )


custom_ops.define(
    "fastddpm_triton::multistep_update",
    _forward,
    fake=MultistepArgs.fake,
    reference=None,
    mutates_args=("history",),
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
) -> torch.Tensor:
    """One solver step at step index i, through the custom op. The reference's signature; inputs
    checked by fastddpm.ops."""
    check_multistep_update(x, eps, history, noise, table)
    args = custom_ops.multistep_args(
        x, eps, history, i, table, noise=noise, seed=seed, offset=offset, clip_x0=clip_x0
    )
    return torch.ops.fastddpm_triton.multistep_update(*args)
