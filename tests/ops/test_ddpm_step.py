"""ddpm_step on every backend equals the reference within the contract's tolerance: both mean
forms (clip_x0), fixedlarge / fixedsmall / DDIM tables, the step index as an int or a 0-d, (1,) or
per-sample (N,) tensor, a step index outside the table (NaN samples, never clamped), passed-in
noise (float32 or the input's dtype) and in-kernel Philox noise at (seed, offset) (the reference's,
deterministic, N(0, 1), seed and offset as device tensors), three dtypes, NCHW and channels_last;
the reference itself equals the papers' formulas in float64."""

import math

import numpy as np
import pytest
import torch

from fastddpm import ops, reference
from fastddpm.cases import tolerance
from fastddpm.schedule import Schedule

from ..formulas import step_in_float64
from .backends import needs_gpu
from .tables import identity_noise_table, table
from .tolerance import DTYPES, assert_equals_reference, assert_within_tolerance, reference_output

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
NOISE_BOUND = tolerance("ddpm_step", torch.float32)  # in-kernel z against reference.philox_normal


def tensors(b, shape, dtype=torch.float32, layout="nchw", *, seed=0, noise_dtype=None):
    """x_t (std 1.5), eps (std 1), noise on b's device in dtype (noise: noise_dtype) and layout."""
    g = torch.Generator().manual_seed(seed)
    x, eps, z = (torch.randn(shape, generator=g) * s for s in (1.5, 1.0, 1.0))
    fmt = LAYOUTS[layout]
    dtypes = (dtype, dtype, noise_dtype or dtype)
    return [t.to(b.device, d).contiguous(memory_format=fmt) for t, d in zip((x, eps, z), dtypes, strict=True)]


def noise_kwargs(kind: str, noise: torch.Tensor, seed: int = 1234, offset: int = 5) -> dict:
    """kind "tensor": z passed in; "seed": z drawn in the kernel at (seed, offset); "none": neither."""
    return {"tensor": {"noise": noise}, "seed": {"seed": seed, "offset": offset}, "none": {}}[kind]


def check(b, x, eps, i, tab, **kwargs):
    out = b.ddpm_step(x, eps, i, tab, **kwargs)
    return out, assert_equals_reference("ddpm_step", out, x, eps, i, tab, **kwargs)


# --- the contract -------------------------------------------------------------------------------


@pytest.mark.parametrize("table_name", ["fixedlarge", "fixedsmall", "ddim", "ddim_eta1"])
@pytest.mark.parametrize("clip_x0", [True, False], ids=["clip", "direct"])
@pytest.mark.parametrize("noise_from", ["tensor", "seed"])
def test_equals_reference(backend, table_name, clip_x0, noise_from):
    tab = table(table_name, backend.device)
    x, eps, noise = tensors(backend, (2, 3, 8, 8))
    kw = noise_kwargs(noise_from if tab.stochastic else "none", noise)
    for i in (len(tab) - 1, len(tab) // 2, 1, 0):
        check(backend, x, eps, i, tab, clip_x0=clip_x0, **kw)


STEP_SHAPES = [
    pytest.param((4, 3, 8, 8), id="vec"),  # contiguous: 16-byte vectors, 4-element Philox groups
    pytest.param((3, 3, 5, 7), id="odd"),  # element-wise
    pytest.param((2, 5, 3, 3), id="small"),
]


@pytest.mark.parametrize("noise", ["float32", "same-dtype", "seed"])
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_dtypes_and_layouts(backend, shape, noise):
    """Each dtype and layout; a per-sample step index; noise in float32 or in the input's dtype, or
    from a seed near 2**64."""
    tab = table("ddpm100", backend.device)
    i = torch.tensor([99, 1, 0, 50][: shape[0]], device=backend.device)
    for dtype in DTYPES:
        for layout in LAYOUTS:
            noise_dtype = torch.float32 if noise == "float32" else None
            x, eps, z = tensors(backend, shape, dtype, layout, seed=7, noise_dtype=noise_dtype)
            kw = {"seed": 2**64 - 3, "offset": 12345} if noise == "seed" else {"noise": z}
            check(backend, x, eps * 0.5, i, tab, **kw)


STEP_INDICES = [
    pytest.param(50, id="int"),
    pytest.param(torch.tensor(99), id="0d"),
    pytest.param(torch.tensor([3]), id="shape-1"),
    pytest.param(torch.tensor([99, 1, 0, 50]), id="per-sample"),
    pytest.param(torch.tensor([5, 6, 7, 8], dtype=torch.int32), id="per-sample-int32"),
]


@pytest.mark.parametrize("i", STEP_INDICES)
@pytest.mark.parametrize("clip_x0", [True, False], ids=["clip", "direct"])
@pytest.mark.parametrize("table_name", ["ddpm100", "ddim100"])
def test_step_index_forms(backend, i, clip_x0, table_name):
    """The step index shared (an int, a 0-d or (1,) tensor) or per sample (N,), read on the device."""
    tab = table(table_name, backend.device)
    x, eps, z = tensors(backend, (4, 3, 8, 8), seed=7)
    i = i.to(backend.device) if isinstance(i, torch.Tensor) else i
    check(backend, x, eps, i, tab, noise=z, clip_x0=clip_x0)


def test_per_sample_step_indices_equal_single_steps(backend):
    tab = table("fixedlarge", backend.device)
    x, eps, z = tensors(backend, (3, 2, 4, 4), seed=1)
    per_sample = backend.ddpm_step(x, eps, torch.tensor([5, 500, 999], device=backend.device), tab, noise=z)
    for n, i in enumerate([5, 500, 999]):
        one = slice(n, n + 1)
        single = backend.ddpm_step(
            x[one], eps[one], torch.tensor(i, device=backend.device), tab, noise=z[one]
        )
        assert torch.equal(per_sample[one], single)


def test_eps_and_noise_in_another_layout(backend):
    """eps and noise in a different memory format from x_t: brought to x_t's; the output follows x_t."""
    x, eps, noise = tensors(backend, (2, 4, 3, 5), seed=3)
    check(
        backend,
        x.contiguous(memory_format=torch.channels_last),
        eps,
        10,
        table("fixedsmall", backend.device),
        noise=noise,
    )


def test_a_table_without_noise_needs_neither_noise_nor_seed(backend):
    """DDIM with eta = 0 adds no noise."""
    x, eps, _ = tensors(backend, (2, 3, 4, 4), seed=2)
    check(backend, x, eps, 40, table("ddim100_eta0", backend.device))


# --- a step index outside the table ---------------------------------------------------------------

BAD_INDICES = [  # (i, which samples are bad) for a device-side step index into a table of 100 rows
    pytest.param([5, 100], [False, True], id="past-end"),  # i = num_steps
    pytest.param([-1, 7], [True, False], id="negative"),
    pytest.param([2**40, -(2**40)], [True, True], id="far"),
    pytest.param([2**32 + 5, 7, 2**62], [True, False, True], id="int64"),  # not wrapped into the table
    pytest.param(100, [True, True], id="0d-past-end"),  # a 0-d index applies to every sample
    pytest.param(-1, [True, True], id="0d-negative"),
    pytest.param([-1], [True, True], id="shape-1"),
    pytest.param([99, 0], [False, False], id="edges"),  # the table's first and last rows
]


@pytest.mark.parametrize("noise", ["none", "tensor", "seed"])
@pytest.mark.parametrize("i, bad", BAD_INDICES)
def test_step_index_outside_the_table_gives_nan_samples(backend, i, bad, noise):
    """A device step index outside the table cannot raise (fastddpm.ops cannot look without a host
    sync, so this calls the backend's op itself): every element of exactly the affected samples is
    NaN, never clamped, never an index error; the other samples are the reference's step. In each
    dtype and layout; both mean forms in float32."""
    tab = table("ddim100_eta0" if noise == "none" else "ddpm100", backend.device)
    i, bad = torch.tensor(i, device=backend.device), torch.tensor(bad)
    for dtype in DTYPES:
        for layout in LAYOUTS:
            x, eps, z = tensors(backend, (len(bad), 3, 4, 4), dtype, layout, seed=3)
            kw = noise_kwargs(noise, z, seed=11, offset=0)
            for clip_x0 in (True, False) if dtype == torch.float32 else (True,):
                out = backend.unchecked("ddpm_step")(x, eps, i, tab, clip_x0=clip_x0, **kw).cpu()
                assert out[bad].isnan().all(), f"a sample of i = {i.tolist()} is not all NaN"
                assert not out[~bad].isnan().any()
                if not bad.all():  # the others: the reference's step, with the bad indices made valid
                    i_ok = torch.where(bad, 0, i.cpu())
                    ref = reference_output("ddpm_step", x, eps, i_ok, tab, clip_x0=clip_x0, **kw)
                    assert_within_tolerance(out[~bad], ref[~bad], "ddpm_step", dtype)


def test_ops_refuses_a_cpu_step_index_outside_the_table():
    tab = table("fixedlarge", torch.device("cpu"))
    x = torch.randn(3, 2, 4, 4)
    with pytest.raises(ValueError, match="i is out of range"):
        ops.ddpm_step(x, x, torch.tensor([5, 1000, -1]), tab, noise=x)


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
def test_reference_gathers_a_tensor_index_without_a_host_sync(backend):
    """On meta tensors any read of a value on the host raises: the gather (and its range mask)
    stays on the index's device, so a CUDA graph can capture the step."""
    meta = torch.device("meta")
    tab = Schedule.from_name().step_table(device=meta)
    x = torch.empty(3, 2, 4, 4, device=meta)
    for i in (torch.empty((), dtype=torch.long, device=meta), torch.empty(3, dtype=torch.long, device=meta)):
        assert backend.unchecked("ddpm_step")(x, x, i, tab, noise=x).shape == x.shape


# --- in-kernel noise ------------------------------------------------------------------------------


def test_reference_philox_known_answers():
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


def test_reference_philox_normal_is_standard_normal_and_counter_based():
    z = reference.philox_normal(123, 0, (1 << 18,))
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis of N(0, 1)
    torch.testing.assert_close(reference.philox_normal(123, 0, (10,)), z[:10], rtol=0, atol=0)
    assert not torch.equal(reference.philox_normal(123, 1, (10,)), z[:10])
    assert not torch.equal(reference.philox_normal(124, 0, (10,)), z[:10])


EXTREME_SEEDS = [(0, 0), (2024, 3), (2**64 - 1, 2**32 + 9), (12345, 2**63)]


@pytest.mark.parametrize(
    "shape, layout, seed, offset",
    [((3, 4, 6, 5), "nchw", *so) for so in EXTREME_SEEDS]  # 4 elements per Philox call
    + [((3, 5, 3, 3), "nchw", *so) for so in EXTREME_SEEDS]  # one per element: C * H * W % 4 != 0
    + [((2, 5, 3, 7), "nhwc", *so) for so in EXTREME_SEEDS]
    + [((2, 3, 8, 8), "nchw", 2024, 3), ((3, 3, 5, 7), "nchw", 2024, 3)]
    + [pytest.param((64, 3, 32, 32), "nchw", 2024, 3, marks=pytest.mark.gpu, id="cifar-b64")],
)
def test_in_kernel_noise_is_philox(backend, shape, layout, seed, offset):
    """z from the step equals reference.philox_normal element for element, per (n, c, h, w) whatever
    the layout; the same (seed, offset) gives the same z; z is N(0, 1) (mean and std within 5
    standard errors)."""
    if shape[0] == 64:
        needs_gpu(backend)
    x = torch.zeros(shape, device=backend.device).contiguous(memory_format=LAYOUTS[layout])
    tab = identity_noise_table(backend.device)
    z = backend.ddpm_step(x, x, 0, tab, seed=seed, offset=offset, clip_x0=False)
    assert torch.equal(z, backend.ddpm_step(x, x, 0, tab, seed=seed, offset=offset, clip_x0=False))
    assert (z.cpu() - reference.philox_normal(seed, offset, shape)).abs().max().item() <= NOISE_BOUND
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5 and abs(z.std().item() - 1) < 5 / n**0.5


def test_in_kernel_noise_ignores_the_memory_layout(backend):
    """A channels_last x_t gets the z of the contiguous one, element for element."""
    tab = identity_noise_table(backend.device)
    zeros = torch.zeros(2, 5, 3, 4, device=backend.device)
    z = backend.ddpm_step(zeros, zeros, 0, tab, seed=9, offset=1, clip_x0=False)
    zeros_cl = zeros.contiguous(memory_format=torch.channels_last)
    z_cl = backend.ddpm_step(zeros_cl, zeros_cl, 0, tab, seed=9, offset=1, clip_x0=False)
    assert z_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(z_cl, z)


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
def test_reference_seeded_noise_is_philox_bit_for_bit(backend):
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    tab = table("fixedlarge", backend.device)
    seeded = backend.ddpm_step(x, eps, 300, tab, seed=7, offset=11)
    z = reference.philox_normal(7, 11, x.shape)
    assert torch.equal(seeded, backend.ddpm_step(x, eps, 300, tab, noise=z))
    assert not torch.equal(seeded, backend.ddpm_step(x, eps, 300, tab, seed=7, offset=12))


@pytest.mark.parametrize(
    "shape, layout",
    [((2, 4, 6, 5), "nchw"), ((3, 5, 3, 3), "nchw"), ((2, 5, 3, 7), "nhwc"), ((3, 3, 5, 7), "nchw")],
)
@pytest.mark.parametrize("seed, offset", [(7, 3), (2**64 - 1, 2**63 + 2**32 + 9)])
def test_seed_and_offset_tensors_equal_ints_bit_for_bit(backend, shape, layout, seed, offset):
    """A 0-d int64 device tensor for the offset, the seed or both (read in the kernel, as a replayed
    CUDA graph reads it) gives exactly the step of the same values passed as ints; values >= 2**63
    are held as their int64 bits."""
    tab = table("fixedlarge", backend.device)
    x, eps, _ = tensors(backend, shape, layout=layout, seed=6)
    ints = backend.ddpm_step(x, eps, 600, tab, seed=seed, offset=offset)
    for on_device in (("offset",), ("seed",), ("seed", "offset")):
        as_tensor = {"seed": seed, "offset": offset}
        for name in on_device:
            as_tensor[name] = torch.tensor(ops.uint64_as_int64(as_tensor[name]), device=backend.device)
        assert torch.equal(backend.ddpm_step(x, eps, 600, tab, **as_tensor), ints), on_device
    assert not torch.equal(ints, backend.ddpm_step(x, eps, 600, tab, seed=seed, offset=offset + 1))


def test_in_kernel_noise_is_deterministic_and_differs_across_seeds_and_offsets(backend):
    tab = table("fixedlarge", backend.device)
    x, eps, _ = tensors(backend, (2, 3, 8, 8), seed=4)
    a = backend.ddpm_step(x, eps, 400, tab, seed=1, offset=0)
    assert torch.equal(a, backend.ddpm_step(x, eps, 400, tab, seed=1, offset=0))
    for other in ({"seed": 2, "offset": 0}, {"seed": 1, "offset": 1}, {"seed": 1 + 2**32, "offset": 0}):
        assert (a != backend.ddpm_step(x, eps, 400, tab, **other)).float().mean().item() > 0.99


@pytest.mark.gpu
def test_in_kernel_noise_is_uncorrelated_across_seeds_and_offsets(backend):
    needs_gpu(backend)
    tab, zeros = identity_noise_table(backend.device), torch.zeros(16, 3, 32, 32, device=backend.device)
    draws = [
        backend.ddpm_step(zeros, zeros, 0, tab, seed=s, offset=o, clip_x0=False)
        for s, o in ((1, 0), (1, 1), (2, 0))
    ]
    for a in range(3):
        for b in range(a):
            corr = torch.corrcoef(torch.stack([draws[a].flatten(), draws[b].flatten()]))[0, 1].item()
            assert abs(corr) < 0.02, (a, b, corr)


# --- CUDA graphs and the DDPM networks' sizes, on a GPU -----------------------------------------


def capture(step):
    """A CUDA graph of step() (warmed up on a side stream first) and its output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.mark.gpu
def test_step_in_a_cuda_graph(backend):
    """Captured once with the step index a device tensor, replayed for several: each replay equals
    the eager step bit for bit, and the reference."""
    needs_gpu(backend)
    tab = table("ddpm100", backend.device)
    x, eps, _ = tensors(backend, (16, 3, 32, 32), seed=5)
    i = torch.zeros((), dtype=torch.long, device=backend.device)
    graph, captured = capture(lambda: backend.ddpm_step(x, eps, i, tab, seed=11, offset=4))
    for step in (99, 50, 1, 0):
        i.fill_(step)
        graph.replay()
        assert torch.equal(captured, backend.ddpm_step(x, eps, step, tab, seed=11, offset=4))
        assert_equals_reference("ddpm_step", captured, x, eps, step, tab, seed=11, offset=4)


@pytest.mark.gpu
def test_captured_step_reads_seed_and_offset_at_replay(backend):
    """Seed and offset as 0-d int64 device tensors: each replay draws at the values written before
    it, bit for bit the step given them as ints."""
    needs_gpu(backend)
    tab = table("ddpm100", backend.device)
    x, eps, _ = tensors(backend, (16, 3, 32, 32), seed=7)
    seed = torch.tensor(ops.uint64_as_int64(2**64 - 3), device=backend.device)
    offset = torch.zeros((), dtype=torch.long, device=backend.device)
    graph, captured = capture(lambda: backend.ddpm_step(x, eps, 60, tab, seed=seed, offset=offset))
    for value in (5, 2**40 + 7, 5):
        offset.fill_(value)
        graph.replay()
        assert torch.equal(captured, backend.ddpm_step(x, eps, 60, tab, seed=2**64 - 3, offset=value))


@pytest.mark.gpu
@pytest.mark.parametrize("noise", ["float32", "same-dtype", "seed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "shape", [(128, 3, 32, 32), (256, 3, 32, 32), (4, 3, 256, 256), (8, 3, 256, 256)], ids=str
)
def test_ddpm_shapes_on_gpu(backend, shape, layout, dtype, noise):
    needs_gpu(backend)
    x, eps, z = tensors(
        backend, shape, dtype, layout, noise_dtype=torch.float32 if noise == "float32" else None
    )
    kw = {"seed": 3, "offset": 2} if noise == "seed" else {"noise": z}
    check(backend, x, eps, 50, table("ddpm100", backend.device), **kw)


# --- the reference against the papers' formulas (every backend is held to the reference) ----------


@pytest.mark.parametrize(
    "kind, variance, eta",
    [
        ("ddpm", "fixedlarge", 0),
        ("ddpm", "fixedsmall", 0),
        ("ddim", "fixedlarge", 0.0),
        ("ddim", "fixedlarge", 0.7),
    ],
)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "direct"])
@pytest.mark.parametrize("backend", ["torch"], indirect=True)
def test_reference_equals_the_formulas_in_float64(backend, kind, variance, eta, clip):
    s = Schedule.from_name("linear").respace(50)
    tab = s.step_table(kind, variance, eta, device=backend.device)
    for i in (0, 1, 17, 49):
        g = torch.Generator().manual_seed(i)
        x, eps, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
        out = backend.ddpm_step(
            x.to(backend.device), eps.to(backend.device), i, tab,
            noise=z.to(backend.device) if tab.stochastic else None, clip_x0=clip,
        )  # fmt: skip
        ref = step_in_float64(s, kind, variance, eta, i, *(t.double().numpy() for t in (x, eps, z)), clip)
        assert_within_tolerance(out, torch.from_numpy(np.asarray(ref)), "ddpm_step", torch.float32)
