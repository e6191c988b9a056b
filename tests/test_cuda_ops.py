"""The CUDA library's ops on a GPU (backend="cuda"): each equals the reference and the Triton
kernel across shapes, dtypes and layouts; the U-Net and a sampling run equal backend="torch";
the in-kernel noise is deterministic and N(0, 1); a graph-captured step equals the eager one;
torch.compile(fullgraph=True) and autograd go through the ops; compute-sanitizer finds nothing.

Everything here needs a CUDA device on which the library can run, and skips with the backend's
own reason elsewhere. The same cases run on every machine through the host emulator
(tests/test_cuda_library.py); the emulator cannot show the hardware itself.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastddpm import cuda, ops, reference
from fastddpm.sampler import Sampler
from fastddpm.unet import UNet, preset

from . import cuda_cases
from .cuda_cases import DTYPES, GpuRunner

ROOT = Path(__file__).parent.parent
REASON = ops.backend_status()["cuda"]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON != "available", reason=f"backend 'cuda': {REASON}")]
gpu = GpuRunner()
TRITON = ops.backend_status()["triton"] == "available" and os.environ.get("TRITON_INTERPRET", "0") == "0"


def test_the_library_has_code_for_this_device():
    lib = cuda.load_library()
    assert lib.fastddpm_check_device() == cuda.SUCCESS, lib.fastddpm_last_error().decode()


# --- group_norm_silu ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape, groups", cuda_cases.GROUP_NORM_SHAPES + cuda_cases.GPU_GROUP_NORM_SHAPES)
def test_group_norm_silu(shape, groups, dtype, channels_last):
    cuda_cases.check_group_norm_silu(gpu, shape, groups, dtype, channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "variant",
    [{"silu": False, "with_add": False}, {"misaligned": True}, {"param_dtype": torch.float32}],
    ids=["nosilu-noadd", "misaligned", "fp32-params"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_silu_variants(variant, dtype, channels_last):
    cuda_cases.check_group_norm_silu(gpu, (2, 64, 4, 4), 16, dtype, channels_last, **variant)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups", cuda_cases.NHWC_GROUP_NORM_SHAPES)
def test_group_norm_silu_nhwc_tiles(shape, groups, dtype):
    cuda_cases.check_group_norm_silu(gpu, shape, groups, dtype, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "variant",
    [{"silu": False, "with_add": False}, {"misaligned": True}, {"param_dtype": torch.float32}],
    ids=["nosilu-noadd", "misaligned", "fp32-params"],
)
@pytest.mark.parametrize(
    "shape, groups", [((8, 128, 32, 32), 32), ((4, 384, 16, 16), 32), ((1, 32, 48, 48), 8)]
)
def test_group_norm_silu_nhwc_tile_variants(shape, groups, variant, dtype):
    cuda_cases.check_group_norm_silu(gpu, shape, groups, dtype, True, **variant)


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_group_norm_statistics_are_stable_for_a_large_mean(split):
    cuda_cases.check_group_norm_stable(gpu, split)


# --- attention ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", cuda_cases.ATTENTION_SHAPES + cuda_cases.GPU_ATTENTION_SHAPES)
def test_attention(shape, dtype):
    cuda_cases.check_attention(gpu, shape, dtype)


@pytest.mark.parametrize("D", [8, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", cuda_cases.ATTENTION_LAYOUTS)
def test_attention_layouts_and_scale(layout, dtype, D):
    cuda_cases.check_attention(gpu, (2, 2, 100, 130, D), dtype, layout, scale=0.3)


def test_attention_refuses_a_head_dim_over_512():
    q = torch.randn(1, 1, 4, 520, device="cuda")
    with pytest.raises(ValueError, match="head dims up to 512"):
        ops.attention(q, q, q, backend="cuda")


# --- ddpm_step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", cuda_cases.NOISE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", cuda_cases.STEP_SHAPES + cuda_cases.GPU_STEP_SHAPES)
def test_ddpm_step(shape, channels_last, dtype, noise):
    cuda_cases.check_ddpm_step(gpu, shape, dtype, channels_last, noise=noise)


@pytest.mark.parametrize("t_kind", cuda_cases.T_KINDS)
@pytest.mark.parametrize("clip_x0", [True, False], ids=["clip", "direct"])
@pytest.mark.parametrize("table_kind", ["ddpm", "ddim"])
def test_ddpm_step_forms(t_kind, clip_x0, table_kind):
    cuda_cases.check_ddpm_step(
        gpu, (4, 3, 8, 8), torch.float32, False, clip_x0=clip_x0, t_kind=t_kind, table_kind=table_kind
    )


def test_ddpm_step_float32_equals_the_reference_bit_for_bit():
    out, ref = cuda_cases.check_ddpm_step(gpu, (128, 3, 32, 32), torch.float32, False)
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("noise", ["none", "tensor", "seed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("t, bad", cuda_cases.BAD_T_CASES)
def test_ddpm_step_out_of_range_device_t_gives_nan(t, bad, channels_last, dtype, noise):
    table = cuda_cases.step_table("cuda", "ddim" if noise == "none" else "ddpm")
    cuda_cases.check_out_of_range_t(gpu, table, t, bad, dtype, channels_last, noise)


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (3, 3, 5, 7)], ids=["cifar-b64", "odd"])
def test_in_kernel_noise_is_deterministic_standard_normal_philox(shape):
    cuda_cases.check_in_kernel_noise(gpu, shape, seed=2024, offset=3)


def test_in_kernel_noise_differs_across_offsets_and_seeds():
    table, zeros = cuda_cases.noise_table("cuda"), torch.zeros(16, 3, 32, 32, device="cuda")
    draws = [gpu.ddpm_step(zeros, zeros, 0, table, None, s, o, False) for s, o in ((1, 0), (1, 1), (2, 0))]
    for i in range(3):
        for j in range(i):
            corr = torch.corrcoef(torch.stack([draws[i].flatten(), draws[j].flatten()]))[0, 1].item()
            assert abs(corr) < 0.02, (i, j, corr)


# --- the CUDA ops against the Triton kernels ------------------------------------------------------


@pytest.mark.skipif(
    not TRITON, reason=f"backend 'triton' compiled for the GPU: {ops.backend_status()['triton']}"
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equals_the_triton_kernels(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 128, 32, 32, device="cuda", generator=g).to(dtype)
    w, b = torch.randn(128, device="cuda", dtype=dtype), torch.randn(128, device="cuda", dtype=dtype)
    add = torch.randn(8, 128, device="cuda", dtype=dtype)
    q, k, v = (torch.randn(4, 1, 256, 256, device="cuda", generator=g).to(dtype) for _ in range(3))
    table = cuda_cases.step_table("cuda")
    t = torch.arange(8, device="cuda") * 12
    for backend_args in (
        lambda be: ops.group_norm_silu(x, w, b, 32, add=add, backend=be),
        lambda be: ops.attention(q, k, v, backend=be),
        lambda be: ops.ddpm_step(x[:, :3], x[:, 3:6], t, table, seed=5, offset=9, backend=be),
    ):
        out, triton_out = backend_args("cuda"), backend_args("triton")
        cuda_cases.assert_equal_within_tolerance(out, triton_out, dtype, 1e-4)


# --- the U-Net, a sampling run, CUDA graphs, torch.compile, autograd --------------------------------


@pytest.mark.parametrize("heads", [None, 8], ids=["one-head", "head-dim-8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unet_equals_the_torch_backend(heads, dtype):
    torch.manual_seed(0)
    net = (
        UNet(dataclasses.replace(preset("tiny"), attn_head_dim=heads), backend="torch")
        .eval()
        .to("cuda", dtype)
    )
    x = torch.randn(4, 3, 16, 16, device="cuda", dtype=dtype)
    t = torch.tensor([0, 10, 500, 999], device="cuda")
    with torch.no_grad():
        ref = net(x, t)
        net.backend = "cuda"
        out = net(x, t)
    cuda_cases.assert_equal_within_tolerance(out, ref, dtype, 1e-4)


def test_sampling_with_the_cuda_backend_equals_torch():
    torch.manual_seed(0)
    net = UNet(preset("tiny"), backend="torch").eval().cuda()
    sampler = Sampler(net)
    ref = sampler.sample(4, steps=20, generator=torch.Generator().manual_seed(3), progress=False)
    net.backend = "cuda"
    out = sampler.sample(4, steps=20, generator=torch.Generator().manual_seed(3), progress=False)
    assert (out - ref).abs().max().item() < 1e-3


def test_graph_captured_step_equals_eager():
    """One capture, replayed for every t by writing the step index into device memory."""
    table = cuda_cases.step_table("cuda")
    x = torch.randn(16, 3, 32, 32, device="cuda")
    eps = torch.randn_like(x)
    t = torch.zeros((), dtype=torch.long, device="cuda")
    step = lambda: ops.ddpm_step(x, eps, t, table, seed=11, offset=4, backend="cuda")  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for i in (99, 50, 1, 0):
        t.fill_(i)
        graph.replay()
        torch.testing.assert_close(captured, step(), rtol=0, atol=0)
        torch.testing.assert_close(
            captured, ops.ddpm_step(x, eps, i, table, seed=11, offset=4, backend="cuda"), rtol=0, atol=0
        )


def test_graph_captured_step_reads_seed_and_offset_at_replay():
    """Seed and offset as 0-d int64 device tensors: each replay draws at the values written
    before it (what the graph runner relies on), bit for bit the step given them as ints."""
    table = cuda_cases.step_table("cuda")
    x = torch.randn(16, 3, 32, 32, device="cuda")
    eps = torch.randn_like(x)
    seed = torch.tensor(ops.uint64_as_int64(2**64 - 3), device="cuda")
    offset = torch.zeros((), dtype=torch.long, device="cuda")
    step = lambda: ops.ddpm_step(x, eps, 60, table, seed=seed, offset=offset, backend="cuda")  # noqa: E731
    step()  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for value in (5, 2**40 + 7, 5):
        offset.fill_(value)
        graph.replay()
        expected = ops.ddpm_step(x, eps, 60, table, seed=2**64 - 3, offset=value, backend="cuda")
        torch.testing.assert_close(captured, expected, rtol=0, atol=0)


def test_graph_captured_unet_equals_eager():
    torch.manual_seed(0)
    net = UNet(preset("tiny"), backend="cuda").eval().cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    t = torch.tensor([3, 700], device="cuda")
    with torch.no_grad():
        eager = net(x, t)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            net(x, t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = net(x, t)
        graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    table = cuda_cases.step_table("cuda")

    def block(x, w, b, add, t):
        h = ops.group_norm_silu(x, w, b, 8, add=add, backend="cuda")
        N, C, H, W = h.shape
        q = h.reshape(N, 1, C, H * W).transpose(-1, -2)
        a = ops.attention(q, q, q, backend="cuda").transpose(-1, -2).reshape(N, C, H, W)
        return ops.ddpm_step(x[:, :3], a[:, :3], t, table, seed=1, offset=2, backend="cuda")

    args = (
        torch.randn(2, 32, 8, 8, device="cuda"),
        torch.randn(32, device="cuda"),
        torch.randn(32, device="cuda"),
        torch.randn(2, 32, device="cuda"),
        torch.tensor([3, 40], device="cuda"),
    )
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(*args), block(*args), rtol=0, atol=0)


def test_gradients_flow_through_the_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 4, device="cuda", requires_grad=True)
    w, b = (
        torch.randn(16, device="cuda", requires_grad=True),
        torch.randn(16, device="cuda", requires_grad=True),
    )
    add = torch.randn(2, 16, device="cuda", requires_grad=True)
    q = torch.randn(2, 1, 16, 16, device="cuda", requires_grad=True)
    inputs = (x, w, b, add, q)

    def loss(backend):
        y = ops.group_norm_silu(x, w, b, 4, add=add, backend=backend)
        a = ops.attention(q, q * 2, q * 3, backend=backend)
        return (y.square().sum() + a.square().sum()) * 0.5

    grads = torch.autograd.grad(loss("cuda"), inputs)
    ref = torch.autograd.grad(loss("torch"), inputs)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ops_launch_on_the_current_stream():
    """Work queued on a side stream is visible to an op launched on that stream."""
    side = torch.cuda.Stream()
    x = torch.zeros(8, 3, 32, 32, device="cuda")
    with torch.cuda.stream(side):
        x.add_(1.0)  # on the side stream
        out = ops.ddpm_step(x, torch.zeros_like(x), 0, cuda_cases.step_table("cuda"), seed=0, backend="cuda")
    torch.cuda.synchronize()
    ref = reference.ddpm_step(x.cpu(), torch.zeros(8, 3, 32, 32), 0, cuda_cases.step_table("cpu"), seed=0)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-6)


# --- compute-sanitizer -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_is_clean(tool):
    if shutil.which("compute-sanitizer") is None:
        pytest.skip("compute-sanitizer is not on PATH")
    script = ROOT / "csrc" / "tools" / "sanitize.sh"
    result = subprocess.run(["bash", str(script), tool], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
