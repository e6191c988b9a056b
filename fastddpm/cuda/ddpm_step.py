"""ddpm_step on the CUDA library (csrc/ddpm_step.cu): its limits, the launcher, the custom op
torch.ops.fastddpm_cuda.ddpm_step and the function fastddpm.ops calls."""

from __future__ import annotations

import ctypes

import torch

from .. import custom_ops
from ..custom_ops import StepArgs
from ..reference import memory_format_of
from ..schedule import NUM_COEFS, StepTable
from ._library import (
    DTYPE_CODES,
    NOISE_NONE,
    NOISE_PHILOX,
    NOISE_TENSOR,
    check_cuda,
    check_status,
    data_ptr,
    library,
    stream_of,
)


def check(x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None, table: StepTable) -> None:
    """What only this library imposes (fastddpm.ops checks the rest)."""
    check_cuda("ddpm_step", x_t=x_t, eps=eps, noise=noise)
    if table.coef.dtype != torch.float32 or table.coef.dim() != 2 or table.coef.shape[1] != NUM_COEFS:
        raise ValueError(
            f"the step table must be (S, {NUM_COEFS}) float32,"
            f" got {tuple(table.coef.shape)} {table.coef.dtype}"
        )


def launch_ddpm_step(
    lib: ctypes.CDLL,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    i: int | torch.Tensor,
    coefficients: torch.Tensor,
    stochastic: bool,
    *,
    noise: torch.Tensor | None,
    seed: int | torch.Tensor | None,
    offset: int | torch.Tensor,
    clip_x0: bool,
    stream: int | None,
) -> torch.Tensor:
    """Marshal the tensors for fastddpm_ddpm_step and launch it on `stream` (a cudaStream_t).

    i: the step index, an int or an integer tensor of shape (), (1,) or (N,); coefficients: the
    step table's (S, NUM_COEFS) float32. z is `noise` where given, else Philox at (seed, offset);
    a seed or offset tensor (0-d int64 on x_t's device) is read by the kernel.
    """
    fmt = memory_format_of(x_t)  # x_t, eps, noise and the output share one layout
    x_t, eps = x_t.contiguous(memory_format=fmt), eps.contiguous(memory_format=fmt)
    mode = NOISE_NONE if not stochastic else NOISE_TENSOR if noise is not None else NOISE_PHILOX
    noise = noise.contiguous(memory_format=fmt) if mode == NOISE_TENSOR else None
    coefficients = coefficients.contiguous()
    i_tensor = i.to(device=x_t.device, dtype=torch.int64).reshape(-1) if isinstance(i, torch.Tensor) else None
    seed_tensor = seed if isinstance(seed, torch.Tensor) else None
    offset_tensor = offset if isinstance(offset, torch.Tensor) else None
    out = torch.empty_like(x_t, memory_format=fmt)
    N, C, H, W = x_t.shape
    status = lib.fastddpm_ddpm_step(
        data_ptr(x_t),
        data_ptr(eps),
        data_ptr(noise),
        data_ptr(out),
        data_ptr(coefficients),
        coefficients.shape[0],
        data_ptr(i_tensor),
        0 if i_tensor is None else i_tensor.numel(),
        0 if i_tensor is not None else int(i),
        mode,
        DTYPE_CODES[noise.dtype] if noise is not None else 0,
        0 if seed is None or seed_tensor is not None else seed,  # the host words; a device tensor's are 0
        0 if offset_tensor is not None else offset,
        data_ptr(seed_tensor),
        data_ptr(offset_tensor),
        int(clip_x0),
        N,
        C,
        H,
        W,
        int(fmt == torch.channels_last),
        DTYPE_CODES[x_t.dtype],
        stream,
    )
    check_status(lib, status, "ddpm_step")
    return out


# --- the custom op: the launcher on the current stream of x_t's device ----------------------------


def _forward(args: StepArgs) -> torch.Tensor:
    with torch.cuda.device(args.x_t.device):
        return launch_ddpm_step(
            library(),
            args.x_t,
            args.eps,
            args.i,
            args.coefficients,
            args.stochastic,
            noise=args.noise,
            seed=args.seed,
            offset=args.offset,
            clip_x0=args.clip_x0,
            stream=stream_of(args.x_t.device),
        )


custom_ops.define("fastddpm_cuda::ddpm_step", _forward, fake=StepArgs.fake, reference=StepArgs.reference)


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
) -> torch.Tensor:
    """One reverse step at step index i: csrc/include/fastddpm/ddpm_step.cuh. The reference's
    signature; inputs checked by fastddpm.ops."""
    check(x_t, eps, noise, table)
    args = custom_ops.step_args(x_t, eps, i, table, noise=noise, seed=seed, offset=offset, clip_x0=clip_x0)
    return torch.ops.fastddpm_cuda.ddpm_step(*args)
