"""group_norm_silu on the CUDA library (csrc/group_norm_silu.cu): its limits, the launcher, the
custom op torch.ops.fastddpm_cuda.group_norm_silu and the function fastddpm.ops calls."""

from __future__ import annotations

import ctypes

import torch

from .. import custom_ops, reference
from ..reference import memory_format_of
from ._library import DTYPE_CODES, MAX_GROUP_CHANNELS, check_cuda, check_status, data_ptr, library, stream_of


def check(x: torch.Tensor, weight, bias, num_groups: int, add, skip=None) -> None:
    """What only this library imposes (fastddpm.ops checks the rest)."""
    check_cuda("group_norm_silu", x=x, weight=weight, bias=bias, add=add, skip=skip)
    N, _, H, W = x.shape
    C = weight.shape[0]
    if C // num_groups > MAX_GROUP_CHANNELS:
        raise ValueError(
            f"the cuda group_norm_silu takes at most {MAX_GROUP_CHANNELS} channels per group;"
            f" got {C // num_groups} ({C} channels in {num_groups} groups)"
        )
    group_size = C // num_groups * H * W
    if group_size >= 2**31:
        raise ValueError(
            f"the cuda group_norm_silu takes groups of fewer than 2^31 elements; got {group_size}"
        )


def launch_group_norm_silu(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    silu: bool,
    add: torch.Tensor | None,
    stream: int | None,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Marshal the tensors for fastddpm_group_norm_silu and launch it on `stream` (a cudaStream_t).
    With `skip` the library normalizes cat([x, skip], dim=1), reading x and skip in place; add is
    read at its strides (a broadcast view such as bias.expand(N, C) is not copied)."""
    fmt = memory_format_of(x)
    if skip is not None:  # in x's layout (a copy only where x reads as either: one channel, or 1x1)
        skip = skip.contiguous(memory_format=fmt)
    if weight.dtype != bias.dtype:  # one parameter dtype; float32 holds either exactly
        weight, bias = weight.float(), bias.float()
    weight, bias = weight.contiguous(), bias.contiguous()
    N, C1, H, W = x.shape
    C = weight.shape[0]
    y = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    size = ctypes.c_size_t(0)
    status = lib.fastddpm_group_norm_silu_workspace_size(N, C, H, W, num_groups, ctypes.byref(size))
    check_status(lib, status, "group_norm_silu")
    workspace = torch.empty(size.value, dtype=torch.uint8, device=x.device) if size.value else None
    status = lib.fastddpm_group_norm_silu(
        data_ptr(x),
        data_ptr(skip),
        data_ptr(add),
        data_ptr(weight),
        data_ptr(bias),
        data_ptr(y),
        data_ptr(workspace),
        size.value,
        N,
        C1,
        C,
        H,
        W,
        num_groups,
        *(add.stride() if add is not None else (0, 0)),
        eps,
        int(silu),
        int(fmt == torch.channels_last),
        DTYPE_CODES[x.dtype],
        DTYPE_CODES[add.dtype] if add is not None else 0,
        DTYPE_CODES[weight.dtype],
        stream,
    )
    check_status(lib, status, "group_norm_silu")
    return y


def group_norm_silu_plan(
    lib: ctypes.CDLL,
    shape: tuple[int, int, int, int],
    num_groups: int,
    channels_last: bool,
    dtype: torch.dtype,
    x_channels: int | None = None,
) -> dict[str, int]:
    """What fastddpm_group_norm_silu launches for h of `shape` (N, C, H, W), 16-byte aligned, the
    first `x_channels` (default: all C) read from x and the rest from skip: groups_per_block,
    blocks, threads (per block) and vector_bytes (of each access to x, skip and y)."""
    N, C, H, W = shape
    values = [ctypes.c_int64() for _ in range(4)]
    status = lib.fastddpm_group_norm_silu_plan(
        N,
        C if x_channels is None else x_channels,
        C,
        H,
        W,
        num_groups,
        int(channels_last),
        DTYPE_CODES[dtype],
        *(ctypes.byref(v) for v in values),
    )
    check_status(lib, status, "group_norm_silu_plan")
    names = ("groups_per_block", "blocks", "threads", "vector_bytes")
    return dict(zip(names, (v.value for v in values), strict=True))


# --- the custom op: the launcher on the current stream of x's device ------------------------------


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    silu: bool,
    add: torch.Tensor | None,
    skip: torch.Tensor | None,
) -> torch.Tensor:
    with torch.cuda.device(x.device):
        return launch_group_norm_silu(
            library(), x, weight, bias, num_groups, eps, silu, add, stream_of(x.device), skip
        )


custom_ops.define(
    "fastddpm_cuda::group_norm_silu",
    _forward,
    fake=custom_ops.norm_output,
    reference=reference.group_norm_silu,
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
) -> torch.Tensor:
    """y = SiLU(GroupNorm(cat(x, skip) + add[:, :, None, None])): csrc/include/fastddpm/group_norm_silu.cuh.
    The reference's signature; inputs checked by fastddpm.ops."""
    check(x, weight, bias, num_groups, add, skip)
    return torch.ops.fastddpm_cuda.group_norm_silu(x, weight, bias, num_groups, float(eps), silu, add, skip)
