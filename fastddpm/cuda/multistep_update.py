"""multistep_update on the CUDA library (csrc/multistep_update.cu): its limits, the launcher, the
custom op torch.ops.fastddpm_cuda.multistep_update (it writes history in place) and the function
fastddpm.ops calls."""

from __future__ import annotations

import ctypes

import torch

from .. import custom_ops
from ..custom_ops import MultistepArgs
from ..solver_table import SolverTable
from ._library import (
    MAX_SLOTS,
    NOISE_NONE,
    NOISE_PHILOX,
    NOISE_TENSOR,
    check_cuda,
    check_status,
    data_ptr,
    library,
    stream_of,
)


def check(
    x: torch.Tensor, eps: torch.Tensor, history: torch.Tensor, noise: torch.Tensor | None, table: SolverTable
) -> None:
    """What only this library imposes (fastddpm.ops checks the rest)."""
    check_cuda("multistep_update", x=x, eps=eps, history=history, noise=noise)
    if table.num_slots > MAX_SLOTS:
        raise ValueError(
            f"the cuda backend's multistep_update keeps at most {MAX_SLOTS} history slots;"
            f" the {table.name} table has {table.num_slots}"
        )


def launch_multistep_update(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    eps: torch.Tensor,
    history: torch.Tensor,
    i: int | torch.Tensor,
    weights: torch.Tensor,
    dest: torch.Tensor,
    stochastic: bool,
    *,
    noise: torch.Tensor | None,
    seed: int | torch.Tensor | None,
    offset: int | torch.Tensor,
    clip_x0: bool,
    stream: int | None,
) -> torch.Tensor:
    """Marshal the tensors for fastddpm_multistep_update and launch it on `stream` (a cudaStream_t);
    returns x_next and writes history (M, N, C, H, W) in place.

    x, eps, history, noise: float32 contiguous (fastddpm.ops checks them); i: an int or an integer
    tensor of shape (); weights, dest: the SolverTable's (S, NUM_ROWS, NUM_INPUTS + M) float32 and
    (S, 2) int64. z is `noise` where given, else Philox at (seed, offset); a seed or offset tensor
    (0-d int64 on x's device) is read by the kernel.
    """
    mode = NOISE_NONE if not stochastic else NOISE_TENSOR if noise is not None else NOISE_PHILOX
    noise = noise.contiguous() if mode == NOISE_TENSOR else None
    weights = weights.float().contiguous()
    dest = dest.to(torch.int64).contiguous()
    i_tensor = i.to(device=x.device, dtype=torch.int64).reshape(()) if isinstance(i, torch.Tensor) else None
    seed_tensor = seed if isinstance(seed, torch.Tensor) else None
    offset_tensor = offset if isinstance(offset, torch.Tensor) else None
    num_slots = weights.shape[2] - 4
    out = torch.empty_like(x)
    status = lib.fastddpm_multistep_update(
        data_ptr(x),
        data_ptr(eps),
        data_ptr(noise),
        data_ptr(history) if num_slots else None,
        data_ptr(out),
        data_ptr(weights),
        data_ptr(dest),
        weights.shape[0],
        num_slots,
        data_ptr(i_tensor),
        0 if i_tensor is not None else int(i),
        mode,
        0 if seed is None or seed_tensor is not None else seed,  # the host words; a device tensor's are 0
        0 if offset_tensor is not None else offset,
        data_ptr(seed_tensor),
        data_ptr(offset_tensor),
        int(clip_x0),
        x.numel(),
        stream,
    )
    check_status(lib, status, "multistep_update")
    return out


# --- the custom op: the launcher on the current stream of x's device ------------------------------


def _forward(args: MultistepArgs) -> torch.Tensor:
    with torch.cuda.device(args.x.device):
        return launch_multistep_update(
            library(),
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
            stream=stream_of(args.x.device),
        )


custom_ops.define(
    "fastddpm_cuda::multistep_update",
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
    """One solver step at step index i: csrc/include/fastddpm/multistep_update.cuh. The reference's
    signature; inputs checked by fastddpm.ops."""
    check(x, eps, history, noise, table)
    args = custom_ops.multistep_args(
        x, eps, history, i, table, noise=noise, seed=seed, offset=offset, clip_x0=clip_x0
    )
    return torch.ops.fastddpm_cuda.multistep_update(*args)
