"""The CUDA kernels on the host emulator (tests/ops/emulator.py), in what only the emulator can
vary or show: warps skewed between barriers and cp.async copies landing early, which turn a missing
__syncthreads or wait into a wrong result; the library's launch plans; reads past the step table,
which fault against inaccessible pages; and float32 results bit for bit the reference's. The ops
themselves (lockstep warps, copies landing at wait_group): tests/ops, where the "cuda" backend runs
on the emulator without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

import pytest
import torch

from fastddpm import cuda, reference
from fastddpm.schedule import StepTable

from .ops import test_attention as attention_cases
from .ops import test_ddpm_step as step_cases
from .ops import test_group_norm_silu as norm_cases
from .ops.backends import Backend
from .ops.emulator import emulated_ops
from .ops.tables import table
from .ops.tolerance import DTYPES, assert_within_tolerance, reference_output

SKEWED = ["forward", "reverse"]  # one warp running ahead of the others, or behind them


@pytest.fixture(scope="module")
def emulated() -> Backend:
    emulated_ops()  # skips where no g++ can build it
    return Backend("cuda", torch.device("cpu"), emulated=True)


@pytest.fixture(scope="module")
def lib(emulated) -> ctypes.CDLL:
    return emulated_ops().lib


@pytest.mark.parametrize("schedule", SKEWED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", norm_cases.LAYOUTS)
@pytest.mark.parametrize("shape, groups", norm_cases.CUDA_SHAPES)
def test_group_norm_silu_with_skewed_warps(emulated, shape, groups, dtype, layout, schedule, monkeypatch):
    monkeypatch.setenv("FASTDDPM_EMU_SCHEDULE", schedule)
    norm_cases.test_cuda_launch_paths(emulated, shape, groups, dtype, layout)


@pytest.mark.parametrize("schedule", SKEWED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups", norm_cases.CUDA_NHWC_SHAPES)
def test_group_norm_silu_channels_last_tiles_with_skewed_warps(
    emulated, shape, groups, dtype, schedule, monkeypatch
):
    monkeypatch.setenv("FASTDDPM_EMU_SCHEDULE", schedule)
    norm_cases.test_cuda_channels_last_tiles(emulated, shape, groups, dtype)


@pytest.mark.parametrize("schedule", SKEWED)
@pytest.mark.parametrize("add", norm_cases.ADDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", norm_cases.LAYOUTS)
@pytest.mark.parametrize("shape, groups, C1", norm_cases.CUDA_SKIP_SHAPES)
def test_group_norm_silu_skip_with_skewed_warps(
    emulated, shape, groups, C1, dtype, layout, add, schedule, monkeypatch
):
    """h = cat([x, skip], dim=1) read from both in place: groups straddling channel C1, C1 and C2
    off the vector width, split groups, add as rows or a broadcast (stride 0) row."""
    monkeypatch.setenv("FASTDDPM_EMU_SCHEDULE", schedule)
    norm_cases.test_cuda_skip_launch_paths(emulated, shape, groups, C1, dtype, layout, add)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_skip_takes_16_byte_vectors_where_c1_allows(lib, dtype):
    """With skip, NCHW keeps 16-byte vectors whatever C1 (a vector runs along one channel's
    positions); channels_last needs 16 bytes of elements to divide C1 (x's and skip's rows then
    start aligned, and no vector straddles the two), else the element-wise kernel runs."""
    plan = functools.partial(cuda.group_norm_silu_plan, lib, dtype=dtype)
    elem, vec = dtype.itemsize, 16 // dtype.itemsize
    for C1 in (26, 32, 36, 256):
        assert plan((1, 384, 4, 4), 32, False, x_channels=C1)["vector_bytes"] == 16
        want = 16 if C1 % vec == 0 else elem
        assert plan((1, 384, 4, 4), 32, True, x_channels=C1)["vector_bytes"] == want, C1
    assert plan((1, 384, 4, 4), 32, True, x_channels=256) == plan((1, 384, 4, 4), 32, True)
    with pytest.raises(ValueError, match=r"C1 = 0 channels of x must be in \(0, C = 384\]"):
        plan((1, 384, 4, 4), 32, True, x_channels=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_nhwc_blocks_take_many_groups_in_16_byte_vectors(lib, dtype):
    """channels_last: a block normalizes several whole groups, loading 16 bytes along C (it took
    one group of 4 channels, 8-byte loads at a stride of C in 16-bit, before); NCHW keeps one group
    per block; where no 16-byte layout exists the element-wise kernel runs."""
    plan = functools.partial(cuda.group_norm_silu_plan, lib, dtype=dtype)
    elem = dtype.itemsize
    cifar = plan((256, 128, 32, 32), 32, True)
    assert cifar["vector_bytes"] == 16 and cifar["groups_per_block"] >= 4, cifar
    assert cifar["groups_per_block"] * 4 * elem >= 32, "each tile row is at least a 32-byte sector"
    assert cifar["blocks"] == 256 * 32 // cifar["groups_per_block"], "CIFAR10 at batch 256: no split"
    for shape, groups in [((64, 256, 16, 16), 32), ((8, 512, 8, 8), 32), ((2, 1024, 16, 16), 32)]:
        p, group_bytes = plan(shape, groups, True), shape[1] // groups * elem
        assert p["vector_bytes"] == 16 and p["groups_per_block"] * group_bytes >= 32, (shape, p)
        assert p["groups_per_block"] > 1 or group_bytes >= 128, (
            "a group narrower than a line shares its block"
        )
    nchw = plan((256, 128, 32, 32), 32, False)
    assert nchw["groups_per_block"] == 1 and nchw["vector_bytes"] == 16
    assert plan((2, 36, 5, 5), 12, True)["vector_bytes"] == (16 if elem == 4 else elem)
    assert plan((1, 6, 4, 4), 3, True)["vector_bytes"] == elem
    with pytest.raises(ValueError, match="num_groups = 5 must be positive and divide C = 64"):
        plan((1, 64, 4, 4), 5, True)


@pytest.mark.parametrize(
    "cp_async, schedule", [("eager", "forward"), ("eager", "reverse"), ("lazy", "reverse")]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", attention_cases.SHAPES)
def test_attention_with_early_copies_and_skewed_warps(
    emulated, shape, dtype, cp_async, schedule, monkeypatch
):
    """cp.async copies land as early as the hardware may let them (at issue), and warps run
    skewed: a missing wait or barrier shows up as stale or overwritten tiles."""
    monkeypatch.setenv("FASTDDPM_EMU_CP_ASYNC", cp_async)
    monkeypatch.setenv("FASTDDPM_EMU_SCHEDULE", schedule)
    attention_cases.test_head_dims_and_lengths(emulated, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_head_dim_tile_follows_the_head_dim(lib, dtype):
    """The kernel's work scales with its head-dim tile: the smallest power of two >= max(D, 8).
    diffusers' CIFAR10 heads (D = 8) ran fp32 at a tile of 32 and fp16/bf16 at 16 before."""
    heads = (1, 8, 9, 12, 16, 17, 40, 64, 136, 256, 257, 512)
    tiles = [cuda.attention_plan(lib, D, dtype)["head_dim_tile"] for D in heads]
    assert tiles == [8, 8, 16, 16, 16, 32, 64, 64, 256, 256, 512, 512]
    plan = cuda.attention_plan(lib, 8, dtype)
    assert plan["rows_per_block"] >= 16 and plan["threads"] % 32 == 0
    for bad in (0, 513):
        with pytest.raises(ValueError, match=f"head dim D = {bad}; the kernels take 1 <= D <= 512"):
            cuda.attention_plan(lib, bad, dtype)


def test_attention_without_keys_is_zero(emulated):
    q = torch.randn(1, 2, 5, 16, dtype=torch.float16)
    k = torch.randn(1, 2, 0, 16, dtype=torch.float16)
    torch.testing.assert_close(emulated.attention(q, k, k), reference.attention(q, k, k))


def test_ddpm_step_float32_equals_the_reference_bit_for_bit(emulated):
    """With z given, the kernel does the reference's float32 operations in the same order."""
    x, eps, z = step_cases.tensors(emulated, (4, 3, 8, 8), seed=7)
    i = torch.tensor([99, 1, 0, 50])
    tab = table("ddpm100", emulated.device)
    out = emulated.ddpm_step(x, eps * 0.5, i, tab, noise=z)
    assert torch.equal(out, reference.ddpm_step(x, eps * 0.5, i, tab, noise=z))


def test_ddpm_step_without_noise_equals_the_reference_bit_for_bit(emulated):
    """DDIM with eta = 0 adds no noise: neither a noise tensor nor a seed is read."""
    tab = table("ddim100_eta0", emulated.device)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(emulated.ddpm_step(x, eps, 40, tab), reference.ddpm_step(x, eps, 40, tab))


def guarded_copy(coef: torch.Tensor, at_end: bool) -> tuple[torch.Tensor, mmap.mmap]:
    """coef's values in memory between two inaccessible pages, starting right after the first
    (at_end=False) or ending right before the second: a read past either end of the table
    faults. Returns the tensor and the mapping that holds it."""
    page, nbytes = mmap.PAGESIZE, coef.numel() * coef.element_size()
    data_pages = -(-nbytes // page)
    region = mmap.mmap(-1, (data_pages + 2) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for guard in (base, base + (data_pages + 1) * page):
        assert libc.mprotect(guard, page, 0) == 0  # PROT_NONE, os.strerror(ctypes.get_errno())
    start = base + (data_pages + 1) * page - nbytes if at_end else base + page
    view = torch.frombuffer((ctypes.c_float * coef.numel()).from_address(start), dtype=torch.float32)
    return view.view(coef.shape).copy_(coef), region


@pytest.mark.parametrize("noise", ["none", "tensor", "seed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", step_cases.LAYOUTS)
@pytest.mark.parametrize("i, bad", step_cases.BAD_INDICES)
def test_ddpm_step_reads_nothing_outside_the_table(emulated, i, bad, layout, dtype, noise):
    """A step index outside [0, num_steps) gives NaN samples without reading outside the table: the
    table sits against inaccessible pages on either side, so a read past its start or end faults."""
    tab = table("ddim100_eta0" if noise == "none" else "ddpm100", emulated.device)
    x, eps, z = step_cases.tensors(emulated, (len(bad), 3, 4, 4), dtype, layout, seed=3)
    kw = step_cases.noise_kwargs(noise, z, seed=11, offset=0)
    i, bad = torch.tensor(i), torch.tensor(bad)
    for at_end in (False, True):
        coef, region = guarded_copy(tab.coef, at_end)
        guarded = StepTable(coef=coef, timesteps=tab.timesteps, stochastic=tab.stochastic)
        out = emulated.ddpm_step(x, eps, i, guarded, **kw)
        assert out[bad].isnan().all() and not out[~bad].isnan().any()
        if not bad.all():
            ref = reference_output("ddpm_step", x, eps, torch.where(bad, 0, i), tab, **kw)
            assert_within_tolerance(out[~bad], ref[~bad], "ddpm_step", dtype)
        del coef, guarded, out  # the mapping outlives every view of it
        region.close()
