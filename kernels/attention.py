"""Flash attention in Triton for DDPM's blocks: softmax(q k^T * scale) v over (B, heads, L, D).

q (B, H, Lq, D), k and v (B, H, Lk, D), any strides, fp32/fp16/bf16 -> (B, H, Lq, D) contiguous.
Online softmax (base 2) with fp32 statistics and accumulator. D is not limited to 256:

- q k^T is accumulated over D in chunks of BLOCK_DK, so q and k never need to fit whole;
- the output is computed in column chunks of BLOCK_DV (grid axis), each recomputing the scores,
  so the fp32 accumulator BLOCK_M x BLOCK_DV stays in registers at D = 512;
- when the (query block, head, column chunk) programs cannot fill the GPU, the keys are split over
  KV_SPLITS programs too; each writes its normalized partial output and log-sum-exp, and
  `_attn_combine_kernel` merges them.

Ragged Lq, Lk and D are masked. fp32 inputs multiply with 3xTF32 on tensor cores ("tf32x3",
fp32-accurate); fp16/bf16 inputs multiply natively with P rounded to the input dtype, as in
FlashAttention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastddpm import custom_ops, reference

from ._common import INTERPRET, check_device, device_guard, next_pow2, num_sms

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    part_ptr,
    lse_ptr,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    H,
    Lq,
    Lk,
    D,
    qk_scale,
    keys_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    NUM_DK: tl.constexpr,
    NUM_DV: tl.constexpr,
    SPLIT_KV: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Rows [m*BLOCK_M, +BLOCK_M) x columns chunk dv of head bh over keys of split s.

    Grid: (cdiv(Lq, BLOCK_M), B * H, KV_SPLITS * NUM_DV). Without SPLIT_KV the output is written
    to o (B, H, Lq, D) at o's strides; with it, part[s, bh, m, d] (fp32, normalized) and lse[s, bh, m].
    """
    # This program: query block pid_m of head bh = b * H + h, output column chunk dv, key split s.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    pid_z = tl.program_id(2)
    s = pid_z // NUM_DV
    dv = pid_z % NUM_DV
    b = bh // H
    h = bh % H
    # Base pointers of head (b, h) in q, k and v.
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh

    # Query rows, head-dim chunk of q k^T, output columns, and the keys of one step.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    dk = tl.arange(0, BLOCK_DK)
    cols = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < D
    keys = tl.arange(0, BLOCK_N)

    if NUM_DK == 1:  # all of q's row block stays in registers for the whole key loop
        q_mask = row_ok[:, None] & (dk < D)[None, :]
        q = tl.load(q_base + rows[:, None] * sql + dk[None, :] * sqd, mask=q_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

    # Online softmax state per row: running max m_i and sum l_i (base 2), unnormalized output acc.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Walk keys [lo, hi) of split s, BLOCK_N at a time.
    lo = s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Lk)
    for start in range(lo, hi, BLOCK_N):
        n = start + keys
        key_ok = n < hi
        # scores = q k^T, [BLOCK_M, BLOCK_N]: in one dot, or accumulated over head-dim chunks.
        if NUM_DK == 1:
            kt = tl.load(
                k_base + n[None, :] * skl + dk[:, None] * skd,
                mask=key_ok[None, :] & (dk < D)[:, None],
                other=0.0,
            )
            if DOT_F32:
                kt = kt.to(tl.float32)
            scores = tl.dot(q, kt, input_precision=PRECISION)
        else:
            scores = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c in range(0, NUM_DK):
                d = c * BLOCK_DK + dk
                d_ok = d < D
                qc = tl.load(
                    q_base + rows[:, None] * sql + d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                kt = tl.load(
                    k_base + n[None, :] * skl + d[:, None] * skd,
                    mask=key_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
                if DOT_F32:
                    qc = qc.to(tl.float32)
                    kt = kt.to(tl.float32)
                scores = tl.dot(qc, kt, acc=scores, input_precision=PRECISION)
        # Rescale the running sum and output to the new row max; p = 2^(scores - max).
        scores = tl.where(key_ok[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # acc = acc * alpha + p v over this chunk of output columns.
        v = tl.load(
            v_base + n[:, None] * svl + cols[None, :] * svd, mask=key_ok[:, None] & col_ok[None, :], other=0.0
        )
        p = p.to(v_ptr.dtype.element_ty)  # as FlashAttention: P in the input dtype (a no-op for fp32)
        if DOT_F32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc=acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # Normalize; a split writes its partial output and log-sum-exp for _attn_combine_kernel.
    out = acc / l_i[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_KV:
        row_index = (s * tl.num_programs(1) + bh).to(tl.int64) * Lq + rows
        tl.store(part_ptr + row_index[:, None] * D + cols[None, :], out, mask=mask)
        if dv == 0:  # one column chunk writes the row's log-sum-exp
            tl.store(lse_ptr + row_index, m_i + tl.log2(l_i), mask=row_ok)
    else:
        o_base = o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh
        o_offs = rows.to(tl.int64)[:, None] * sol + cols[None, :] * sod
        tl.store(o_base + o_offs, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_combine_kernel(
    part_ptr,
    lse_ptr,
    o_ptr,
    sob,
    soh,
    sol,
    sod,
    BH,
    H,
    Lq,
    D,
    SPLITS,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """o = sum_s 2^(lse_s - max) part_s / sum_s 2^(lse_s - max).

    Grid: (cdiv(Lq, BLOCK_M), BH, cdiv(D, BLOCK_D)).
    """
    # This program: query rows block pid_m of head bh, output columns chunk program_id(2).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    mask = row_ok[:, None] & (cols < D)[None, :]
    # The largest log-sum-exp of each row over the splits.
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, SPLITS):
        lse = tl.load(lse_ptr + (s * BH + bh).to(tl.int64) * Lq + rows, mask=row_ok, other=0.0)
        lse_max = tl.maximum(lse_max, lse)
    # Each split's partial output, weighted by its share 2^(lse_s - max) of the row's sum.
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, SPLITS):
        row_index = (s * BH + bh).to(tl.int64) * Lq + rows
        w = tl.exp2(tl.load(lse_ptr + row_index, mask=row_ok, other=0.0) - lse_max)
        part = tl.load(part_ptr + row_index[:, None] * D + cols[None, :], mask=mask, other=0.0)
        acc += w[:, None] * part
        total += w
    # o = the weighted sum over the sum of the weights, in o's dtype, at o's strides.
    o_base = o_ptr + (bh // H).to(tl.int64) * sob + (bh % H).to(tl.int64) * soh
    out = acc / total[:, None]
    o_offs = rows.to(tl.int64)[:, None] * sol + cols[None, :] * sod
    tl.store(o_base + o_offs, out.to(o_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Plan:
    """Tiles, warps and the key split of one launch."""

    block_m: int
    block_n: int
    block_dk: int
    block_dv: int
    kv_splits: int
    keys_per_split: int
    num_warps: int
    num_stages: int

    def num_dk(self, D: int) -> int:
        return triton.cdiv(D, self.block_dk)

    def num_dv(self, D: int) -> int:
        return triton.cdiv(D, self.block_dv)


def plan(
    BH: int,
    Lq: int,
    Lk: int,
    D: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    kv_splits: int | None = None,
    blocks: tuple[int, int, int, int] | None = None,
) -> Plan:
    """Tiles by head dim and dtype, chosen so that no production configuration spills registers on
    sm_90 (ptxas -v, `python -m tests.test_triton_gpu_compile`); keys are split when fewer programs
    than SMs would run. `kv_splits` and `blocks` = (BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV) override
    the heuristic, for tests.
    """
    d_pad = max(16, next_pow2(D))
    if blocks is not None:
        block_m, block_n, block_dk, block_dv = blocks
    elif dtype == torch.float32:  # 3xTF32 triples the operands: thin q k^T chunks, 128 columns
        block_m, block_n, block_dk, block_dv = 64, 32 if d_pad > 16 else 64, 16, min(d_pad, 128)
    else:  # q stays in registers up to D = 256; beyond, q k^T runs in chunks of 64
        block_m, block_n = 64, 64 if d_pad <= 64 else 32
        block_dk, block_dv = d_pad if d_pad <= 256 else 64, min(d_pad, 256)
    num_warps = 8 if block_m * block_dv >= 64 * 128 else 4
    programs = triton.cdiv(Lq, block_m) * BH * triton.cdiv(D, block_dv)
    if kv_splits is None:
        kv_splits = triton.cdiv(num_sms(device), programs) if programs < num_sms(device) else 1
        kv_splits = min(kv_splits, triton.cdiv(Lk, max(block_n, 64)))
    key_blocks = triton.cdiv(Lk, block_n)
    kv_splits = max(1, min(kv_splits, key_blocks))
    keys_per_split = triton.cdiv(key_blocks, kv_splits) * block_n
    kv_splits = triton.cdiv(Lk, keys_per_split)  # no split is empty
    return Plan(block_m, block_n, block_dk, block_dv, kv_splits, keys_per_split, num_warps, 2)


def launch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    kv_splits: int | None = None,
    blocks: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Launch; q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D) in q's dtype, laid out as
    (B, Lq, H, D) is contiguously (`out_like`): the heads interleaved per query, so that
    o.transpose(1, 2).reshape(B, Lq, H * D) is a view."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if scale is None:
        scale = D**-0.5
    out = out_like(q)
    if out.numel() == 0:
        return out
    if Lk == 0:
        raise ValueError("attention (backend 'triton'): k and v have no keys (Lk = 0); softmax is undefined")
    p = plan(B * H, Lq, Lk, D, q.dtype, q.device, kv_splits=kv_splits, blocks=blocks)
    num_dv = p.num_dv(D)
    split = p.kv_splits > 1
    if split:
        part = torch.empty((p.kv_splits, B * H, Lq, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((p.kv_splits, B * H, Lq), device=q.device, dtype=torch.float32)
    else:
        part = lse = out  # dummies, never touched
    with device_guard(q.device):
        grid = (triton.cdiv(Lq, p.block_m), B * H, p.kv_splits * num_dv)
        _attn_fwd_kernel[grid](
            q, k, v, out, part, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, Lq, Lk, D, float(scale) * LOG2E, p.keys_per_split,
            BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_DK=p.block_dk, BLOCK_DV=p.block_dv,
            NUM_DK=p.num_dk(D), NUM_DV=num_dv, SPLIT_KV=split,
            # The interpreter's dot mishandles bf16: there, bf16 operands go to fp32 after rounding.
            DOT_F32=INTERPRET and q.dtype == torch.bfloat16,
            PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
            num_warps=p.num_warps, num_stages=p.num_stages,
        )  # fmt: skip
        if split:
            block_d = min(next_pow2(D), 128)
            grid = (triton.cdiv(Lq, 32), B * H, triton.cdiv(D, block_d))
            _attn_combine_kernel[grid](
                part, lse, out, *out.stride(), B * H, H, Lq, D, p.kv_splits, BLOCK_M=32, BLOCK_D=block_d
            )
    return out


def out_like(q: torch.Tensor) -> torch.Tensor:
    """An uninitialized output for q (B, H, Lq, D): (B, H, Lq, D) viewed from (B, Lq, H, D) contiguous."""
    B, H, Lq, D = q.shape
    return torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    """What only this kernel imposes (fastddpm.ops checks the rest)."""
    check_device("attention", q=q, k=k, v=v)
    if k.shape[2] == 0:
        raise ValueError("attention (backend 'triton'): k and v have no keys (Lk = 0); softmax is undefined")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"attention (backend 'triton'): scale must be finite, got {scale}")


# --- the custom op torch.ops.fastddpm_triton.attention ---------------------------------------------


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return launch_attention(q, k, v, scale)


custom_ops.define(
    "fastddpm_triton::attention",
    _forward,
    fake=lambda q, *_: out_like(q),
    reference=reference.attention,
)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v through the custom op. The reference's signature; inputs checked
    by fastddpm.ops."""
    check_attention(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.fastddpm_triton.attention(q, k, v, scale)
