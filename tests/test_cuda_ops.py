"""The CUDA library on a GPU (backend="cuda"): it has code for the device; its own limit on the
head dim; the float32 step bit for bit the reference's; the ops equal the Triton kernels'; the
U-Net and a sampling run equal backend="torch"; a graph-captured U-Net equals the eager one;
torch.compile(fullgraph=True) and autograd go through the ops; the ops launch on the current
stream; compute-sanitizer finds nothing.

Everything here needs a CUDA device on which the library can run, and skips with the backend's
own reason elsewhere. The ops' cases (shapes, dtypes, layouts, noise, CUDA graphs of the step) run
in tests/ops: on a GPU through the library, elsewhere through the host emulator.
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

from .ops.tables import table
from .ops.tolerance import DTYPES, assert_within_tolerance

ROOT = Path(__file__).parent.parent
REASON = ops.backend_status()["cuda"]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON != "available", reason=f"backend 'cuda': {REASON}")]
TRITON = ops.backend_status()["triton"] == "available" and os.environ.get("TRITON_INTERPRET", "0") == "0"


def test_the_library_has_code_for_this_device():
    lib = cuda.load_library()
    assert lib.fastddpm_check_device() == cuda.SUCCESS, lib.fastddpm_last_error().decode()


def test_attention_refuses_a_head_dim_over_512():
    q = torch.randn(1, 1, 4, 520, device="cuda")
    with pytest.raises(ValueError, match="head dims up to 512"):
        ops.attention(q, q, q, backend="cuda")


def test_ddpm_step_float32_equals_the_reference_bit_for_bit():
    """With z given, the kernel does the reference's float32 operations in the same order."""
    g = torch.Generator().manual_seed(7)
    x, eps, z = (torch.randn(128, 3, 32, 32, generator=g) for _ in range(3))
    i = torch.arange(128) % 100
    out = ops.ddpm_step(
        x.cuda(), eps.cuda(), i.cuda(), table("ddpm100", torch.device("cuda")), noise=z.cuda(), backend="cuda"
    )
    assert torch.equal(
        out.cpu(), reference.ddpm_step(x, eps, i, table("ddpm100", torch.device("cpu")), noise=z)
    )


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
    tab = table("ddpm100", torch.device("cuda"))
    t = torch.arange(8, device="cuda") * 12
    for op, backend_args in (
        ("group_norm_silu", lambda be: ops.group_norm_silu(x, w, b, 32, add=add, backend=be)),
        ("attention", lambda be: ops.attention(q, k, v, backend=be)),
        ("ddpm_step", lambda be: ops.ddpm_step(x[:, :3], x[:, 3:6], t, tab, seed=5, offset=9, backend=be)),
    ):
        assert_within_tolerance(backend_args("cuda"), backend_args("triton"), op, dtype)


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
    assert_within_tolerance(out, ref, None, dtype)


def test_sampling_with_the_cuda_backend_equals_torch():
    torch.manual_seed(0)
    net = UNet(preset("tiny"), backend="torch").eval().cuda()
    sampler = Sampler(net)
    ref = sampler.sample(4, steps=20, generator=torch.Generator().manual_seed(3), progress=False)
    net.backend = "cuda"
    out = sampler.sample(4, steps=20, generator=torch.Generator().manual_seed(3), progress=False)
    assert (out - ref).abs().max().item() < 1e-3


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
    tab = table("ddpm100", torch.device("cuda"))

    def block(x, w, b, add, t):
        h = ops.group_norm_silu(x, w, b, 8, add=add, backend="cuda")
        N, C, H, W = h.shape
        q = h.reshape(N, 1, C, H * W).transpose(-1, -2)
        a = ops.attention(q, q, q, backend="cuda").transpose(-1, -2).reshape(N, C, H, W)
        return ops.ddpm_step(x[:, :3], a[:, :3], t, tab, seed=1, offset=2, backend="cuda")

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
        out = ops.ddpm_step(
            x, torch.zeros_like(x), 0, table("ddpm100", torch.device("cuda")), seed=0, backend="cuda"
        )
    torch.cuda.synchronize()
    ref = reference.ddpm_step(
        x.cpu(), torch.zeros(8, 3, 32, 32), 0, table("ddpm100", torch.device("cpu")), seed=0
    )
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
