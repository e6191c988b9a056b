"""The Triton attention's own paths: small blocks forced through the launcher's `blocks` and
`kv_splits` keywords so that every path (q k^T in D chunks, output column chunks, ragged tails,
the split-KV combine) runs at interpreter-sized shapes, each compared with the reference; its plans
(keys split to fill the GPU at small batch, D = 512 in chunks); and the device guard every Triton
launcher runs under. The op itself on every backend: tests/ops/test_attention.py.

Runs where tests/triton_device.py says: the interpreter on the CPU, compiled on a GPU.
"""

import contextlib
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastddpm.kernels._common import device_guard  # noqa: E402
from fastddpm.kernels.attention import launch_attention as launch  # noqa: E402
from fastddpm.kernels.attention import plan  # noqa: E402

from fastddpm import ops  # noqa: E402

from .ops.tolerance import DTYPES, assert_equals_reference  # noqa: E402
from .triton_device import DEVICE, RUNNABLE  # noqa: E402

pytestmark = RUNNABLE


def qkv(B, H, Lq, Lk, D, dtype, layout="contiguous", seed=0):
    """q, k, v on DEVICE in `dtype`. layout "l_contiguous" is the U-Net's view of a 1x1 conv output
    (N, heads, L, D) with L the unit-stride dimension."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in (Lq, Lk, Lk):
        t = torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype)
        if layout == "l_contiguous":
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        out.append(t)
    return out


def check(out, q, k, v, scale=None):
    assert out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous()  # (B, Lq, H, D) in memory: heads interleaved per query
    assert_equals_reference("attention", out, q, k, v, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, blocks, kv_splits",
    [
        ((1, 1, 37, 45, 40), (16, 16, 16, 16), 3),  # 3 q k^T chunks, 3 column chunks, 3 key splits
        ((2, 1, 20, 33, 24), (16, 16, 32, 16), 1),  # q in registers, 2 column chunks, ragged keys
        ((1, 2, 17, 50, 8), (16, 16, 16, 16), 2),  # diffusers' head dim 8, padded to 16
    ],
    ids=["chunks-split3", "columns", "d8-split2"],
)
def test_launch_paths(dtype, shape, blocks, kv_splits):
    B, H, Lq, Lk, D = shape
    q, k, v = qkv(B, H, Lq, Lk, D, dtype, "l_contiguous", seed=1)
    p = plan(B * H, Lq, Lk, D, dtype, q.device, kv_splits=kv_splits, blocks=blocks)
    assert p.kv_splits == kv_splits
    check(launch(q, k, v, kv_splits=kv_splits, blocks=blocks), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dim_512_runs_in_chunks(dtype):
    """The 256x256 models' D = 512 (beyond FlashAttention and SDPA's flash path): the production
    plan takes q k^T and the output in D chunks (tests/ops checks the op's result at D = 512)."""
    p = plan(1, 20, 20, 512, dtype, torch.device(DEVICE))
    assert p.num_dk(512) > 1 and p.num_dv(512) > 1


def test_large_scores_do_not_overflow_in_split_keys():
    """Scores of several hundred, the keys split in 2: each split's online softmax subtracts its
    running max, and the combine rescales by the maxima."""
    q, k, v = qkv(1, 1, 16, 40, 32, torch.float32, seed=3)
    check(launch(q * 8, k * 8, v, kv_splits=2, blocks=(16, 16, 16, 32)), q * 8, k * 8, v)


def test_plan_fills_the_gpu_at_small_batch():
    """CIFAR10 batch 1 (one head, L = 256): the keys are split so that programs reach the SMs;
    batch 64 already has enough programs."""
    cpu = torch.device("cpu")
    small = plan(1, 256, 256, 256, torch.bfloat16, cpu)
    assert small.kv_splits > 1
    assert plan(64, 256, 256, 256, torch.bfloat16, cpu).kv_splits == 1
    assert plan(1, 256, 256, 512, torch.bfloat16, cpu).kv_splits > 1


# --- the device guard (kernels/_common.py), shared by every launcher -----------------------------


NEEDS_TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices: runs on cuda:1 while cuda:0 is current"
)


class _Recorder:
    """Stands in for a kernel: kernel[grid](*args, **kwargs) logs ("launch", name), runs nothing."""

    def __init__(self, name: str, events: list):
        self.name, self.events = name, events

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.events.append(("launch", self.name))


def guarded_launches(monkeypatch, module, run) -> list[tuple]:
    """The events of run() with `module`'s kernels replaced by recorders and its device guard by
    one that logs: ("enter", device), ("launch", kernel), ("exit",)."""
    events: list[tuple] = []

    @contextlib.contextmanager
    def guard(device):
        events.append(("enter", device))
        yield
        events.append(("exit",))

    monkeypatch.setattr(module, "device_guard", guard)
    for name in dir(module):
        if name.endswith("_kernel"):
            monkeypatch.setattr(module, name, _Recorder(name, events))
    run()
    return events


def assert_launched_under(events: list[tuple], device: torch.device, kernels: set[str]) -> None:
    """Every launch (of exactly `kernels`) happened inside one guard entered for `device`."""
    assert events[0] == ("enter", device) and events[-1] == ("exit",), events
    assert {e[0] for e in events[1:-1]} == {"launch"} and {e[1] for e in events[1:-1]} == kernels, events


def test_device_guard_is_the_tensors_gpu():
    """On CUDA the guard makes the tensors' GPU current (built here without entering it); off CUDA
    there is nothing to enter."""
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(device_guard(torch.device("meta")), contextlib.nullcontext)


def test_launches_under_the_inputs_device(monkeypatch):
    q, k, v = qkv(1, 2, 9, 40, 8, torch.float32)
    module = sys.modules[launch.__module__]
    events = guarded_launches(monkeypatch, module, lambda: ops.attention(q, k, v, backend="triton"))
    assert_launched_under(events, q.device, {"_attn_fwd_kernel"})
    run = lambda: launch(q, k, v, kv_splits=2, blocks=(16, 16, 16, 16))  # noqa: E731  (keys split, combined)
    events = guarded_launches(monkeypatch, module, run)
    assert_launched_under(events, q.device, {"_attn_fwd_kernel", "_attn_combine_kernel"})


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels need a CUDA device")
@NEEDS_TWO_GPUS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_runs_on_a_gpu_that_is_not_current(dtype):
    q, k, v = (t.to("cuda:1") for t in qkv(1, 1, 256, 256, 64, dtype, "l_contiguous"))
    with torch.cuda.device(0):
        out = ops.attention(q, k, v, backend="triton")
        split = launch(q, k, v, kv_splits=4)
    check(out, q, k, v)
    check(split, q, k, v)
