"""Fused GroupNorm (+ time-embedding add) (+ SiLU) in Triton: y = SiLU(GN(x + add[:, :, None, None])),
x optionally the channel concatenation of two tensors (x, skip), read from each in place.

x (N, C, H, W) contiguous or channels_last, fp32/fp16/bf16; weight, bias (C,); add (N, C) or None.
Statistics are fp32: each tile is reduced two-pass on chip (its mean, then the squared deviations
about it) and tiles are merged with Chan's parallel formula, about a shift (the first tile's mean)
so the running mean stays small; no E[x^2] - E[x]^2 anywhere. The output is (h - mean) * rstd * w
+ b, centred before scaling, so a mean far from zero costs no precision.

NCHW: a group is Cg = C / G channels by HW = H * W positions, contiguous, walked by one program
per (n, g) in tiles of BLOCK_C x BLOCK_HW.

NHWC (channels_last): a group's channels are Cg of the C contiguous channels of every position,
so one program covers GPP whole groups side by side, GPP * Cg channels chosen to span a multiple
of 16 bytes: its tiles are [BLOCK_HW positions, BLOCK_CH channels], channels fastest, each row
one contiguous run that the compiler loads 16 bytes per thread (given 16-byte aligned pointers
and C * itemsize a multiple of 16). Column sums are reduced per group (channel j belongs to
group j // Cg of the program) and the groups' statistics broadcast back to their channels.

Three ways to run either layout, picked by `plan` from the shape:

- fused, one tile: one program holds its groups whole on chip; x is read once.
- fused, looped: one program loops over its tiles twice (statistics, then apply).
- split: when the programs cannot fill the GPU and a group is larger than one tile, each
  program's tiles are dealt to SPLIT programs: a statistics kernel writes per-chunk (count,
  mean, M2) of each group, and an apply kernel merges them and normalizes its chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastddpm import custom_ops, reference

from ._common import check_device, device_guard, memory_format_of, next_pow2, num_sms

# Largest tile (elements, padded to powers of two) one program holds on chip in one piece, and the
# tile a looping program walks with.
ONE_TILE_MAX = 16384
LOOP_TILE = 4096
# Bytes of each NHWC tile row the plan aims for (two 32-byte sectors), where the groups allow.
ROW_BYTES = 64


@triton.jit
def _merge(count, mean, m2, count_b, mean_b, m2_b):
    """Chan et al.'s pairwise update of (count, mean, M2) with another chunk's."""
    total = count + count_b
    delta = mean_b - mean
    mean = mean + delta * (count_b / total)
    m2 = m2 + m2_b + delta * delta * (count * count_b / total)
    return total, mean, m2


@triton.jit
def _silu(y, SILU: tl.constexpr):
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


# --- NCHW: one program per group ----------------------------------------------------------------


@triton.jit
def _tile(
    x_group,
    skip_group,
    c1,
    add_group,
    stride_add_c,
    tile,
    n_hw_tiles,
    Cg,
    HW,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):
    """Tile `tile` of a group whose first element of x is x_group (of add: add_group): h = x + add
    (fp32, 0 where masked), its mask, its offsets from x_group and its channels within the group.
    With HAS_SKIP the group's channels from c1 on are skip's (c1 may be <= 0 or >= Cg), read at
    the same offsets from skip_group, its address of the group's first channel."""
    # [BLOCK_C channels, BLOCK_HW positions], tiles numbered channel block first.
    c = (tile // n_hw_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (tile % n_hw_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = c < Cg
    mask = c_ok[:, None] & (hw < HW)[None, :]
    offs = c[:, None] * HW + hw[None, :]
    # h = x + add[n, c], broadcast along the positions.
    if HAS_SKIP:
        from_x = (c < c1)[:, None]
        h = tl.load(x_group + offs, mask=mask & from_x, other=0.0).to(tl.float32)
        h += tl.load(skip_group + offs, mask=mask & ~from_x, other=0.0).to(tl.float32)
    else:
        h = tl.load(x_group + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        a = tl.load(add_group + c * stride_add_c, mask=c_ok, other=0.0).to(tl.float32)
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
def _chunk_stats(
    x_group,
    skip_group,
    c1,
    add_group,
    stride_add_c,
    first,
    last,
    n_hw_tiles,
    Cg,
    HW,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):
    """(count, mean, M2) over tiles [first, last) of a group. The first tile's mean is the shift the
    later tiles are reduced and merged about, so the running mean stays small and exact in fp32."""
    h, mask, offs, c = _tile(
        x_group, skip_group, c1, add_group, stride_add_c, first, n_hw_tiles, Cg, HW, BLOCK_C, BLOCK_HW,
        HAS_ADD, HAS_SKIP
    )  # fmt: skip
    count, shift, m2 = _tile_stats(h, mask)
    mean = 0.0
    for tile in range(first + 1, last):
        h, mask, offs, c = _tile(
            x_group, skip_group, c1, add_group, stride_add_c, tile, n_hw_tiles, Cg, HW, BLOCK_C, BLOCK_HW,
            HAS_ADD, HAS_SKIP
        )  # fmt: skip
        count_b, mean_b, m2_b = _tile_stats(tl.where(mask, h - shift, 0.0), mask)
        count, mean, m2 = _merge(count, mean, m2, count_b, mean_b, m2_b)
    return count, shift + mean, m2


@triton.jit
def _apply_tile(h, mask, offs, c, y_group, w_group, b_group, Cg, mean, rstd, SILU: tl.constexpr):
    """y = (h - mean) * rstd * w + b, then SiLU; stored in y's dtype at y_group + offs. w_group,
    b_group: the group's first channel of weight and bias."""
    c_ok = c < Cg
    w = tl.load(w_group + c, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(b_group + c, mask=c_ok, other=0.0).to(tl.float32)
    scale = w * rstd
    y = _silu((h - mean) * scale[:, None] + b[:, None], SILU)  # centred first: no cancellation
    tl.store(y_group + offs, y.to(y_group.dtype.element_ty), mask=mask)


@triton.jit
def _bases(pid_group, G, C, C1, HW, Cg, stride_add_n):
    """Offsets of group pid_group = n * G + g: into y, into x (C1 channels) and skip (C - C1;
    negative where the group starts in x), into add, and its first channel."""
    n = pid_group // G
    g = pid_group % G
    c0 = g * Cg
    n64, c64 = n.to(tl.int64), c0.to(tl.int64)
    y_base = n64 * C * HW + c64 * HW
    x_base = n64 * C1 * HW + c64 * HW
    skip_base = n64 * (C - C1) * HW + (c64 - C1) * HW
    add_base = n64 * stride_add_n + c0
    return y_base, x_base, skip_base, add_base, c0


@triton.jit
def _gn_fused_kernel(
    x_ptr,
    skip_ptr,
    w_ptr,
    b_ptr,
    add_ptr,
    y_ptr,
    G,
    C,
    C1,
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
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    SILU: tl.constexpr,
):
    """One program per (n, g). Grid: (N * G,)."""
    # The group's Cg x HW elements are contiguous in x and y; its add and parameters start at c0.
    y_base, x_base, skip_base, add_base, c0 = _bases(tl.program_id(0), G, C, C1, HW, Cg, stride_add_n)
    x_group, y_group, add_group = x_ptr + x_base, y_ptr + y_base, add_ptr + add_base
    skip_group, c1 = skip_ptr + skip_base, C1 - c0
    w_group, b_group = w_ptr + c0, b_ptr + c0
    if ONE_TILE:
        # The whole group in one tile: read x once, normalize it from registers.
        h, mask, offs, c = _tile(
            x_group, skip_group, c1, add_group, stride_add_c, 0, 1, Cg, HW, BLOCK_C, BLOCK_HW, HAS_ADD,
            HAS_SKIP
        )  # fmt: skip
        count, mean, m2 = _tile_stats(h, mask)
        rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
        _apply_tile(h, mask, offs, c, y_group, w_group, b_group, Cg, mean, rstd, SILU)
    else:
        # The group's statistics over all its tiles, then a second pass normalizes each tile.
        count, mean, m2 = _chunk_stats(
            x_group, skip_group, c1, add_group, stride_add_c, 0, num_tiles, n_hw_tiles, Cg, HW, BLOCK_C,
            BLOCK_HW, HAS_ADD, HAS_SKIP
        )  # fmt: skip
        rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
        for tile in range(0, num_tiles):
            h, mask, offs, c = _tile(
                x_group, skip_group, c1, add_group, stride_add_c, tile, n_hw_tiles, Cg, HW, BLOCK_C,
                BLOCK_HW, HAS_ADD, HAS_SKIP
            )  # fmt: skip
            _apply_tile(h, mask, offs, c, y_group, w_group, b_group, Cg, mean, rstd, SILU)


@triton.jit
def _gn_stats_kernel(
    x_ptr,
    skip_ptr,
    add_ptr,
    partial_ptr,
    G,
    C,
    C1,
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
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):
    """(count, mean, M2) of chunk s of group (n, g) -> partial[n * G + g, s, :]. Grid: (N * G, SPLIT)."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    # The group's first element of x and of add.
    _, x_base, skip_base, add_base, c0 = _bases(pid, G, C, C1, HW, Cg, stride_add_n)
    x_group, add_group = x_ptr + x_base, add_ptr + add_base
    skip_group, c1 = skip_ptr + skip_base, C1 - c0
    # Chunk s: the group's tiles [s * tiles_per_split, +tiles_per_split).
    first = s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    count, mean, m2 = _chunk_stats(
        x_group, skip_group, c1, add_group, stride_add_c, first, last, n_hw_tiles, Cg, HW, BLOCK_C,
        BLOCK_HW, HAS_ADD, HAS_SKIP
    )  # fmt: skip
    # partial[pid, s] = (count, mean, M2).
    out = partial_ptr + (pid.to(tl.int64) * SPLIT + s) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _gn_apply_kernel(
    x_ptr,
    skip_ptr,
    w_ptr,
    b_ptr,
    add_ptr,
    y_ptr,
    partial_ptr,
    G,
    C,
    C1,
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
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    SILU: tl.constexpr,
):
    """Merge the group's SPLIT partials, then normalize chunk s. Grid: (N * G, SPLIT)."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    y_base, x_base, skip_base, add_base, c0 = _bases(pid, G, C, C1, HW, Cg, stride_add_n)
    x_group, y_group, add_group = x_ptr + x_base, y_ptr + y_base, add_ptr + add_base
    skip_group, c1 = skip_ptr + skip_base, C1 - c0
    w_group, b_group = w_ptr + c0, b_ptr + c0
    # The group's statistics: its SPLIT chunks' (count, mean, M2) merged in one step.
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
    # Normalize the tiles of chunk s.
    first = s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        h, mask, offs, c = _tile(
            x_group, skip_group, c1, add_group, stride_add_c, tile, n_hw_tiles, Cg, HW, BLOCK_C, BLOCK_HW,
            HAS_ADD, HAS_SKIP
        )  # fmt: skip
        _apply_tile(h, mask, offs, c, y_group, w_group, b_group, Cg, mean, rstd, SILU)


# --- NHWC: one program per GPP groups side by side ----------------------------------------------


@triton.jit
def _nhwc_columns(pid, G, C, HW, CG: tl.constexpr, GPP: tl.constexpr, BLOCK_CH: tl.constexpr):
    """Program pid = n * cdiv(G, GPP) + block covers groups [block * GPP, +GPP) of sample n: its
    channels c, their mask, each column's group within the program, x's offset of sample n, and
    the program's first group in n * G + g numbering."""
    blocks = tl.cdiv(G, GPP)
    n = pid // blocks
    block = pid % blocks
    j = tl.arange(0, BLOCK_CH)
    c = block * (GPP * CG) + j
    c_ok = (j < GPP * CG) & (c < C)
    x_base = n.to(tl.int64) * HW * C
    return n, c, c_ok, j // CG, x_base, n * G + block * GPP


@triton.jit
def _nhwc_column(ptr, c, c_ok):
    """The program's columns of a per-channel vector (weight, bias, a row of add), fp32."""
    return tl.load(ptr + c, mask=c_ok, other=0.0).to(tl.float32)


@triton.jit
def _nhwc_add(add_ptr, n, c, c_ok, stride_add_n, stride_add_c, HAS_ADD: tl.constexpr):
    """add[n] at the program's columns (0 without add), fp32: loaded once, added to every tile."""
    if HAS_ADD:
        return _nhwc_column(add_ptr + n.to(tl.int64) * stride_add_n, c * stride_add_c, c_ok)
    return tl.zeros(c.shape, dtype=tl.float32)


@triton.jit
def _nhwc_tile(
    x_ptr,
    skip_ptr,
    n,
    C1,
    x_base,
    tile,
    c,
    c_ok,
    a,
    HW,
    C,
    BLOCK_HW: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):
    """Tile `tile` (positions tile * BLOCK_HW + [0, BLOCK_HW)) of sample n: h = x + add (fp32, 0
    where masked), its mask, offsets into y, and its number of valid positions. With HAS_SKIP
    channels c < C1 are x's (N, HW, C1) and the rest skip's (N, HW, C - C1)."""
    hw = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (hw < HW)[:, None] & c_ok[None, :]
    offs = x_base + hw[:, None] * C + c[None, :]  # each row: the program's channels, contiguous
    if HAS_SKIP:
        from_x = (c < C1)[None, :]
        n64, C2 = n.to(tl.int64), C - C1
        x_offs = n64 * HW * C1 + hw[:, None] * C1 + c[None, :]
        skip_offs = n64 * HW * C2 + hw[:, None] * C2 + (c - C1)[None, :]
        h = tl.load(x_ptr + x_offs, mask=mask & from_x, other=0.0).to(tl.float32)
        h += tl.load(skip_ptr + skip_offs, mask=mask & ~from_x, other=0.0).to(tl.float32)
    else:
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        h = tl.where(mask, h + a[None, :], 0.0)
    return h, mask, offs, tl.minimum(HW - tile * BLOCK_HW, BLOCK_HW).to(tl.float32)


@triton.jit
def _to_groups(v, group, BLOCK_G: tl.constexpr):
    """Per-group sums [BLOCK_G] of per-column values v [BLOCK_CH] (column j in group[j])."""
    k = tl.arange(0, BLOCK_G)
    return tl.sum(tl.where(group[:, None] == k[None, :], v[:, None], 0.0), axis=0)


@triton.jit
def _to_columns(g, group, BLOCK_G: tl.constexpr):
    """Each column's value [BLOCK_CH] of its group's g [BLOCK_G]."""
    k = tl.arange(0, BLOCK_G)
    return tl.sum(tl.where(group[:, None] == k[None, :], g[None, :], 0.0), axis=1)


@triton.jit
def _nhwc_tile_stats(h, mask, rows, group, CG: tl.constexpr, BLOCK_G: tl.constexpr):
    """Per group of the program: count, mean and M2 of the tile's valid elements, each [BLOCK_G],
    and the tile centred on its groups' means (0 where masked). Groups past the program's
    (padding, or past G) count like a full one and hold zeros."""
    count = tl.zeros([BLOCK_G], dtype=tl.float32) + rows * CG
    mean = _to_groups(tl.sum(h, axis=0), group, BLOCK_G) / count
    d = tl.where(mask, h - _to_columns(mean, group, BLOCK_G)[None, :], 0.0)
    m2 = _to_groups(tl.sum(d * d, axis=0), group, BLOCK_G)
    return count, mean, m2, d


@triton.jit
def _nhwc_refine(count, mean, m2, d, group, BLOCK_G: tl.constexpr):
    """Corrected two-pass (Chan, Golub and LeVeque) for a tile of raw values: the deviations' own
    mean is the first mean's rounding error (at mean 1e3 over 512 elements, about 1e-4), added
    back to the mean and taken out of M2 and of the centred tile. Later tiles, centred about the
    first one's mean, are small and need no correction."""
    d_mean = _to_groups(tl.sum(d, axis=0), group, BLOCK_G) / count
    m2 = tl.maximum(m2 - d_mean * d_mean * count, 0.0)  # >= 0 exactly; rounding may dip below
    return mean + d_mean, m2, d - _to_columns(d_mean, group, BLOCK_G)[None, :]


@triton.jit
def _nhwc_chunk_stats(
    x_ptr,
    skip_ptr,
    n,
    C1,
    x_base,
    first,
    last,
    c,
    c_ok,
    a,
    group,
    HW,
    C,
    CG: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):
    """Per group: (count, mean, M2) over tiles [first, last), merged about the first tile's means."""
    h, mask, offs, rows = _nhwc_tile(
        x_ptr, skip_ptr, n, C1, x_base, first, c, c_ok, a, HW, C, BLOCK_HW, HAS_ADD, HAS_SKIP
    )
    count, shift, m2, d = _nhwc_tile_stats(h, mask, rows, group, CG, BLOCK_G)
    shift, m2, d = _nhwc_refine(count, shift, m2, d, group, BLOCK_G)
    shift_c = _to_columns(shift, group, BLOCK_G)
    mean = tl.zeros_like(shift)
    for tile in range(first + 1, last):
        h, mask, offs, rows = _nhwc_tile(
            x_ptr, skip_ptr, n, C1, x_base, tile, c, c_ok, a, HW, C, BLOCK_HW, HAS_ADD, HAS_SKIP
        )
        h = tl.where(mask, h - shift_c[None, :], 0.0)
        count_b, mean_b, m2_b, _ = _nhwc_tile_stats(h, mask, rows, group, CG, BLOCK_G)
        count, mean, m2 = _merge(count, mean, m2, count_b, mean_b, m2_b)
    return count, shift + mean, m2


@triton.jit
def _nhwc_apply_tile(centred, mask, offs, y_ptr, scale_c, b, SILU: tl.constexpr):
    """y = (h - mean) * (rstd * w) + b per column from the centred tile h - mean, then SiLU;
    stored in y's dtype."""
    y = _silu(centred * scale_c[None, :] + b[None, :], SILU)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_nhwc_fused_kernel(
    x_ptr,
    skip_ptr,
    w_ptr,
    b_ptr,
    add_ptr,
    y_ptr,
    G,
    C,
    C1,
    HW,
    stride_add_n,
    stride_add_c,
    num_tiles,
    eps,
    CG: tl.constexpr,
    GPP: tl.constexpr,
    BLOCK_CH: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ONE_TILE: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    SILU: tl.constexpr,
):
    """One program per (n, GPP groups). Grid: (N * cdiv(G, GPP),)."""
    # The program's channels of sample n, and their add, weight and bias, loaded once.
    n, c, c_ok, group, x_base, _ = _nhwc_columns(tl.program_id(0), G, C, HW, CG, GPP, BLOCK_CH)
    a = _nhwc_add(add_ptr, n, c, c_ok, stride_add_n, stride_add_c, HAS_ADD)
    w, b = _nhwc_column(w_ptr, c, c_ok), _nhwc_column(b_ptr, c, c_ok)
    if ONE_TILE:
        # Every position in one tile: read x once, normalize it from registers.
        h, mask, offs, rows = _nhwc_tile(
            x_ptr, skip_ptr, n, C1, x_base, 0, c, c_ok, a, HW, C, BLOCK_HW, HAS_ADD, HAS_SKIP
        )
        count, mean, m2, d = _nhwc_tile_stats(h, mask, rows, group, CG, BLOCK_G)
        mean, m2, centred = _nhwc_refine(count, mean, m2, d, group, BLOCK_G)
        rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
        _nhwc_apply_tile(centred, mask, offs, y_ptr, _to_columns(rstd, group, BLOCK_G) * w, b, SILU)
    else:
        # Each group's statistics over all the tiles, then a second pass normalizes each tile.
        count, mean, m2 = _nhwc_chunk_stats(
            x_ptr, skip_ptr, n, C1, x_base, 0, num_tiles, c, c_ok, a, group, HW, C, CG, BLOCK_HW, BLOCK_G,
            HAS_ADD, HAS_SKIP
        )  # fmt: skip
        rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
        mean_c, scale_c = _to_columns(mean, group, BLOCK_G), _to_columns(rstd, group, BLOCK_G) * w
        for tile in range(0, num_tiles):
            h, mask, offs, rows = _nhwc_tile(
                x_ptr, skip_ptr, n, C1, x_base, tile, c, c_ok, a, HW, C, BLOCK_HW, HAS_ADD, HAS_SKIP
            )
            _nhwc_apply_tile(h - mean_c[None, :], mask, offs, y_ptr, scale_c, b, SILU)


@triton.jit
def _gn_nhwc_stats_kernel(
    x_ptr,
    skip_ptr,
    add_ptr,
    partial_ptr,
    G,
    C,
    C1,
    HW,
    stride_add_n,
    stride_add_c,
    num_tiles,
    tiles_per_split,
    SPLIT,
    CG: tl.constexpr,
    GPP: tl.constexpr,
    BLOCK_CH: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
):
    """(count, mean, M2) of chunk s of each of the program's groups n * G + g -> partial[n * G + g,
    s, :]. Grid: (N * cdiv(G, GPP), SPLIT)."""
    s = tl.program_id(1)
    # The program's channels of sample n and their add.
    n, c, c_ok, group, x_base, first_group = _nhwc_columns(tl.program_id(0), G, C, HW, CG, GPP, BLOCK_CH)
    a = _nhwc_add(add_ptr, n, c, c_ok, stride_add_n, stride_add_c, HAS_ADD)
    # Chunk s: tiles [s * tiles_per_split, +tiles_per_split) of positions.
    first = s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    count, mean, m2 = _nhwc_chunk_stats(
        x_ptr, skip_ptr, n, C1, x_base, first, last, c, c_ok, a, group, HW, C, CG, BLOCK_HW, BLOCK_G,
        HAS_ADD, HAS_SKIP
    )  # fmt: skip
    # partial[first_group + k, s] = (count, mean, M2) of each of the program's groups k.
    k = tl.arange(0, BLOCK_G)
    k_ok = (k < GPP) & (first_group % G + k < G)
    out = partial_ptr + ((first_group + k).to(tl.int64) * SPLIT + s) * 3
    tl.store(out, count, mask=k_ok)
    tl.store(out + 1, mean, mask=k_ok)
    tl.store(out + 2, m2, mask=k_ok)


@triton.jit
def _gn_nhwc_apply_kernel(
    x_ptr,
    skip_ptr,
    w_ptr,
    b_ptr,
    add_ptr,
    y_ptr,
    partial_ptr,
    G,
    C,
    C1,
    HW,
    stride_add_n,
    stride_add_c,
    num_tiles,
    tiles_per_split,
    SPLIT,
    eps,
    CG: tl.constexpr,
    GPP: tl.constexpr,
    BLOCK_CH: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    SILU: tl.constexpr,
):
    """Merge each of the program's groups' SPLIT partials, then normalize chunk s.
    Grid: (N * cdiv(G, GPP), SPLIT)."""
    s = tl.program_id(1)
    # The program's channels of sample n, and their add, weight and bias, loaded once.
    n, c, c_ok, group, x_base, first_group = _nhwc_columns(tl.program_id(0), G, C, HW, CG, GPP, BLOCK_CH)
    a = _nhwc_add(add_ptr, n, c, c_ok, stride_add_n, stride_add_c, HAS_ADD)
    w, b = _nhwc_column(w_ptr, c, c_ok), _nhwc_column(b_ptr, c, c_ok)
    # Each group's statistics: its SPLIT chunks' (count, mean, M2), [BLOCK_SPLIT, BLOCK_G], merged.
    k = tl.arange(0, BLOCK_G)
    part = tl.arange(0, BLOCK_SPLIT)
    ok = (part < SPLIT)[:, None] & ((k < GPP) & (first_group % G + k < G))[None, :]
    parts = partial_ptr + ((first_group + k[None, :]).to(tl.int64) * SPLIT + part[:, None]) * 3
    counts = tl.load(parts, mask=ok, other=0.0)
    means = tl.load(parts + 1, mask=ok, other=0.0)
    m2s = tl.load(parts + 2, mask=ok, other=0.0)
    count = tl.maximum(tl.sum(counts, axis=0), 1.0)  # >= 1 already, but for the padding groups
    mean = tl.sum(counts * means, axis=0) / count
    d = means - mean[None, :]
    m2 = tl.sum(m2s, axis=0) + tl.sum(counts * d * d, axis=0)
    rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
    # Normalize the tiles of chunk s, each column by its group's mean and rstd.
    mean_c, scale_c = _to_columns(mean, group, BLOCK_G), _to_columns(rstd, group, BLOCK_G) * w
    first = s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        h, mask, offs, rows = _nhwc_tile(
            x_ptr, skip_ptr, n, C1, x_base, tile, c, c_ok, a, HW, C, BLOCK_HW, HAS_ADD, HAS_SKIP
        )
        _nhwc_apply_tile(h - mean_c[None, :], mask, offs, y_ptr, scale_c, b, SILU)


# --- launch ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one call runs: tile shape, groups per program (1 in NCHW), path (split = 1: fused), warps.

    NCHW tiles are [block_c channels of one group, block_hw]; NHWC tiles [block_hw, block_c
    channels of groups_per_program groups], and a program's tiles run along the positions only.
    """

    block_c: int
    block_hw: int
    groups_per_program: int
    split: int
    tiles_per_split: int
    num_tiles: int
    n_hw_tiles: int
    num_warps: int

    @property
    def one_tile(self) -> bool:
        return self.num_tiles == 1


def groups_per_program(N: int, C: int, HW: int, num_groups: int, itemsize: int, sms: int) -> int:
    """NHWC: how many groups one program covers. A multiple of the fewest whole groups spanning a
    multiple of 16 bytes (so every row of a tile starts 16-byte aligned), as wide as ROW_BYTES;
    narrower, down to that minimum, while it keeps a program to one tile with N * G / GPP programs
    under the SM count, or while a program's groups would not fit one tile though fewer would."""
    Cg = C // num_groups
    vec = 16 // itemsize  # channels per 16-byte load
    fewest = vec // math.gcd(vec, Cg)  # a power of two
    gpp = fewest * next_pow2(triton.cdiv(ROW_BYTES, fewest * Cg * itemsize))

    def fits(g: int) -> bool:
        return next_pow2(HW) * next_pow2(g * Cg) <= ONE_TILE_MAX

    if fits(fewest):
        while gpp > fewest and (not fits(gpp) or N * triton.cdiv(num_groups, gpp) < sms):
            gpp //= 2
    return min(gpp, num_groups)


def plan(
    N: int,
    C: int,
    HW: int,
    num_groups: int,
    device: torch.device,
    *,
    channels_last: bool = False,
    itemsize: int = 4,
    split: int | None = None,
    tile: int | None = None,
    groups: int | None = None,
) -> Plan:
    """The launch for a shape: one tile per program when its groups fit, else LOOP_TILE-sized tiles;
    split the tiles over programs when the programs (N * G, or N * G / GPP in NHWC) cannot fill
    the GPU (at least one program per SM).

    `split`, `tile` (elements per tile, a power of two) and, in NHWC, `groups` (per program)
    override the heuristic, for tests.
    """
    Cg = C // num_groups
    if channels_last:
        gpp = groups or groups_per_program(N, C, HW, num_groups, itemsize, num_sms(device))
        block_c = next_pow2(gpp * Cg)
    else:
        gpp, block_c = 1, next_pow2(Cg)
    one_tile = block_c * next_pow2(HW)
    tile = tile or (one_tile if one_tile <= ONE_TILE_MAX else LOOP_TILE)
    block_c = block_c if channels_last else min(block_c, tile)  # an NHWC row holds whole groups
    block_hw = min(next_pow2(HW), max(tile // block_c, 1))
    n_hw_tiles = triton.cdiv(HW, block_hw)
    num_tiles = (1 if channels_last else triton.cdiv(Cg, block_c)) * n_hw_tiles
    programs = N * triton.cdiv(num_groups, gpp)
    if split is None:
        sms = num_sms(device)
        split = 1 if num_tiles == 1 or programs >= sms else triton.cdiv(2 * sms, programs)
    split = max(1, min(split, num_tiles))
    tiles_per_split = triton.cdiv(num_tiles, split)
    split = triton.cdiv(num_tiles, tiles_per_split)  # every chunk gets at least one tile
    # 16 elements per thread up to 16 warps; 8 in NHWC's looping programs, which keep a tile's
    # columns (add, weight, the group's statistics) live across the loop (16 spilled on sm_90)
    per_thread = 256 if channels_last and num_tiles > 1 else 512
    num_warps = min(16, max(2, block_c * block_hw // per_thread))
    return Plan(block_c, block_hw, gpp, split, tiles_per_split, num_tiles, n_hw_tiles, num_warps)


def launch_group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float = 1e-6,
    *,
    silu: bool = True,
    add: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    split: int | None = None,
    tile: int | None = None,
    groups: int | None = None,
) -> torch.Tensor:
    """Launch the kernels; x (N, C1, H, W) and skip (N, C2, H, W) or None -> y (N, C1 + C2, H, W)
    in x's dtype and memory format, the normalization of their channel concatenation (read from
    each in place).

    Inputs are assumed checked by `fastddpm.ops` (and `check_group_norm_silu`). `split`, `tile`
    and `groups` (per program, channels_last only) override the plan, for tests.
    """
    N, _, H, W = x.shape
    C, HW = weight.shape[0], H * W
    fmt = memory_format_of(x)
    channels_last = fmt == torch.channels_last
    if not channels_last:
        x = x.contiguous()
        skip = None if skip is None else skip.contiguous()
    y = torch.empty((N, C, H, W), device=x.device, dtype=x.dtype, memory_format=fmt)
    if y.numel() == 0:
        return y
    p = plan(
        N, C, HW, num_groups, x.device, channels_last=channels_last, itemsize=x.element_size(),
        split=split, tile=tile, groups=groups,
    )  # fmt: skip
    launch = _launch_nhwc if channels_last else _launch_nchw
    with device_guard(x.device):
        launch(x, skip, weight.contiguous(), bias.contiguous(), add, y, p, num_groups, eps, silu)
    return y


def _add_args(add: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """add's pointer and (N, C) strides; without add, x as a dummy pointer (never read)."""
    return (x, 0, 0) if add is None else (add, *add.stride())


def _launch_nchw(x, skip, weight, bias, add, y, p: Plan, G: int, eps: float, silu: bool) -> None:
    N, C, H, W = y.shape
    C1, HW, Cg, groups = x.shape[1], H * W, C // G, N * G
    has_add, has_skip = add is not None, skip is not None
    add, stride_add_n, stride_add_c = _add_args(add, x)
    skip = x if skip is None else skip  # without skip a dummy pointer, never read
    common = dict(
        BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, HAS_ADD=has_add, HAS_SKIP=has_skip, num_warps=p.num_warps
    )
    if p.split == 1:
        _gn_fused_kernel[(groups,)](
            x, skip, weight, bias, add, y, G, C, C1, HW, Cg, stride_add_n, stride_add_c,
            p.n_hw_tiles, p.num_tiles, eps, ONE_TILE=p.one_tile, SILU=silu, **common,
        )  # fmt: skip
        return
    partial = torch.empty((groups, p.split, 3), device=x.device, dtype=torch.float32)
    _gn_stats_kernel[(groups, p.split)](
        x, skip, add, partial, G, C, C1, HW, Cg, stride_add_n, stride_add_c,
        p.n_hw_tiles, p.num_tiles, p.tiles_per_split, p.split, **common,
    )  # fmt: skip
    _gn_apply_kernel[(groups, p.split)](
        x, skip, weight, bias, add, y, partial, G, C, C1, HW, Cg, stride_add_n, stride_add_c,
        p.n_hw_tiles, p.num_tiles, p.tiles_per_split, p.split, eps,
        BLOCK_SPLIT=next_pow2(p.split), SILU=silu, **common,
    )  # fmt: skip


def _launch_nhwc(x, skip, weight, bias, add, y, p: Plan, G: int, eps: float, silu: bool) -> None:
    N, C, H, W = y.shape
    C1, HW, gpp = x.shape[1], H * W, p.groups_per_program
    programs = N * triton.cdiv(G, gpp)
    has_add, has_skip = add is not None, skip is not None
    add, stride_add_n, stride_add_c = _add_args(add, x)
    skip = x if skip is None else skip  # without skip a dummy pointer, never read
    common = dict(
        CG=C // G, GPP=gpp, BLOCK_CH=p.block_c, BLOCK_HW=p.block_hw, BLOCK_G=next_pow2(gpp),
        HAS_ADD=has_add, HAS_SKIP=has_skip, num_warps=p.num_warps,
    )  # fmt: skip
    if p.split == 1:
        _gn_nhwc_fused_kernel[(programs,)](
            x, skip, weight, bias, add, y, G, C, C1, HW, stride_add_n, stride_add_c, p.num_tiles, eps,
            ONE_TILE=p.one_tile, SILU=silu, **common,
        )  # fmt: skip
        return
    partial = torch.empty((N * G, p.split, 3), device=x.device, dtype=torch.float32)
    _gn_nhwc_stats_kernel[(programs, p.split)](
        x, skip, add, partial, G, C, C1, HW, stride_add_n, stride_add_c,
        p.num_tiles, p.tiles_per_split, p.split, **common,
    )  # fmt: skip
    _gn_nhwc_apply_kernel[(programs, p.split)](
        x, skip, weight, bias, add, y, partial, G, C, C1, HW, stride_add_n, stride_add_c,
        p.num_tiles, p.tiles_per_split, p.split, eps,
        BLOCK_SPLIT=next_pow2(p.split), SILU=silu, **common,
    )  # fmt: skip


def check_group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add, skip=None) -> None:
    """What only this kernel imposes (fastddpm.ops checks the rest): a device Triton runs on."""
    check_device("group_norm_silu", x=x, weight=weight, bias=bias, add=add, skip=skip)


# --- the custom op torch.ops.fastddpm_triton.group_norm_silu ---------------------------------------


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
    return launch_group_norm_silu(x, weight, bias, num_groups, eps, silu=silu, add=add, skip=skip)


custom_ops.define(
    "fastddpm_triton::group_norm_silu",
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
    """y = SiLU(GroupNorm(cat(x, skip) + add[:, :, None, None])) through the custom op. The
    reference's signature; inputs checked by fastddpm.ops."""
    check_group_norm_silu(x, weight, bias, add, skip)
    return torch.ops.fastddpm_triton.group_norm_silu(x, weight, bias, num_groups, float(eps), silu, add, skip)
