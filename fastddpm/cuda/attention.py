"""attention on the CUDA library (csrc/attention.cu): its limits, the launcher, the custom op
torch.ops.fastddpm_cuda.attention and the function fastddpm.ops calls."""

from __future__ import annotations

import ctypes

import torch

from .. import custom_ops, reference
from ._library import (
    DTYPE_CODES,
    MAX_HEAD_DIM,
    MAX_QUERY_POSITIONS,
    check_cuda,
    check_status,
    data_ptr,
    library,
    stream_of,
)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What only this library imposes (fastddpm.ops checks the rest)."""
    check_cuda("attention", q=q, k=k, v=v)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the cuda attention takes head dims up to {MAX_HEAD_DIM}; got D = {q.shape[-1]}")
    if q.shape[2] > MAX_QUERY_POSITIONS:
        raise ValueError(
            f"the cuda attention takes up to {MAX_QUERY_POSITIONS} query positions; got {q.shape[2]}"
        )


def _row_major_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of D contiguous elements; other strides are free."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def launch_attention(
    lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, stream: int | None
) -> torch.Tensor:
    """Marshal the tensors for fastddpm_attention and launch it on `stream` (a cudaStream_t)."""
    q, k, v = _row_major_last(q), _row_major_last(k), _row_major_last(v)
    B, heads, Lq, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)

    def strides(t: torch.Tensor):
        return (ctypes.c_int64 * 3)(*t.stride()[:3])

    status = lib.fastddpm_attention(
        data_ptr(q),
        data_ptr(k),
        data_ptr(v),
        data_ptr(out),
        B,
        heads,
        Lq,
        k.shape[2],
        D,
        strides(q),
        strides(k),
        strides(v),
        scale,
        DTYPE_CODES[q.dtype],
        stream,
    )
    check_status(lib, status, "attention")
    return out


def attention_plan(lib: ctypes.CDLL, D: int, dtype: torch.dtype) -> dict[str, int]:
    """What fastddpm_attention launches for head dim D in dtype: head_dim_tile (the padded head dim
    the kernel computes with), rows_per_block and threads (per block)."""
    values = [ctypes.c_int64() for _ in range(3)]
    status = lib.fastddpm_attention_plan(D, DTYPE_CODES[dtype], *(ctypes.byref(v) for v in values))
    check_status(lib, status, "attention_plan")
    return dict(zip(("head_dim_tile", "rows_per_block", "threads"), (v.value for v in values), strict=True))


# --- the custom op: the launcher on the current stream of q's device ------------------------------


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    with torch.cuda.device(q.device):
        return launch_attention(library(), q, k, v, scale, stream_of(q.device))


custom_ops.define(
    "fastddpm_cuda::attention",
    _forward,
    fake=lambda q, *_: q.new_empty(q.shape),
    reference=reference.attention,
)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v: csrc/include/fastddpm/attention.cuh. The reference's signature;
    inputs checked by fastddpm.ops."""
    check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.fastddpm_cuda.attention(q, k, v, scale)
