"""Plain-PyTorch reference of each fused op: the ground truth every kernel must equal.

Statistics, softmax and the step arithmetic run in float32 whatever the input
dtype; results are cast back to the input dtype and memory format. Inputs are
assumed valid: `fastddpm.ops` checks them once for every backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .schedule import (
    COEF_X0,
    COEF_XT,
    DIRECT_EPS,
    DIRECT_XT,
    SIGMA,
    SQRT_RECIP_ABAR,
    SQRT_RECIPM1_ABAR,
    StepTable,
)
from .solver_table import COL_EPS, COL_X, COL_Z, ROW_D, ROW_KEEP_A, ROW_KEEP_B, ROW_X, SolverTable


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-D tensor, else contiguous_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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
    """y = SiLU(GroupNorm(h + add[:, :, None, None])), h = x or, with `skip`, cat([x, skip], dim=1);
    x (N, C1, H, W), skip (N, C2, H, W), add (N, C) -> (N, C, H, W), C = C1 + C2 (C1 without skip).
    The U-Net's up path normalizes its concatenation of h and a skip this way: the fused backends
    read the two tensors where they are, and no concatenated copy is made.

    In float32: each group's mean is subtracted first, then F.group_norm normalises the centred
    values, whose own mean (the first mean's rounding error) and variance it computes without
    cancellation. So the statistics are two-pass stable (a mean of 1e3 over a std of 0.01 costs
    nothing) and the normalisation is PyTorch's fused kernel (on the CPU, several times faster
    than the same arithmetic as separate elementwise ops).

    Under torch.export (ONNX) it takes the form that exports to InstanceNormalization, which
    TensorRT's parser maps to its normalization layer: (N, G, C/G * H * W) -> InstanceNormalization
    (unit scale, zero bias) -> (N, C, H, W) -> * weight[c] + bias[c] -> SiLU.
    """
    h = x.float() if skip is None else torch.cat([x.float(), skip.float()], dim=1)
    N, C, H, W = h.shape
    if add is not None:
        h = h + add.float()[:, :, None, None]
    g = h.reshape(N, num_groups, -1)
    if torch.compiler.is_exporting():
        y = F.instance_norm(g, eps=eps).reshape(N, C, H, W)
        y = y * weight.float()[:, None, None] + bias.float()[:, None, None]
        return (F.silu(y) if silu else y).to(x.dtype)
    centered = (g - g.mean(dim=-1, keepdim=True)).reshape(N, C, H, W)
    y = F.group_norm(centered, num_groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y, inplace=True)
    return y.to(dtype=x.dtype).contiguous(memory_format=memory_format_of(x))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v; q (B, h, Lq, D), k and v (B, h, Lk, D) -> (B, h, Lq, D).

    NaN and Inf propagate as the formula propagates them (a NaN in q's row i: NaN in output row i).

    Runs as float32 `F.scaled_dot_product_attention` (on the CPU a fused kernel that never holds
    the (Lq, Lk) scores, given rows of unit stride; equal to the explicit formula within 1e-6),
    except under torch.export (ONNX), which gets the explicit MatMul, Softmax, MatMul: opset 23
    would turn SDPA into an `Attention` node that onnxruntime and TensorRT builds may lack.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if torch.compiler.is_exporting():
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)
    q32, k32, v32 = (_unit_stride_rows(t.float()) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q32, k32, v32, scale=scale)
    # SDPA's fused CPU kernel gives zeros for a query row holding NaN; the formula (and every fused
    # backend) gives NaN there. One pass over q, O(Lq D) beside the O(Lq Lk D) attention.
    out = out.masked_fill(q32.isnan().any(dim=-1, keepdim=True), math.nan)
    return out.to(q.dtype)


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along its last dimension (SDPA's fused CPU kernel needs it; else it falls
    back to the unfused math path)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows(table: StepTable, i: int | torch.Tensor) -> torch.Tensor:
    """Row i of the table, (NUM_COEFS,) for an int or a 0-d i, (N, NUM_COEFS) for an (N,) i. A
    tensor i is gathered on its device: `coef[i]` with a 0-d tensor would read it on the host,
    which a CUDA graph capture cannot do. An index of a tensor i outside the table gives a row of
    NaN (never clamped, never read), so its samples come out NaN, as in every backend."""
    if not isinstance(i, torch.Tensor):
        return table.coef[i]
    coef = table.coef
    index = i.reshape(-1).to(device=coef.device, dtype=torch.int64)
    inside = (index >= 0) & (index < coef.shape[0])
    rows = coef.index_select(0, index.clamp(0, coef.shape[0] - 1)).masked_fill(~inside[:, None], math.nan)
    return rows[0] if i.dim() == 0 else rows


def _column(coef: torch.Tensor, index: int) -> torch.Tensor:
    """One coefficient for broadcasting against (N, C, H, W): () or, per sample, (N, 1, 1, 1)."""
    c = coef[..., index]
    return c if c.dim() == 0 else c.view(-1, 1, 1, 1)


def predict_x0(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    i: int | torch.Tensor,
    table: StepTable,
    clip_x0: bool = True,
) -> torch.Tensor:
    """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps at step index i (timestep t =
    table.timesteps[i]), clamped to [-1, 1] if clip_x0; float32."""
    coef = _rows(table, i)
    x0 = _column(coef, SQRT_RECIP_ABAR) * x_t.float() - _column(coef, SQRT_RECIPM1_ABAR) * eps.float()
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0


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
    """x_{t-1} = mean + sigma_t z at step index i; x_t, eps, noise (N, C, H, W) -> (N, C, H, W).

    clip_x0: mean = coef_x0 * clamp(x0, -1, 1) + coef_xt * x_t; otherwise the direct
    eps form mean = direct_xt * x_t - direct_eps * eps. z is `noise`, or
    `philox_normal(seed, offset)` when a seed is given (each an int or a 0-d int64 tensor).

    A tensor i outside the table (a device i, which `fastddpm.ops` cannot check without a host
    sync) is never clamped: the affected samples are NaN in every element (all of them for i of
    shape () or (1,), sample n for a bad i[n] of shape (N,)), and nothing outside the table is read.
    """
    coef = _rows(table, i)
    if clip_x0:
        x0 = predict_x0(x_t, eps, i, table, clip_x0=True)
        mean = _column(coef, COEF_X0) * x0 + _column(coef, COEF_XT) * x_t.float()
    else:
        mean = _column(coef, DIRECT_XT) * x_t.float() - _column(coef, DIRECT_EPS) * eps.float()
    if table.stochastic:
        z = noise.float() if noise is not None else philox_normal(seed, offset, x_t.shape, x_t.device)
        mean = mean + _column(coef, SIGMA) * z
    return mean.to(x_t.dtype).contiguous(memory_format=memory_format_of(x_t))


def solver_x0(
    x: torch.Tensor, eps: torch.Tensor, i: int, table: SolverTable, clip_x0: bool = False
) -> torch.Tensor:
    """A solver step's x0 prediction D = W[i, ROW_D] . [x, eps] (x, eps (N, C, H, W)), clamped to
    [-1, 1] if clip_x0; float32."""
    w = table.weights[i, ROW_D]
    x0 = w[COL_X] * x.float() + w[COL_EPS] * eps.float()
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0


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
    """One solver step at step index i (fastddpm.solver_table): x_next from x, eps (N, C, H, W)
    float32, z and the history slots (M, N, C, H, W) float32, which it updates in place (rows
    ROW_KEEP_A and ROW_KEEP_B into slots dest[i]). z is `noise`, or philox_normal(seed, offset),
    read only where the step's noise weights are nonzero."""
    w, dest = table.weights[i], table.dest[i]
    d = w[ROW_D, COL_X] * x + w[ROW_D, COL_EPS] * eps
    if clip_x0:
        d = d.clamp(-1.0, 1.0)
    inputs = [x, eps, d, torch.zeros_like(x), *history.unbind(0)]
    if table.stochastic:
        inputs[COL_Z] = noise.float() if noise is not None else philox_normal(seed, offset, x.shape, x.device)

    def combine(row: int) -> torch.Tensor:
        return sum(w[row, c] * value for c, value in enumerate(inputs))

    keep_a, keep_b, x_next = combine(ROW_KEEP_A), combine(ROW_KEEP_B), combine(ROW_X)
    for k in range(history.shape[0]):  # written after every row has read the slots; no host sync
        history[k] = torch.where(dest[0] == k, keep_a, torch.where(dest[1] == k, keep_b, history[k]))
    return x_next


# --- Counter-based Gaussian noise -------------------------------------------------------------
# Philox4x32-10 (Salmon et al. 2011, the generator of curand and of Triton's tl.randn).
# Element j of the output (row-major over the logical shape) takes lane j % 4 of
# philox(counter = (j // 4 low, j // 4 high, offset low, offset high), key = (seed low, seed high)).
# Lanes (0, 1) and (2, 3) are Box-Muller pairs of u = float32(x) * 2^-32 + 2^-33:
#   z_even = sqrt(-2 ln u_even) cos(2 pi u_odd),  z_odd = sqrt(-2 ln u_even) sin(2 pi u_odd).

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of m * x, for uint32 values held in int64 (no overflow)."""
    xh, xl = x >> 16, x & 0xFFFF
    mh, ml = m >> 16, m & 0xFFFF
    low = xl * ml
    mid = xh * ml + xl * mh + (low >> 16)
    return xh * mh + (mid >> 16), ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds; uint32 words held in int64 tensors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _words(value: int | torch.Tensor) -> tuple[int | torch.Tensor, int | torch.Tensor]:
    """(low, high) 32-bit words of a uint64: an int in [0, 2**64), or a 0-d int64 tensor whose
    bits are the value (two's complement: tensor(-1) is 2**64 - 1), giving 0-d tensors."""
    return value & _MASK32, (value >> 32) & _MASK32


def _filled(like: torch.Tensor, word: int | torch.Tensor) -> torch.Tensor:
    """`like`'s shape filled with a word: a fill for an int, a broadcast view of a 0-d tensor."""
    return word.expand_as(like) if isinstance(word, torch.Tensor) else torch.full_like(like, word)


def philox_normal(
    seed: int | torch.Tensor,
    offset: int | torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal float32 noise of `shape`, a pure function of (seed, offset, element index).

    seed, offset: ints in [0, 2**64), or 0-d int64 tensors on `device` read there (nothing is
    copied to the host, so a CUDA graph can capture this with the values changing between replays).
    """
    numel = math.prod(shape)
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    off_lo, off_hi = _words(offset)
    counter = (groups & _MASK32, groups >> 32, _filled(groups, off_lo), _filled(groups, off_hi))
    x0, x1, x2, x3 = philox4x32(counter, _words(seed))
    words = torch.stack([x0, x1, x2, x3], dim=-1).view(-1, 2, 2)  # (group, pair, lane)
    u = (words.to(torch.float32) * 2.0**-32 + 2.0**-33).double()
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    theta = 2.0 * math.pi * u[..., 1]
    z = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], dim=-1)
    return z.reshape(-1)[:numel].to(torch.float32).view(shape)
