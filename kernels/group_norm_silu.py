"""Fused GroupNorm (+ time-embedding add) (+ SiLU) in Triton: y = SiLU(GN(x + add[:, :, None, None])).

x (N, C, H, W) contiguous or channels_last, fp32/fp16/bf16; weight, bias (C,); add (N, C) or None.
Statistics are fp32: each tile is reduced two-pass on chip (its mean, then the squared deviations
about it) and tiles are merged with Chan's parallel formula, about a shift (the first tile's mean)
so the running mean stays small; no E[x^2] - E[x]^2 anywhere. The output is (h - mean) * rstd * w
+ b, centred before scaling, so a mean far from zero costs no precision.

A group is Cg = C / G channels by HW = H * W positions, walked in tiles of BLOCK_C x BLOCK_HW.
Three ways to run it, picked by `_plan` from the shape:

- fused, one tile: one program per (n, g) holds the whole group on chip; x is read once.
- fused, looped: one program per (n, g) loops over the tiles twice (statistics, then apply).
- split: when N * G programs cannot fill the GPU and a group is larger than one tile, each group's
  tiles are dealt to SPLIT programs: `_gn_stats_kernel` writes per-chunk (count, mean, M2), and
  `_gn_apply_kernel` merges them and normalizes its chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_device, device_guard, memory_format_of, next_pow2, num_sms

# Largest tile (elements, padded to powers of two) one program holds on chip in one piece, and the
# tile a looping program walks with.
ONE_TILE_MAX = 16384
LOOP_TILE = 4096


@triton.jit
def _tile(
    x_ptr,
    add_ptr,
    x_base,
    add_base,
    stride_add_c,
    tile,
    n_hw_tiles,
    Cg,
    HW,
    C,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """Tile `tile` of a group: h = x + add (fp32, 0 where masked), its mask, offsets and channels."""
    c = (tile // n_hw_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (tile % n_hw_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < Cg
    mask = c_ok[:, None] & (hw < HW)[None, :]
    if CHANNELS_LAST:
        offs = hw[None, :] * C + c[:, None]
    else:
        offs = c[:, None] * HW + hw[None, :]
    h = tl.load(x_ptr + x_base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        a = tl.load(add_ptr + add_base + c * stride_add_c, mask=c_ok, other=0.0).to(tl.float32)
        h = tl.where(mask, h + a[:, None], 0.0)
    return h, mask, offs, c


@triton.jit
def _tile_stats(h, mask):
    """Count, mean and M2 (sum of squared deviations about the mean) of a tile's valid elements."""
    count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
    mean = tl.sum(tl.sum(h, axis=1), axis=0) / count
    d = tl.where(mask, h - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    return count, mean, m2


@triton.jit
def _merge(count, mean, m2, count_b, mean_b, m2_b):
    """Chan et al.'s pairwise update of (count, mean, M2) with another chunk's."""
    total = count + count_b
    delta = mean_b - mean
    mean = mean + delta * (count_b / total)
    m2 = m2 + m2_b + delta * delta * (count * count_b / total)
    return total, mean, m2


@triton.jit
def _chunk_stats(
    x_ptr,
    add_ptr,
    x_base,
    add_base,
    stride_add_c,
    first,
    last,
    n_hw_tiles,
    Cg,
    HW,
    C,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """(count, mean, M2) over tiles [first, last) of a group. The first tile's mean is the shift the
    later tiles are reduced and merged about, so the running mean stays small and exact in fp32."""
    h, mask, offs, c = _tile(
        x_ptr, add_ptr, x_base, add_base, stride_add_c, first, n_hw_tiles, Cg, HW, C,
        BLOCK_C, BLOCK_HW, CHANNELS_LAST, HAS_ADD,
    )  # fmt: skip
    count, shift, m2 = _tile_stats(h, mask)
    mean = 0.0
    for tile in range(first + 1, last):
        h, mask, offs, c = _tile(
            x_ptr, add_ptr, x_base, add_base, stride_add_c, tile, n_hw_tiles, Cg, HW, C,
            BLOCK_C, BLOCK_HW, CHANNELS_LAST, HAS_ADD,
        )  # fmt: skip
        count_b, mean_b, m2_b = _tile_stats(tl.where(mask, h - shift, 0.0), mask)
        count, mean, m2 = _merge(count, mean, m2, count_b, mean_b, m2_b)
    return count, shift + mean, m2


@triton.jit
def _apply_tile(
    h,
    mask,
    offs,
    c,
    y_ptr,
    y_base,
    w_ptr,
    b_ptr,
    c0,
    Cg,
    mean,
    rstd,
    SILU: tl.constexpr,
):
    """y = (h - mean) * rstd * w + b, then SiLU; stored in y's dtype."""
    c_ok = c < Cg
    w = tl.load(w_ptr + c0 + c, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c0 + c, mask=c_ok, other=0.0).to(tl.float32)
    scale = w * rstd
    y = (h - mean) * scale[:, None] + b[:, None]  # centred first: no cancellation when |mean| >> std
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + y_base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bases(pid_group, G, C, HW, Cg, stride_add_n, CHANNELS_LAST: tl.constexpr):
    """Offsets of group pid_group = n * G + g: into x/y, into add, and its first channel."""
    n = pid_group // G
    g = pid_group % G
    c0 = g * Cg
    if CHANNELS_LAST:
        x_base = n.to(tl.int64) * C * HW + c0
    else:
        x_base = n.to(tl.int64) * C * HW + c0.to(tl.int64) * HW
    add_base = n.to(tl.int64) * stride_add_n + c0
    return x_base, add_base, c0


@triton.jit
def _gn_fused_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    add_ptr,
    y_ptr,
    G,
    C,
    HW,
    Cg,
    stride_add_n,
    stride_add_c,
    n_hw_tiles,
    num_tiles,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ONE_TILE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_ADD: tl.constexpr,
    SILU: tl.constexpr,
):
    """One program per (n, g). Grid: (N * G,)."""
    pid = tl.program_id(0)
    x_base, add_base, c0 = _bases(pid, G, C, HW, Cg, stride_add_n, CHANNELS_LAST)
    if ONE_TILE:
        h, mask, offs, c = _tile(
            x_ptr, add_ptr, x_base, add_base, stride_add_c, 0, 1, Cg, HW, C,
            BLOCK_C, BLOCK_HW, CHANNELS_LAST, HAS_ADD,
        )  # fmt: skip
        count, mean, m2 = _tile_stats(h, mask)
        rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
        _apply_tile(h, mask, offs, c, y_ptr, x_base, w_ptr, b_ptr, c0, Cg, mean, rstd, SILU)
    else:
        count, mean, m2 = _chunk_stats(
            x_ptr, add_ptr, x_base, add_base, stride_add_c, 0, num_tiles, n_hw_tiles, Cg, HW, C,
            BLOCK_C, BLOCK_HW, CHANNELS_LAST, HAS_ADD,
        )  # fmt: skip
        rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
        for tile in range(0, num_tiles):
            h, mask, offs, c = _tile(
                x_ptr, add_ptr, x_base, add_base, stride_add_c, tile, n_hw_tiles, Cg, HW, C,
                BLOCK_C, BLOCK_HW, CHANNELS_LAST, HAS_ADD,
            )  # fmt: skip
            _apply_tile(h, mask, offs, c, y_ptr, x_base, w_ptr, b_ptr, c0, Cg, mean, rstd, SILU)


@triton.jit
def _gn_stats_kernel(
    x_ptr,
    add_ptr,
    partial_ptr,
    G,
    C,
    HW,
    Cg,
    stride_add_n,
    stride_add_c,
    n_hw_tiles,
    num_tiles,
    tiles_per_split,
    SPLIT,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_ADD: tl.constexpr,
):
    """(count, mean, M2) of chunk s of group (n, g) -> partial[n * G + g, s, :]. Grid: (N * G, SPLIT)."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    x_base, add_base, c0 = _bases(pid, G, C, HW, Cg, stride_add_n, CHANNELS_LAST)
    first = s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    count, mean, m2 = _chunk_stats(
        x_ptr, add_ptr, x_base, add_base, stride_add_c, first, last, n_hw_tiles, Cg, HW, C,
        BLOCK_C, BLOCK_HW, CHANNELS_LAST, HAS_ADD,
    )  # fmt: skip
    out = partial_ptr + (pid.to(tl.int64) * SPLIT + s) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _gn_apply_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    add_ptr,
    y_ptr,
    partial_ptr,
    G,
    C,
    HW,
    Cg,
    stride_add_n,
    stride_add_c,
    n_hw_tiles,
    num_tiles,
    tiles_per_split,
    SPLIT,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_ADD: tl.constexpr,
    SILU: tl.constexpr,
):
    """Merge the group's SPLIT partials, then normalize chunk s. Grid: (N * G, SPLIT)."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    x_base, add_base, c0 = _bases(pid, G, C, HW, Cg, stride_add_n, CHANNELS_LAST)
    k = tl.arange(0, BLOCK_SPLIT)
    parts = partial_ptr + (pid.to(tl.int64) * SPLIT + k) * 3
    k_ok = k < SPLIT
    counts = tl.load(parts, mask=k_ok, other=0.0)
    means = tl.load(parts + 1, mask=k_ok, other=0.0)
    m2s = tl.load(parts + 2, mask=k_ok, other=0.0)
    count = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / count
    d = means - mean
    m2 = tl.sum(m2s, axis=0) + tl.sum(counts * d * d, axis=0)
    rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
    first = s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        h, mask, offs, c = _tile(
            x_ptr, add_ptr, x_base, add_base, stride_add_c, tile, n_hw_tiles, Cg, HW, C,
            BLOCK_C, BLOCK_HW, CHANNELS_LAST, HAS_ADD,
        )  # fmt: skip
        _apply_tile(h, mask, offs, c, y_ptr, x_base, w_ptr, b_ptr, c0, Cg, mean, rstd, SILU)


@dataclass(frozen=True)
class Plan:
    """How one call runs: tile shape, path (split = 1: fused) and warps."""

    block_c: int
    block_hw: int
    split: int
    tiles_per_split: int
    num_tiles: int
    n_hw_tiles: int
    num_warps: int

    @property
    def one_tile(self) -> bool:
        return self.num_tiles == 1


def plan(
    N: int,
    C: int,
    HW: int,
    num_groups: int,
    device: torch.device,
    *,
    split: int | None = None,
    tile: int | None = None,
) -> Plan:
    """The launch for a shape: one tile per group when it fits, else LOOP_TILE-sized tiles; split
    groups over programs when N * G programs cannot fill the GPU (at least one program per SM).

    `split` and `tile` (elements per tile, a power of two) override the heuristic, for tests.
    """
    Cg = C // num_groups
    one_tile = next_pow2(Cg) * next_pow2(HW)
    tile = tile or (one_tile if one_tile <= ONE_TILE_MAX else LOOP_TILE)
    block_c = min(next_pow2(Cg), tile)
    block_hw = min(next_pow2(HW), max(tile // block_c, 1))
    n_hw_tiles = triton.cdiv(HW, block_hw)
    num_tiles = triton.cdiv(Cg, block_c) * n_hw_tiles
    groups = N * num_groups
    if split is None:
        split = 1 if num_tiles == 1 or groups >= num_sms(device) else triton.cdiv(2 * num_sms(device), groups)
    split = max(1, min(split, num_tiles))
    tiles_per_split = triton.cdiv(num_tiles, split)
    split = triton.cdiv(num_tiles, tiles_per_split)  # every chunk gets at least one tile
    num_warps = min(16, max(2, block_c * block_hw // 512))  # 16 elements per thread up to 16 warps
    return Plan(block_c, block_hw, split, tiles_per_split, num_tiles, n_hw_tiles, num_warps)


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float = 1e-6,
    *,
    silu: bool = True,
    add: torch.Tensor | None = None,
    split: int | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Launch the kernels; x (N, C, H, W) -> y of x's shape, dtype and memory format.

    Inputs are assumed checked by `fastddpm.ops` (and `check_group_norm_silu`).
    """
    N, C, H, W = x.shape
    HW = H * W
    fmt = memory_format_of(x)
    channels_last = fmt == torch.channels_last
    if not channels_last:
        x = x.contiguous()
    y = torch.empty_like(x, memory_format=fmt)
    if x.numel() == 0:
        return y
    weight, bias = weight.contiguous(), bias.contiguous()
    has_add = add is not None
    add_arg = add if has_add else x  # a dummy pointer, never read
    stride_add_n, stride_add_c = add.stride() if has_add else (0, 0)
    p = plan(N, C, HW, num_groups, x.device, split=split, tile=tile)
    Cg = C // num_groups
    common = dict(BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, CHANNELS_LAST=channels_last, HAS_ADD=has_add)
    groups = N * num_groups
    with device_guard(x.device):
        if p.split == 1:
            _gn_fused_kernel[(groups,)](
                x, weight, bias, add_arg, y, num_groups, C, HW, Cg, stride_add_n, stride_add_c,
                p.n_hw_tiles, p.num_tiles, eps,
                ONE_TILE=p.one_tile, SILU=silu, num_warps=p.num_warps, **common,
            )  # fmt: skip
            return y
        partial = torch.empty((groups, p.split, 3), device=x.device, dtype=torch.float32)
        _gn_stats_kernel[(groups, p.split)](
            x, add_arg, partial, num_groups, C, HW, Cg, stride_add_n, stride_add_c,
            p.n_hw_tiles, p.num_tiles, p.tiles_per_split, p.split,
            num_warps=p.num_warps, **common,
        )  # fmt: skip
        _gn_apply_kernel[(groups, p.split)](
            x, weight, bias, add_arg, y, partial, num_groups, C, HW, Cg, stride_add_n, stride_add_c,
            p.n_hw_tiles, p.num_tiles, p.tiles_per_split, p.split, eps,
            BLOCK_SPLIT=next_pow2(p.split), SILU=silu, num_warps=p.num_warps, **common,
        )  # fmt: skip
    return y


def check_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add) -> None:
    """What only this kernel imposes (fastddpm.ops checks the rest): a device Triton runs on."""
    check_device("group_norm_silu", x=x, weight=weight, bias=bias, add=add)
