"""The "triton" backend end to end: availability, its own input errors, the U-Net and a sampling run
against backend="torch", torch.compile(fullgraph=True), and gradients through the reference.

Runs where tests/triton_device.py says: the interpreter on the CPU, compiled on a GPU.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")


import fastddpm  # noqa: E402
from fastddpm import kernels, ops  # noqa: E402
from fastddpm.schedule import Schedule  # noqa: E402
from fastddpm.solver_table import COL_Z, NUM_INPUTS, NUM_ROWS, ROW_X, SolverTable  # noqa: E402

from .conftest import tiny_unet as conftest_tiny_unet  # noqa: E402
from .triton_device import DEVICE, INTERPRET, RUNNABLE  # noqa: E402

pytestmark = RUNNABLE


def tiny_unet(backend: str) -> fastddpm.UNet:
    """The tiny preset (2 levels, attention at 8x8 over 64 channels), random weights, norms perturbed."""
    return conftest_tiny_unet(backend).to(DEVICE)


# --- availability and errors ---------------------------------------------------------------------


def test_available_here_and_says_why_not_without_cuda_or_interpreter():
    assert kernels.unavailable_reason() is None
    assert ops.backend_status()["triton"] == "available"
    if torch.cuda.is_available():
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", "import fastddpm.kernels as k; print(k.unavailable_reason())"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_inputs_the_kernels_cannot_take_raise_value_errors(monkeypatch):
    """CPU tensors outside the interpreter (here: the backend's ops with it turned off) are refused
    with a one-line error naming the op and the tensor; so is attention without keys."""
    from fastddpm.kernels import _common

    norm, attention, step = (
        ops.backend_op("triton", op) for op in ("group_norm_silu", "attention", "ddpm_step")
    )
    monkeypatch.setattr(_common, "INTERPRET", False)
    cpu = torch.device("cpu")
    x = torch.empty(1, 8, 4, 4, device=cpu)
    with pytest.raises(ValueError, match=r"group_norm_silu \(backend 'triton'\): x is on cpu; .*CUDA"):
        norm(x, torch.ones(8), torch.zeros(8), 4)
    q = torch.empty(1, 1, 4, 8, device=cpu)
    with pytest.raises(ValueError, match=r"attention \(backend 'triton'\): q is on cpu"):
        attention(q, q, q)
    table = Schedule.from_name().step_table(device=cpu)
    with pytest.raises(ValueError, match=r"ddpm_step \(backend 'triton'\): x_t is on cpu"):
        step(x, x, 3, table, seed=0)
    monkeypatch.undo()
    q, k = torch.randn(1, 1, 4, 8, device=DEVICE), torch.randn(1, 1, 0, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"no keys \(Lk = 0\)"):
        ops.attention(q, k, k, backend="triton")


def test_meta_tensors_run_the_custom_ops_fakes():
    """Shape-only tensors (how benchmarks.counter counts a forward): no kernel, outputs of the
    right shape, dtype and memory format."""
    meta = torch.device("meta")
    x = torch.empty(2, 8, 4, 4, device=meta).contiguous(memory_format=torch.channels_last)
    y = ops.group_norm_silu(x, torch.ones(8, device=meta), torch.zeros(8, device=meta), 4, backend="triton")
    assert y.device == meta and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    q = torch.empty(1, 2, 5, 8, device=meta, dtype=torch.bfloat16)
    out = ops.attention(q, q, q, backend="triton")
    assert out.device == meta and out.shape == q.shape and out.dtype == torch.bfloat16
    table = Schedule.from_name().step_table(device=meta)
    x = torch.empty(2, 3, 4, 4, device=meta)
    assert ops.ddpm_step(x, x, 3, table, seed=0, backend="triton").shape == x.shape
    weights = np.zeros((2, NUM_ROWS, NUM_INPUTS + 1))
    weights[:, ROW_X, COL_Z] = 1.0
    solver = SolverTable.from_float64(
        "meta", weights, np.array([[0, -1], [0, -1]]), np.arange(2), np.ones(2), 1.0, False, meta
    )
    history = torch.empty(1, 2, 3, 4, 4, device=meta)
    assert ops.multistep_update(x, x, history, 1, solver, seed=0, backend="triton").shape == x.shape


# --- the U-Net and the sampler --------------------------------------------------------------------


def test_unet_equals_torch_backend():
    net = tiny_unet("torch")
    x, t = torch.randn(2, 3, 16, 16, device=DEVICE), torch.tensor([3, 700], device=DEVICE)
    with torch.no_grad():
        ref = net(x, t)
        net.backend = "triton"
        out = net(x, t)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_short_sampling_run_gives_the_same_images():
    """Two respaced ancestral steps from the same x_T and generator: backend triton (U-Net ops and
    the step) gives backend torch's images."""
    images = {}
    for backend in ("torch", "triton"):
        sampler = fastddpm.Sampler(tiny_unet(backend))
        x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        images[backend] = sampler.sample(
            2, steps=2, x_T=x_T, generator=torch.Generator().manual_seed(2), progress=False
        )
    assert (images["triton"] - images["torch"]).abs().max().item() <= 1e-4


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of the U-Net with backend="triton": one graph (the custom ops'
    fake kernels trace), equal to eager. The CPU test uses the aot_eager backend (Inductor's C++
    build takes minutes on two cores); Inductor itself compiles the three ops in one small graph."""
    net = tiny_unet("triton")
    x, t = torch.randn(1, 3, 16, 16, device=DEVICE), torch.tensor([5], device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = net(x, t)
        compiled = torch.compile(net, fullgraph=True, backend="aot_eager" if INTERPRET else "inductor")(x, t)
    assert (compiled - eager).abs().max().item() <= 1e-5

    table = Schedule.from_name().step_table(device=DEVICE)

    def block(h, w, b, add, eps):
        h = ops.group_norm_silu(h, w, b, 4, add=add, backend="triton")
        N, C, H, W = h.shape
        seq = h.reshape(N, 1, C, H * W).transpose(-1, -2)
        h = h + ops.attention(seq, seq, seq, backend="triton").transpose(-1, -2).reshape(N, C, H, W)
        return ops.ddpm_step(h, eps, 10, table, seed=3, offset=4, backend="triton")

    args = (
        torch.randn(2, 16, 4, 4, device=DEVICE),
        torch.randn(16, device=DEVICE),
        torch.randn(16, device=DEVICE),
        torch.randn(2, 16, device=DEVICE),
        torch.randn(2, 16, 4, 4, device=DEVICE),
    )
    torch._dynamo.reset()
    assert (torch.compile(block, fullgraph=True)(*args) - block(*args)).abs().max().item() <= 1e-5


# --- autograd ----------------------------------------------------------------------------------------


def grads(fn, inputs):
    """fn(*inputs) and the gradients of a fixed random projection of it, for every float input."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves if leaf.requires_grad]


@pytest.mark.parametrize("op", ["group_norm_silu", "attention", "ddpm_step"])
def test_gradients_equal_the_reference(op):
    """The ops are differentiable (backward recomputes the reference); training can use them."""
    g = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    table = Schedule.from_name().step_table(device=DEVICE)
    if op == "group_norm_silu":
        inputs = (rand(2, 8, 3, 3), rand(8), rand(8), rand(2, 8))
        calls = {
            b: (lambda x, w, bias, add, b=b: ops.group_norm_silu(x, w, bias, 4, add=add, backend=b))
            for b in ("torch", "triton")
        }
    elif op == "attention":
        inputs = (rand(1, 2, 5, 16), rand(1, 2, 7, 16), rand(1, 2, 7, 16))
        calls = {b: (lambda q, k, v, b=b: ops.attention(q, k, v, backend=b)) for b in ("torch", "triton")}
    else:
        inputs = (rand(2, 3, 4, 4), rand(2, 3, 4, 4), rand(2, 3, 4, 4))
        calls = {
            b: (lambda x, e, z, b=b: ops.ddpm_step(x, e, 300, table, noise=z, backend=b))
            for b in ("torch", "triton")
        }
    out, got = grads(calls["triton"], inputs)
    ref_out, want = grads(calls["torch"], inputs)
    assert (out - ref_out).abs().max().item() <= 1e-4
    assert len(got) == len(want) == len(inputs)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
