"""The reference ops (and the ops seam on the torch backend) against torch modules and float64 math."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastddpm import ops, reference
from fastddpm.schedule import Schedule

from .formulas import step_in_float64

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # DESIGN.md, "Equal means"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_add", [True, False])
def test_group_norm_silu_equals_torch_modules(silu, with_add):
    torch.manual_seed(0)
    x, add = torch.randn(2, 64, 8, 8), torch.randn(2, 64)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    with torch.no_grad():
        ref = norm(x + add[:, :, None, None] if with_add else x)
        ref = F.silu(ref) if silu else ref
        out = ops.group_norm_silu(
            x, norm.weight, norm.bias, 32, 1e-6, silu=silu, add=add if with_add else None, backend="torch"
        )
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_dtypes_and_layouts(dtype, channels_last):
    torch.manual_seed(1)
    x, w, b, add = torch.randn(2, 32, 4, 4), torch.randn(32), torch.randn(32), torch.randn(2, 32)
    ref = reference.group_norm_silu(x.double(), w.double(), b.double(), 8, add=add.double())
    xl = x.to(dtype)
    if channels_last:
        xl = xl.contiguous(memory_format=torch.channels_last)
    out = ops.group_norm_silu(xl, w.to(dtype), b.to(dtype), 8, add=add.to(dtype), backend="torch")
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert relative_error(out, ref) <= TOLERANCE[dtype]


def test_group_norm_statistics_are_stable_for_a_large_mean():
    """Mean 1e3, std 0.1 and 0.01: the float64 result on the same float32 input is the truth."""
    torch.manual_seed(2)
    for std in (0.1, 0.01):
        x = 1e3 + torch.randn(1, 32, 8, 8) * std
        w, b = torch.ones(32), torch.zeros(32)
        out = ops.group_norm_silu(x, w, b, 32, silu=False, backend="torch")
        ref = F.group_norm(x.double(), 32, eps=1e-6)
        assert (out.double() - ref).abs().max().item() < 1e-5
        # F.group_norm alone in float32 (one fused pass) misses by 1e-3 and more here.
        assert (F.group_norm(x, 32, eps=1e-6).double() - ref).abs().max().item() > 1e-4
    # The unstable one-pass formula E[x^2] - E[x]^2 in float32 fails the same bound.
    g = x.view(1, 32, -1)
    naive_var = (g.square().mean(-1, keepdim=True) - g.mean(-1, keepdim=True).square()).clamp_min(0)
    naive = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(naive_var + 1e-6)).view_as(x)
    assert (naive.double() - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("heads, lq, lk, d", [(1, 16, 16, 32), (4, 10, 7, 8), (1, 5, 9, 512)])
def test_attention_equals_sdpa(heads, lq, lk, d):
    torch.manual_seed(3)
    q, k, v = torch.randn(2, heads, lq, d), torch.randn(2, heads, lk, d), torch.randn(2, heads, lk, d)
    out = ops.attention(q, k, v, backend="torch")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert out.shape == (2, heads, lq, d)
    assert (out.double() - ref).abs().max().item() <= 1e-5
    scaled = ops.attention(q, k, v, scale=0.3, backend="torch")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert (scaled.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_low_precision_within_tolerance(dtype):
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 1, 64, 256) * 3 for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = ops.attention(q.to(dtype), k.to(dtype), v.to(dtype), backend="torch")
    assert out.dtype == dtype
    assert relative_error(out, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize(
    "kind, variance, eta",
    [
        ("ddpm", "fixedlarge", 0),
        ("ddpm", "fixedsmall", 0),
        ("ddim", "fixedlarge", 0.0),
        ("ddim", "fixedlarge", 0.7),
    ],
)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("i", [0, 1, 17, 49])
def test_ddpm_step_equals_the_formulas_in_float64(kind, variance, eta, clip, i):
    s = Schedule.from_name("linear").respace(50)
    table = s.step_table(kind, variance, eta)
    g = torch.Generator().manual_seed(i)
    x, eps, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    out = ops.ddpm_step(
        x, eps, i, table, noise=z if table.stochastic else None, clip_x0=clip, backend="torch"
    )
    ref = step_in_float64(
        s, kind, variance, eta, i, x.double().numpy(), eps.double().numpy(), z.double().numpy(), clip
    )
    assert np.abs(out.double().numpy() - ref).max() <= 1e-5


def test_ddpm_step_per_sample_t_and_device_tensor_t():
    table = Schedule.from_name().step_table()
    x, eps, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    per_sample = ops.ddpm_step(x, eps, torch.tensor([5, 500, 999]), table, noise=z)
    for n, t in enumerate([5, 500, 999]):
        single = ops.ddpm_step(x[n : n + 1], eps[n : n + 1], torch.tensor(t), table, noise=z[n : n + 1])
        torch.testing.assert_close(per_sample[n : n + 1], single, rtol=0, atol=0)


def test_ddpm_step_tensor_t_outside_the_table_gives_nan_samples():
    """A tensor t outside the table, passed to the reference itself (fastddpm.ops rejects it on
    the CPU; on a GPU it cannot look without a host sync): never clamped, never an index error;
    every element of exactly the affected samples is NaN."""
    table = Schedule.from_name().step_table()
    x, eps, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for clip, kw in ((True, {"noise": z}), (False, {"noise": z}), (True, {"seed": 5, "offset": 2})):
        out = reference.ddpm_step(x, eps, torch.tensor([5, 1000, -1]), table, clip_x0=clip, **kw)
        assert out[1:].isnan().all()
        assert torch.equal(out[:1], reference.ddpm_step(x, eps, 5, table, clip_x0=clip, **kw)[:1])
        for t in (torch.tensor(1000), torch.tensor([-1]), torch.tensor(2**40)):
            assert reference.ddpm_step(x, eps, t, table, clip_x0=clip, **kw).isnan().all()
    with pytest.raises(ValueError, match="i is out of range"):
        ops.ddpm_step(x, eps, torch.tensor([5, 1000, -1]), table, noise=z)


def test_ddpm_step_gathers_a_tensor_t_without_a_host_sync():
    """On meta tensors any read of a value on the host raises: the gather (and its range mask)
    stays on t's device, so a CUDA graph can capture the step."""
    meta = torch.device("meta")
    table = Schedule.from_name().step_table(device=meta)
    x = torch.empty(3, 2, 4, 4, device=meta)
    for t in (torch.empty((), dtype=torch.long, device=meta), torch.empty(3, dtype=torch.long, device=meta)):
        assert reference.ddpm_step(x, x, t, table, noise=x).shape == x.shape


def test_ddpm_step_seeded_noise_is_philox():
    table = Schedule.from_name().step_table()
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    seeded = ops.ddpm_step(x, eps, 300, table, seed=7, offset=11)
    z = reference.philox_normal(7, 11, x.shape)
    torch.testing.assert_close(seeded, ops.ddpm_step(x, eps, 300, table, noise=z), rtol=0, atol=0)
    assert not torch.equal(seeded, ops.ddpm_step(x, eps, 300, table, seed=7, offset=12))


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        out = reference.philox4x32(tuple(torch.tensor([c]) for c in counter), key)
        assert tuple(int(o) for o in out) == expected


def test_philox_normal_is_standard_normal_and_counter_based():
    z = reference.philox_normal(123, 0, (1 << 18,))
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis of N(0, 1)
    torch.testing.assert_close(reference.philox_normal(123, 0, (10,)), z[:10], rtol=0, atol=0)
    assert not torch.equal(reference.philox_normal(123, 1, (10,)), z[:10])
    assert not torch.equal(reference.philox_normal(124, 0, (10,)), z[:10])
