"""Triton ddpm_step equals the reference; its in-kernel Philox noise is the reference's, and normal.

Runs through Triton's interpreter on the CPU (tests/conftest.py), or compiled on a GPU when
TRITON_INTERPRET=0. Covers both mean forms, fixedlarge / fixedsmall / DDIM tables, t as an int,
a 0-d, (1,) or per-sample (N,) tensor, passed-in and in-kernel noise, three dtypes, contiguous and
channels_last, and the grouped (4 elements per Philox call) and per-element noise layouts.
"""

import math
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastddpm.kernels._common import INTERPRET  # noqa: E402
from fastddpm.kernels.ddpm_step import CHANNELS_LAST, FLAT, GROUPED, philox_normal  # noqa: E402
from fastddpm.kernels.ddpm_step import launch_ddpm_step as launch  # noqa: E402

from fastddpm import ops, reference  # noqa: E402
from fastddpm.schedule import NUM_COEFS, SIGMA, Schedule, StepTable  # noqa: E402

from .test_triton_attention import NEEDS_TWO_GPUS, assert_launched_under, guarded_launches  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(), reason="needs a CUDA device or TRITON_INTERPRET=1"
)
# DESIGN.md, "Equal means": 1e-5 for ddpm_step in fp32; fp16 and bf16 relative to the output scale.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
NOISE_TOLERANCE = 1e-5  # math-library rounding: fp32 log/cos/sin here, float64 in the reference

SCHEDULE = Schedule.from_name()
TABLES = {
    "fixedlarge": SCHEDULE.step_table("ddpm", "fixedlarge", device=DEVICE),
    "fixedsmall": SCHEDULE.step_table("ddpm", "fixedsmall", device=DEVICE),
    "ddim": SCHEDULE.respace("ddim50").step_table("ddim", eta=0.0, device=DEVICE),
    "ddim_eta1": SCHEDULE.respace("ddim50").step_table("ddim", eta=1.0, device=DEVICE),
}


def tensors(shape, dtype, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, eps, noise = (torch.randn(shape, generator=g) * s for s in (1.5, 1.0, 1.0))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [t.to(DEVICE, dtype).contiguous(memory_format=fmt) for t in (x, eps, noise)]


def check(out, x, eps, t, table, dtype, **kwargs):
    """out equals the reference computed in fp32 on the same (rounded) inputs."""
    cpu_table = table.to("cpu")
    t_cpu = t.cpu() if isinstance(t, torch.Tensor) else t
    kw = {k: (v.cpu().float() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    ref = reference.ddpm_step(x.cpu().float(), eps.cpu().float(), t_cpu, cpu_table, **kw)
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    assert out.is_contiguous(memory_format=reference.memory_format_of(x))
    err = (out.cpu().double() - ref.double()).abs().max().item()
    if dtype != torch.float32:
        err /= ref.double().abs().max().item()
    assert err <= TOLERANCE[dtype], err
    return err


@pytest.mark.parametrize("table_name", list(TABLES))
@pytest.mark.parametrize("clip_x0", [True, False], ids=["clip", "direct"])
@pytest.mark.parametrize("noise_from", ["tensor", "seed"])
def test_equals_reference(table_name, clip_x0, noise_from):
    table = TABLES[table_name]
    x, eps, noise = tensors((2, 3, 8, 8), torch.float32)
    kw = {"noise": noise} if noise_from == "tensor" else {"seed": 1234, "offset": 5}
    if not table.stochastic:
        kw = {}
    for t in (len(table) - 1, len(table) // 2, 1, 0):
        out = ops.ddpm_step(x, eps, t, table, clip_x0=clip_x0, backend="triton", **kw)
        check(out, x, eps, t, table, torch.float32, clip_x0=clip_x0, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("noise_from", ["tensor", "seed"])
def test_dtypes_and_layouts(dtype, channels_last, noise_from):
    table = TABLES["fixedlarge"]
    x, eps, noise = tensors((2, 5, 3, 3), dtype, channels_last, seed=1)
    kw = {"noise": noise} if noise_from == "tensor" else {"seed": 7, "offset": 0}
    out = ops.ddpm_step(x, eps, 500, table, backend="triton", **kw)
    check(out, x, eps, 500, table, dtype, **kw)


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor(700),
        torch.tensor([3]),
        torch.tensor([999, 0, 1]),
        torch.tensor([5, 6, 7], dtype=torch.int32),
    ],
)
def test_t_as_a_device_tensor(t):
    """t shared (0-d, (1,)) or per sample (N,), read in the kernel from device memory."""
    table = TABLES["fixedlarge"]
    x, eps, noise = tensors((3, 3, 4, 4), torch.float32, seed=2)
    out = ops.ddpm_step(x, eps, t.to(DEVICE), table, noise=noise, backend="triton")
    check(out, x, eps, t, table, torch.float32, noise=noise)


@pytest.mark.parametrize(
    "t, bad",
    [
        (torch.tensor(1000), [0, 1, 2]),
        (torch.tensor([-1]), [0, 1, 2]),
        (torch.tensor([5, 1000, -3]), [1, 2]),
        (torch.tensor([2**32 + 5, 7, 2**62]), [0, 2]),  # int64 past int32: not wrapped into the table
    ],
    ids=["shared", "one", "per-sample", "int64"],
)
@pytest.mark.parametrize("clip_x0", [True, False], ids=["clip", "direct"])
@pytest.mark.parametrize("noise_from", ["tensor", "seed"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_t_outside_the_table_gives_nan_samples(t, bad, clip_x0, noise_from, channels_last):
    """A device t outside the table (fastddpm.ops cannot see it without a host sync, so this calls
    the launcher) is never clamped: every element of exactly the affected samples is NaN, the rest
    equal the reference, which agrees."""
    table = TABLES["fixedlarge"]
    x, eps, noise = tensors((3, 3, 4, 4), torch.float32, channels_last, seed=4)
    kw = {"noise": noise} if noise_from == "tensor" else {"seed": 3, "offset": 1}
    out = launch(x, eps, t.to(DEVICE), table.coef, table.stochastic, clip_x0=clip_x0, **kw).cpu()
    nan = out.isnan().flatten(1)
    good = [n for n in range(3) if n not in bad]
    assert nan[bad].all() and not nan[good].any()
    kw = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    ref = reference.ddpm_step(x.cpu(), eps.cpu(), t, table.to("cpu"), clip_x0=clip_x0, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOLERANCE[torch.float32], equal_nan=True)


def test_eps_and_noise_in_another_layout():
    """eps and noise in a different memory format from x_t: brought to x_t's; out follows x_t."""
    table = TABLES["fixedsmall"]
    x, eps, noise = tensors((2, 4, 3, 5), torch.float32, seed=3)
    x = x.contiguous(memory_format=torch.channels_last)
    out = ops.ddpm_step(x, eps, 10, table, noise=noise, backend="triton")
    check(out, x, eps, 10, table, torch.float32, noise=noise)


# --- in-kernel noise -------------------------------------------------------------------------------


def identity_noise_table(device) -> StepTable:
    """A one-row table with mean 0 and sigma 1: the step returns z itself."""
    coef = torch.zeros(1, NUM_COEFS)
    coef[0, SIGMA] = 1.0
    return StepTable(coef=coef.to(device), timesteps=torch.zeros(1, dtype=torch.long), stochastic=True)


@pytest.mark.parametrize(
    "shape, layout",
    [((3, 4, 6, 5), GROUPED), ((3, 5, 3, 3), FLAT), ((2, 4, 6, 5), FLAT), ((2, 5, 3, 7), CHANNELS_LAST)],
    ids=["grouped", "flat-ragged", "flat-forced", "channels-last"],
)
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**64 - 1, 2**32 + 9), (12345, 2**63)])
def test_in_kernel_noise_is_the_reference_layout(shape, layout, seed, offset):
    """z from the step kernel equals reference.philox_normal element for element, per (n, c, h, w),
    whatever the layout (a channels_last tensor gets the same z as a contiguous one)."""
    x = torch.zeros(shape, device=DEVICE)
    if layout == CHANNELS_LAST:
        x = x.contiguous(memory_format=torch.channels_last)
    table = identity_noise_table(DEVICE)
    z = launch(x, x, 0, table.coef, table.stochastic, seed=seed, offset=offset, clip_x0=False, layout=layout)
    ref = reference.philox_normal(seed, offset, shape)
    assert (z.cpu() - ref).abs().max().item() <= NOISE_TOLERANCE


@pytest.mark.parametrize(
    "shape, layout",
    [((2, 4, 6, 5), GROUPED), ((3, 5, 3, 3), FLAT), ((2, 5, 3, 7), CHANNELS_LAST)],
    ids=["grouped", "flat", "channels-last"],
)
@pytest.mark.parametrize("on_device", ["offset", "seed", "both"])
@pytest.mark.parametrize("seed, offset", [(7, 3), (2**64 - 1, 2**63 + 2**32 + 9)])
def test_seed_and_offset_tensors_equal_ints_bit_for_bit(shape, layout, on_device, seed, offset):
    """A 0-d int64 device tensor (read in the kernel, as a CUDA graph replays it) gives exactly
    the step of the same value passed as an int; values >= 2**63 are held as their int64 bits."""
    table = TABLES["fixedlarge"]
    x, eps, _ = tensors(shape, torch.float32, layout == CHANNELS_LAST, seed=6)
    as_tensor = {"seed": seed, "offset": offset}
    for name in ("seed", "offset") if on_device == "both" else (on_device,):
        as_tensor[name] = torch.tensor(ops.uint64_as_int64(as_tensor[name]), device=DEVICE)
    ints = launch(x, eps, 600, table.coef, table.stochastic, seed=seed, offset=offset, layout=layout)
    tensors_ = launch(x, eps, 600, table.coef, table.stochastic, layout=layout, **as_tensor)
    assert torch.equal(tensors_, ints)
    assert torch.equal(ops.ddpm_step(x, eps, 600, table, backend="triton", **as_tensor), ints)


def test_in_kernel_noise_is_deterministic_and_differs_across_seeds_and_offsets():
    table = TABLES["fixedlarge"]
    x, eps, _ = tensors((2, 3, 8, 8), torch.float32, seed=4)
    a = ops.ddpm_step(x, eps, 400, table, seed=1, offset=0, backend="triton")
    assert torch.equal(a, ops.ddpm_step(x, eps, 400, table, seed=1, offset=0, backend="triton"))
    for other in ({"seed": 2, "offset": 0}, {"seed": 1, "offset": 1}, {"seed": 1 + 2**32, "offset": 0}):
        b = ops.ddpm_step(x, eps, 400, table, backend="triton", **other)
        assert (a != b).float().mean().item() > 0.99


def test_in_kernel_noise_is_standard_normal():
    """2^18 draws: mean and variance within 5 standard errors, and the Kolmogorov-Smirnov statistic
    against the normal CDF below its critical value at significance 0.001 (asymptotic
    c(alpha) = sqrt(-ln(alpha / 2) / 2) = 1.949, D_crit = c / sqrt(n)). The draws are a fixed
    function of (seed, offset), so this is deterministic; a bad generator fails it."""
    n = 2**18
    z = philox_normal(2024, 3, (n,), DEVICE, block=4096).cpu().double()
    assert torch.equal(z[:4096], philox_normal(2024, 3, (4096,), DEVICE).cpu().double())  # other blocks
    assert (z - reference.philox_normal(2024, 3, (n,)).double()).abs().max().item() <= NOISE_TOLERANCE
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / (n - 1))
    zs, _ = z.sort()
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < math.sqrt(-math.log(0.001 / 2) / 2) / math.sqrt(n), ks
    # Neighbouring lanes and Box-Muller partners are uncorrelated.
    for lag in (1, 2, 4):
        assert abs(torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()) < 5 / math.sqrt(n)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_step_in_a_cuda_graph():
    """Captured once with t a device tensor, replayed for several t: equals the reference each time."""
    table = TABLES["fixedlarge"]
    x, eps, _ = tensors((8, 3, 32, 32), torch.float32, seed=5)
    t = torch.zeros((), dtype=torch.long, device=DEVICE)
    ops.ddpm_step(x, eps, t, table, seed=9, offset=1, backend="triton")  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.ddpm_step(x, eps, t, table, seed=9, offset=1, backend="triton")
    for step in (999, 500, 1, 0):
        t.fill_(step)
        graph.replay()
        check(out, x, eps, step, table, torch.float32, seed=9, offset=1)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_captured_step_reads_the_offset_at_replay():
    """Seed and offset as device tensors: each replay draws the noise of the offset written before it."""
    table = TABLES["fixedlarge"]
    x, eps, _ = tensors((4, 3, 32, 32), torch.float32, seed=7)
    seed = torch.tensor(ops.uint64_as_int64(2**64 - 5), device=DEVICE)
    offset = torch.zeros((), dtype=torch.long, device=DEVICE)
    ops.ddpm_step(x, eps, 500, table, seed=seed, offset=offset, backend="triton")  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.ddpm_step(x, eps, 500, table, seed=seed, offset=offset, backend="triton")
    for value in (3, 2**40 + 1, 3):
        offset.fill_(value)
        graph.replay()
        assert torch.equal(
            out, ops.ddpm_step(x, eps, 500, table, seed=2**64 - 5, offset=value, backend="triton")
        )


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels at full DDPM sizes need a CUDA device")
@pytest.mark.parametrize("shape", [(256, 3, 32, 32), (8, 3, 256, 256)])
def test_ddpm_shapes_on_gpu(shape):
    table = TABLES["fixedlarge"]
    for channels_last in (False, True):
        x, eps, noise = tensors(shape, torch.float32, channels_last)
        check(ops.ddpm_step(x, eps, 500, table, noise=noise, backend="triton"), x, eps, 500, table,
              torch.float32, noise=noise)  # fmt: skip
        check(ops.ddpm_step(x, eps, 500, table, seed=3, offset=2, backend="triton"), x, eps, 500, table,
              torch.float32, seed=3, offset=2)  # fmt: skip


def test_launches_under_the_inputs_device(monkeypatch):
    """The step and the noise alone are launched inside the device guard of their tensors' device."""
    x, eps, _ = tensors((2, 3, 4, 4), torch.float32)
    module = sys.modules[launch.__module__]
    run = lambda: ops.ddpm_step(x, eps, 5, TABLES["fixedlarge"], seed=1, backend="triton")  # noqa: E731
    assert_launched_under(guarded_launches(monkeypatch, module, run), x.device, {"_ddpm_step_kernel"})
    run = lambda: philox_normal(1, 2, (2, 3), DEVICE)  # noqa: E731
    assert_launched_under(guarded_launches(monkeypatch, module, run), x.device, {"_philox_normal_kernel"})


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels need a CUDA device")
@NEEDS_TWO_GPUS
def test_runs_on_a_gpu_that_is_not_current():
    table = TABLES["fixedlarge"].to("cuda:1")
    x, eps, noise = (v.to("cuda:1") for v in tensors((4, 3, 32, 32), torch.float32, seed=6))
    t = torch.tensor([999, 500, 1, 0], device="cuda:1")
    with torch.cuda.device(0):
        with_noise = ops.ddpm_step(x, eps, t, table, noise=noise, backend="triton")
        seeded = ops.ddpm_step(x, eps, 500, table, seed=3, offset=2, backend="triton")
        z = philox_normal(3, 2, x.shape, "cuda:1")
    check(with_noise, x, eps, t, table, torch.float32, noise=noise)
    check(seeded, x, eps, 500, table, torch.float32, seed=3, offset=2)
    torch.testing.assert_close(z.cpu(), reference.philox_normal(3, 2, x.shape), rtol=0, atol=NOISE_TOLERANCE)
