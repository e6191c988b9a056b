"""The fused ops at DDPM's shapes on a CUDA GPU: every backend against the alternatives.

    pytest benchmarks/test_ops.py --benchmark-only [--benchmark-json=...]

Rows per op: fastddpm's backends "torch" (the plain-PyTorch reference), "triton" and "cuda"
(through fastddpm.ops, so each backend's own checks are in the time), `torch.compile` of the
reference, and the eager alternatives a user would reach for: F.group_norm + F.silu for the norm,
F.scaled_dot_product_attention under each SDPA backend for attention. Shapes: the CIFAR10 model
at batch 1, 16, 64 and 256, the 256x256 models (LSUN, CelebA-HQ) at batch 1 and 8; the norm in
NCHW and channels_last, attention with one head of D = 256 or 512 and with 32 heads of D = 8.

A timed round is REPEAT back-to-back calls and one synchronize; extra_info holds the time per call
(round median / REPEAT) with the achieved GB/s (norm, step: bytes that must move, once) or
TFLOP/s (attention: 4 B H Lq Lk D). Every row needs a CUDA device and skips with the reason
elsewhere; a backend or SDPA kernel that refuses a shape skips with its own message.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastddpm import ops, reference
from fastddpm.schedule import Schedule

from .common import backend_or_skip

REPEAT = 20
ROUNDS = 10
CUDA = torch.cuda.is_available()

CIFAR_BATCHES = (1, 16, 64, 256)
LARGE_BATCHES = (1, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

pytestmark = pytest.mark.skipif(not CUDA, reason="GPU benchmark: no CUDA device on this machine")


def _ids(shapes):
    return ["x".join(map(str, s)) for s in shapes]


def compiled(fn):
    """torch.compile of a reference op, fresh (the per-function recompile limit would otherwise turn
    later shapes into eager calls)."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def measure(benchmark, fn, *, nbytes: float | None = None, flops: float | None = None) -> None:
    """Time fn (REPEAT calls per round, one synchronize) and report per-call time and throughput."""
    try:
        fn()  # compiles, and lets a backend refuse the shape
    except (ValueError, RuntimeError) as err:
        pytest.skip(f"refused: {str(err).splitlines()[0][:200]}")
    torch.cuda.synchronize()

    def rounds():
        for _ in range(REPEAT):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(rounds, rounds=ROUNDS, warmup_rounds=2)
    per_call = benchmark.stats.stats.median / REPEAT
    benchmark.extra_info["calls_per_round"] = REPEAT
    benchmark.extra_info["us_per_call"] = round(per_call * 1e6, 3)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    if nbytes is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / per_call / 1e9, 1)
    if flops is not None:
        benchmark.extra_info["TFLOP/s"] = round(flops / per_call / 1e12, 2)


# --- group_norm_silu: y = SiLU(GN(x + add)), 32 groups ----------------------------------------------

NORM_SHAPES = [(b, 128, 32, 32) for b in CIFAR_BATCHES] + [(b, 256, 16, 16) for b in CIFAR_BATCHES]
NORM_SHAPES += [(b, 128, 256, 256) for b in LARGE_BATCHES] + [(b, 512, 32, 32) for b in LARGE_BATCHES]
NORM_IMPLS = (*ops.CONCRETE_BACKENDS, "compile", "eager-F")
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}  # NHWC: cuDNN's bf16 layout


@pytest.mark.benchmark(group="group_norm_silu")
@pytest.mark.parametrize("impl", NORM_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=_ids(NORM_SHAPES))
def test_group_norm_silu(benchmark, shape, dtype, layout, impl):
    dt = DTYPES[dtype]
    N, C = shape[:2]
    x = torch.randn(shape, device="cuda", dtype=dt).contiguous(memory_format=LAYOUTS[layout])
    w, b, add = (torch.randn(*s, device="cuda", dtype=dt) for s in ((C,), (C,), (N, C)))
    if impl in ops.CONCRETE_BACKENDS:
        backend_or_skip(impl)

        def fn():
            return ops.group_norm_silu(x, w, b, 32, add=add, backend=impl)
    elif impl == "compile":
        op = compiled(reference.group_norm_silu)

        def fn():
            return op(x, w, b, 32, add=add)
    else:  # what a user writes in eager PyTorch

        def fn():
            return F.silu(F.group_norm(x + add[:, :, None, None], 32, w, b, eps=1e-6))

    measure(benchmark, fn, nbytes=2 * x.numel() * x.element_size())


# --- attention, L = 256: the paper's one head (D = 256, 512), and the 32 heads of D = 8 that ----------
# --- google/ddpm-cifar10-32's config runs (attention_head_dim 8) -------------------------------------

ATTN_SHAPES = [(b, 1, 256, 256) for b in CIFAR_BATCHES] + [(b, 1, 256, 512) for b in LARGE_BATCHES]
ATTN_SHAPES += [(b, 32, 256, 8) for b in CIFAR_BATCHES]
SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
ATTN_IMPLS = (*ops.CONCRETE_BACKENDS, "compile") + tuple(f"sdpa-{k.lower()}" for k in SDPA)


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=_ids(ATTN_SHAPES))
def test_attention(benchmark, shape, dtype, impl):
    B, H, L, D = shape
    q, k, v = (torch.randn(shape, device="cuda", dtype=DTYPES[dtype]) for _ in range(3))
    if impl in ops.CONCRETE_BACKENDS:
        backend_or_skip(impl)

        def fn():
            return ops.attention(q, k, v, backend=impl)
    elif impl == "compile":
        op = compiled(reference.attention)

        def fn():
            return op(q, k, v)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = getattr(SDPBackend, impl.removeprefix("sdpa-").upper())

        def fn():
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v)

    measure(benchmark, fn, flops=4.0 * B * H * L * L * D)


# --- ddpm_step: fp32 x_t and eps, as the sampler keeps them ----------------------------------------

STEP_SHAPES = [(b, 3, 32, 32) for b in CIFAR_BATCHES] + [(b, 3, 256, 256) for b in LARGE_BATCHES]
STEP_IMPLS = (*ops.CONCRETE_BACKENDS, "triton-philox", "cuda-philox", "compile")  # -philox: in-kernel noise


@pytest.mark.benchmark(group="ddpm_step")
@pytest.mark.parametrize("impl", STEP_IMPLS)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=_ids(STEP_SHAPES))
def test_ddpm_step(benchmark, shape, impl):
    table = Schedule.from_name().step_table(device="cuda")
    x, eps, noise = (torch.randn(shape, device="cuda") for _ in range(3))
    t = torch.tensor(500, device="cuda")
    philox = impl.endswith("-philox")
    backend = impl.removesuffix("-philox")
    if backend == "compile":
        op = compiled(reference.ddpm_step)

        def fn():
            return op(x, eps, t, table, noise=noise)
    else:
        backend_or_skip(backend)
        kw = {"seed": 1, "offset": 2} if philox else {"noise": noise}

        def fn():
            return ops.ddpm_step(x, eps, t, table, backend=backend, **kw)

    tensors_moved = 3 if philox else 4  # x_t, eps, (noise), out
    measure(benchmark, fn, nbytes=tensors_moved * x.numel() * x.element_size())
