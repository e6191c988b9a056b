"""The fused DDPM / DDIM reverse step in Triton: x_{t-1} = mean(x_t, eps) + sigma_t z.

x_t, eps (N, C, H, W), fp32/fp16/bf16, contiguous or channels_last. One row of the step table
(S, NUM_COEFS) (columns: fastddpm.schedule) is read on the device at t, which is a scalar
argument, a shared device tensor t[0] or a per-sample one t[n]; so a step can be captured in a
CUDA graph.
A t outside the table is never clamped: every element of the affected samples is NaN (all of
them for a shared t, sample n for a bad t[n]), and nothing outside the table is read.

    clipped-x0:  x0 = clamp(sqrt(1/abar) x_t - sqrt(1/abar - 1) eps, -1, 1)
                 mean = coef_x0 x0 + coef_xt x_t
    direct eps:  mean = direct_xt x_t - direct_eps eps

z is read from `noise`, or made in the kernel from (seed, offset) with Philox4x32-10 exactly as
`fastddpm.reference.philox_normal` lays it out: element j of the logical (N, C, H, W) order takes
lane j % 4 of philox(counter = (j // 4, offset), key = seed); lanes (0, 1) and (2, 3) are
Box-Muller pairs. On a contiguous tensor whose per-sample size is a multiple of 4, a tile is
[BLOCK // 4, 4]: one Philox call serves four elements. Otherwise (channels_last, ragged sizes)
each element computes its own call and takes its lane. seed and offset are kernel arguments, or
each is read from a 0-d int64 device tensor (its bits are the uint64 value), so a graph-captured
step replays with whatever offset the tensor holds at replay time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm import custom_ops, schedule
from fastddpm.custom_ops import StepArgs
from fastddpm.schedule import StepTable

from ._common import check_device, device_guard, memory_format_of, next_pow2, num_sms

MASK32 = 0xFFFFFFFF

# Layouts of the step kernel's tiles.
GROUPED = tl.constexpr(0)  # contiguous, C*H*W % 4 == 0: tiles [BLOCK // 4, 4] of 4-element Philox groups
FLAT = tl.constexpr(1)  # contiguous: tiles of BLOCK elements, each with its own Philox call
CHANNELS_LAST = tl.constexpr(2)  # channels_last: tiles [BLOCK_HW positions, BLOCK_C channels]
# Where t comes from.
T_SCALAR = tl.constexpr(0)  # the t_scalar argument
T_SHARED = tl.constexpr(1)  # t_ptr[0], one t for the batch
T_PER_SAMPLE = tl.constexpr(2)  # t_ptr[n] for sample n
# Where z comes from: the noise modes of the C ABI (FASTDDPM_NOISE_* in fastddpm.h).
NOISE_NONE = tl.constexpr(0)  # no noise term (every sigma is 0)
NOISE_TENSOR = tl.constexpr(1)  # read from `noise`
NOISE_PHILOX = tl.constexpr(2)  # Philox4x32-10 normals at (seed, offset)
# The step table's columns (fastddpm.schedule), as constants the kernel reads.
SQRT_RECIP_ABAR = tl.constexpr(schedule.SQRT_RECIP_ABAR)
SQRT_RECIPM1_ABAR = tl.constexpr(schedule.SQRT_RECIPM1_ABAR)
COEF_X0 = tl.constexpr(schedule.COEF_X0)
COEF_XT = tl.constexpr(schedule.COEF_XT)
DIRECT_XT = tl.constexpr(schedule.DIRECT_XT)
DIRECT_EPS = tl.constexpr(schedule.DIRECT_EPS)
SIGMA = tl.constexpr(schedule.SIGMA)
NUM_COEFS = tl.constexpr(schedule.NUM_COEFS)


@triton.jit
def _uniform(x):
    """u = float32(x) * 2^-32 + 2^-33 in (0, 1], x a uint32 Philox word (the reference's map)."""
    return x.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10


@triton.jit
def _philox_normal4(group, seed, off_lo, off_hi):
    """The four normals of Philox counter group (int64 block) at (seed, offset): z0, z1, z2, z3."""
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    zero = tl.zeros(group.shape, dtype=tl.uint32)
    c2 = zero + off_lo.to(tl.uint32)
    c3 = zero + off_hi.to(tl.uint32)
    x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3)
    r01 = tl.sqrt(-2.0 * tl.log(_uniform(x0)))
    t01 = 6.283185307179586 * _uniform(x1)
    r23 = tl.sqrt(-2.0 * tl.log(_uniform(x2)))
    t23 = 6.283185307179586 * _uniform(x3)
    return r01 * tl.cos(t01), r01 * tl.sin(t01), r23 * tl.cos(t23), r23 * tl.sin(t23)


@triton.jit
def _lanes(lane, z0, z1, z2, z3):
    """[G, 4] tile whose column l is z_l (lane = arange(0, 4))."""
    lane = lane[None, :]
    z = tl.where(lane == 0, z0[:, None], z1[:, None])
    z = tl.where(lane == 2, z2[:, None], z)
    return tl.where(lane == 3, z3[:, None], z)


@triton.jit
def _philox_normal_at(j, seed, off_lo, off_hi):
    """The normal of logical element j (int64 block): lane j % 4 of counter group j // 4."""
    lane = j & 3
    z0, z1, z2, z3 = _philox_normal4(j >> 2, seed, off_lo, off_hi)
    return tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))


@triton.jit(do_not_specialize=["t_scalar", "seed", "off_lo", "off_hi"])
def _ddpm_step_kernel(
    x_ptr,
    eps_ptr,
    noise_ptr,
    out_ptr,
    coef_ptr,
    t_ptr,
    t_scalar,
    num_steps,
    C,
    HW,
    seed,
    off_lo,
    off_hi,
    seed_ptr,
    offset_ptr,
    n_c_tiles,
    LAYOUT: tl.constexpr,
    T_MODE: tl.constexpr,
    NOISE: tl.constexpr,
    SEED_ON_DEVICE: tl.constexpr,
    OFFSET_ON_DEVICE: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One tile of sample n = program_id(1). Grid: (tiles per sample, N).

    LAYOUT (GROUPED, FLAT or CHANNELS_LAST) shapes the tile; a CHANNELS_LAST tile's index is
    hw tile * n_c_tiles + c tile. T_MODE (T_SCALAR, T_SHARED, T_PER_SAMPLE) says where t is read,
    NOISE (NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX) where z comes from. SEED_ON_DEVICE /
    OFFSET_ON_DEVICE: read the seed from seed_ptr[0] / the offset from offset_ptr[0] (int64)
    instead of the seed / off_lo, off_hi arguments.
    """
    # Philox key and counter words: from device memory where a captured graph replays new ones.
    if SEED_ON_DEVICE:
        seed = tl.load(seed_ptr)
    if OFFSET_ON_DEVICE:
        offset = tl.load(offset_ptr)
        off_lo = offset & 0xFFFFFFFF
        off_hi = (offset >> 32) & 0xFFFFFFFF
    pid = tl.program_id(0)
    n = tl.program_id(1)
    CHW = C * HW

    # The step index t of sample n.
    if T_MODE == T_SCALAR:
        t = t_scalar.to(tl.int64)
    elif T_MODE == T_SHARED:
        t = tl.load(t_ptr).to(tl.int64)
    else:
        t = tl.load(t_ptr + n).to(tl.int64)

    # Row t of the step table. A t outside the table is never clamped: the row is not read and its
    # coefficients are NaN, so every element of the sample comes out NaN.
    t_ok = (t >= 0) & (t < num_steps)
    row = coef_ptr + tl.where(t_ok, t, 0) * NUM_COEFS
    sqrt_recip_abar = tl.load(row + SQRT_RECIP_ABAR, mask=t_ok, other=float("nan"))
    sqrt_recipm1_abar = tl.load(row + SQRT_RECIPM1_ABAR, mask=t_ok, other=float("nan"))
    coef_x0 = tl.load(row + COEF_X0, mask=t_ok, other=float("nan"))
    coef_xt = tl.load(row + COEF_XT, mask=t_ok, other=float("nan"))
    direct_xt = tl.load(row + DIRECT_XT, mask=t_ok, other=float("nan"))
    direct_eps = tl.load(row + DIRECT_EPS, mask=t_ok, other=float("nan"))
    sigma = tl.load(row + SIGMA, mask=t_ok, other=float("nan"))

    # The tile: offsets into x, eps, noise and out, their mask, and z where the kernel draws it.
    # Sample n starts at n * C*H*W, in memory and in the logical (N, C, H, W) order.
    sample = n.to(tl.int64) * CHW
    if LAYOUT == GROUPED:
        # Row g of the tile is the sample's 4-element Philox group g: one call serves four.
        g = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        lane = tl.arange(0, 4)
        i = g[:, None] * 4 + lane[None, :]
        mask = i < CHW
        if NOISE == NOISE_PHILOX:
            z0, z1, z2, z3 = _philox_normal4(sample // 4 + g, seed, off_lo, off_hi)
            z = _lanes(lane, z0, z1, z2, z3)
        offs = sample + i
    elif LAYOUT == FLAT:
        # BLOCK consecutive elements, each taking its lane of its own Philox call.
        i = pid * BLOCK + tl.arange(0, BLOCK)
        mask = i < CHW
        offs = sample + i
        if NOISE == NOISE_PHILOX:
            z = _philox_normal_at(offs, seed, off_lo, off_hi)
    else:
        # [BLOCK_HW positions, BLOCK_C channels], channels contiguous in memory; z is drawn at
        # each element's logical index, whatever the memory layout.
        hw = (pid // n_c_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        c = (pid % n_c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (hw < HW)[:, None] & (c < C)[None, :]
        offs = sample + hw[:, None] * C + c[None, :]
        if NOISE == NOISE_PHILOX:
            z = _philox_normal_at(sample + c[None, :] * HW + hw[:, None], seed, off_lo, off_hi)

    # The posterior mean: from the clipped x0, or directly from eps.
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLIP:
        x0 = tl.minimum(tl.maximum(sqrt_recip_abar * x - sqrt_recipm1_abar * e, -1.0), 1.0)
        out = coef_x0 * x0 + coef_xt * x
    else:
        out = direct_xt * x - direct_eps * e

    # x_{t-1} = mean + sigma z, stored in out's dtype.
    if NOISE == NOISE_TENSOR:
        out += sigma * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NOISE == NOISE_PHILOX:
        out += sigma * z
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "off_lo", "off_hi"])
def _philox_normal_kernel(out_ptr, numel, seed, off_lo, off_hi, BLOCK: tl.constexpr):
    """out[j] = the normal of element j, for j < numel (flat, grouped tiles). Grid: (cdiv(numel, BLOCK),)."""
    g = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    z0, z1, z2, z3 = _philox_normal4(g, seed, off_lo, off_hi)
    lane = tl.arange(0, 4)
    z = _lanes(lane, z0, z1, z2, z3)
    j = g[:, None] * 4 + lane[None, :]
    tl.store(out_ptr + j, z, mask=j < numel)


def _block(total: int, device: torch.device) -> int:
    """Elements per program: enough programs for ~4 per SM, 256..2048."""
    return max(256, min(2048, next_pow2(triton.cdiv(total, 4 * num_sms(device)))))


def _warps(block: int) -> int:
    """8 elements per thread: Philox state for more would spill registers."""
    return max(4, block // 256)


def launch_ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    i: int | torch.Tensor,
    coefficients: torch.Tensor,
    stochastic: bool,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    clip_x0: bool = True,
    layout: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Launch; returns x_{t-1} in x_t's dtype and memory format. Inputs checked by fastddpm.ops.

    i: the step index, an int or an integer tensor of shape (), (1,) or (N,); coefficients: the
    step table's (S, NUM_COEFS). z is `noise` where given, else Philox at (seed, offset).
    eps and noise are brought to x_t's memory format (a copy only if they differ). `layout`
    (FLAT forces per-element Philox on a contiguous tensor) and `block` override the heuristic.
    """
    fmt = memory_format_of(x_t)
    x_t = x_t.contiguous(memory_format=fmt)
    eps = eps.contiguous(memory_format=fmt)
    out = torch.empty_like(x_t, memory_format=fmt)
    if x_t.numel() == 0:
        return out
    N, C, H, W = x_t.shape
    HW = H * W
    coef = coefficients
    if coef.dtype != torch.float32 or not coef.is_contiguous():
        coef = coef.float().contiguous()

    if isinstance(i, torch.Tensor):
        t_mode = T_PER_SAMPLE if i.numel() == N and N > 1 else T_SHARED
        t_arg = i.reshape(-1)
        if t_arg.device != x_t.device:
            t_arg = t_arg.to(x_t.device)
        if t_arg.dtype not in (torch.int32, torch.int64):
            t_arg = t_arg.long()
        t_scalar = 0
    else:
        t_mode, t_arg, t_scalar = T_SCALAR, coef, int(i)

    noise_mode = NOISE_NONE
    if stochastic:
        if noise is not None:
            noise_mode, noise = NOISE_TENSOR, noise.contiguous(memory_format=fmt)
        else:
            noise_mode = NOISE_PHILOX
    seed_ptr = seed if isinstance(seed, torch.Tensor) else coef  # coef: any pointer, never read
    offset_ptr = offset if isinstance(offset, torch.Tensor) else coef
    seed = 0 if seed is None or isinstance(seed, torch.Tensor) else int(seed)
    offset = 0 if isinstance(offset, torch.Tensor) else int(offset)

    if layout is None:
        if fmt == torch.channels_last:
            layout = CHANNELS_LAST
        else:
            layout = GROUPED if (C * HW) % 4 == 0 else FLAT
    block = block or _block(x_t.numel(), x_t.device)
    if layout == CHANNELS_LAST:
        block_c = min(next_pow2(C), 64)
        block_hw = max(block // block_c, 1)
        n_c_tiles = triton.cdiv(C, block_c)
        tiles = triton.cdiv(HW, block_hw) * n_c_tiles
    else:
        block_c = block_hw = 1
        n_c_tiles = 1
        tiles = triton.cdiv(C * HW, block)
    with device_guard(x_t.device):
        # The modes go in as plain ints; their tl.constexpr names serve the kernel's branches.
        _ddpm_step_kernel[(tiles, N)](
            x_t, eps, noise if noise_mode == NOISE_TENSOR else x_t, out, coef, t_arg, t_scalar, coef.shape[0],
            C, HW, seed, offset & MASK32, offset >> 32, seed_ptr, offset_ptr, n_c_tiles,
            LAYOUT=int(layout), T_MODE=int(t_mode), NOISE=int(noise_mode), CLIP=clip_x0,
            SEED_ON_DEVICE=seed_ptr is not coef, OFFSET_ON_DEVICE=offset_ptr is not coef,
            BLOCK=block, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=_warps(block),
        )  # fmt: skip
    return out


def philox_normal(
    seed: int,
    offset: int,
    shape: torch.Size | tuple[int, ...],
    device: torch.device | str,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """The in-kernel noise alone, float32 `shape`: equals fastddpm.reference.philox_normal.
    `block` (elements per program, a power of two >= 4) overrides the heuristic."""
    device = torch.device(device)
    check_device("philox_normal", out=torch.empty(0, device=device))
    out = torch.empty(shape, device=device, dtype=torch.float32)
    numel = out.numel()
    if numel:
        block = block or _block(numel, device)
        with device_guard(device):
            _philox_normal_kernel[(triton.cdiv(numel, block),)](
                out, numel, int(seed), offset & MASK32, offset >> 32, BLOCK=block, num_warps=_warps(block)
            )
    return out


def check_ddpm_step(
    x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None, table: StepTable
) -> None:
    """What only this kernel imposes (fastddpm.ops checks the rest)."""
    check_device("ddpm_step", x_t=x_t, eps=eps, noise=noise, table=table.coef)


# --- the custom op torch.ops.fastddpm_triton.ddpm_step ---------------------------------------------


def _forward(args: StepArgs) -> torch.Tensor:
    return launch_ddpm_step(
        args.x_t,
        args.eps,
        args.i,
        args.coefficients,
        args.stochastic,
        noise=args.noise,
        seed=args.seed,
        offset=args.offset,
        clip_x0=args.clip_x0,
    )


custom_ops.define("fastddpm_triton::ddpm_step", _forward, fake=StepArgs.fake, reference=StepArgs.reference)


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
    """One reverse step at step index i, through the custom op. The reference's signature; inputs
    checked by fastddpm.ops."""
    check_ddpm_step(x_t, eps, noise, table)
    args = custom_ops.step_args(x_t, eps, i, table, noise=noise, seed=seed, offset=offset, clip_x0=clip_x0)
    return torch.ops.fastddpm_triton.ddpm_step(*args)
