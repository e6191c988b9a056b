"""The Triton group_norm_silu's own paths: its plans (split, looped and one-tile programs, whole
groups in 16-byte rows for channels_last), each forced through the launcher's `split`, `tile` and
`groups` keywords and compared with the reference, and its launches under the inputs' device.
The op itself on every backend: tests/ops/test_group_norm_silu.py.

Runs through Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1), or
compiled on a GPU when TRITON_INTERPRET=0.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fastddpm.kernels.group_norm_silu import launch_group_norm_silu as launch  # noqa: E402
from fastddpm.kernels.group_norm_silu import plan  # noqa: E402

from fastddpm import ops  # noqa: E402

from .ops.tolerance import DTYPES, assert_equals_reference  # noqa: E402
from .test_triton_attention import NEEDS_TWO_GPUS, assert_launched_under, guarded_launches  # noqa: E402
from .triton_device import DEVICE, RUNNABLE  # noqa: E402

pytestmark = RUNNABLE


def inputs(shape, dtype, channels_last=False, seed=0):
    """x (mean 1, std 2), weight, bias, add: float32 on the CPU, x also in `dtype` and layout on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = torch.randn(shape, generator=g) * 2 + 1
    w, b, add = torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(N, C, generator=g)
    xd = x.to(DEVICE, dtype)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    return xd, w, b, add


def check(out, xd, w, b, add, groups, silu, with_add):
    """out equals the reference on the same (rounded) input, in dtype and layout."""
    dtype = xd.dtype
    w, b, add = w.to(dtype), b.to(dtype), add.to(dtype) if with_add else None
    assert_equals_reference("group_norm_silu", out, xd, w, b, groups, 1e-6, silu=silu, add=add)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, groups, split, tile",
    [
        ((2, 24, 5, 7), 4, 1, 32),  # one program per group loops over 8x4 tiles; groups straddle them
        ((1, 24, 5, 7), 4, 3, 32),  # split: 3 programs per group, stats then apply
        ((1, 12, 9, 9), 3, 4, 64),  # split, 4 x 64 tiles of 4 channels x 16 positions
        ((3, 32, 3, 3), 8, None, None),  # batch 3, 3x3: the heuristic's one tile
    ],
    ids=["looped", "split3", "split4", "onetile"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_launch_paths(dtype, shape, groups, split, tile, channels_last):
    xd, w, b, add = inputs(shape, dtype, channels_last, seed=1)
    p = plan(
        shape[0], shape[1], shape[2] * shape[3], groups, xd.device, channels_last=channels_last,
        itemsize=xd.element_size(), split=split, tile=tile,
    )  # fmt: skip
    assert (p.split > 1) == (split is not None and split > 1)
    assert p.one_tile == (tile is None)
    out = launch(
        xd, w.to(DEVICE, dtype), b.to(DEVICE, dtype), groups, 1e-6, silu=True,
        add=add.to(DEVICE, dtype), split=split, tile=tile,
    )  # fmt: skip
    check(out, xd, w, b, add, groups, True, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, groups, split, tile",
    [
        ((2, 128, 5, 7), 8, None, None),  # one tile: 8 groups of 4 channels side by side per program
        ((1, 128, 5, 7), 8, 3, 64),  # split: each program's positions in 3 chunks, stats then apply
        ((2, 64, 5, 7), 8, 1, 64),  # 2 channels per group, one program loops over its tiles
        ((1, 384, 3, 5), 5, 2, 64),  # 5 groups of 12 per program: the last holds 2 (3 past G), split
    ],
    ids=["onetile", "split3", "looped", "ragged-split"],
)
def test_channels_last_launch_paths(dtype, shape, groups, split, tile):
    N, C, H, W = shape
    xd, w, b, add = inputs(shape, dtype, channels_last=True, seed=2)
    p = plan(
        N, C, H * W, 32, xd.device, channels_last=True, itemsize=xd.element_size(), split=split,
        tile=tile, groups=groups,
    )  # fmt: skip
    assert (p.split > 1) == (split is not None and split > 1) and p.one_tile == (tile is None)
    out = launch(
        xd, w.to(DEVICE, dtype), b.to(DEVICE, dtype), 32, 1e-6, silu=True, add=add.to(DEVICE, dtype),
        split=split, tile=tile, groups=groups,
    )  # fmt: skip
    check(out, xd, w, b, add, 32, True, True)


def test_channels_last_programs_hold_whole_groups_in_16_byte_rows():
    """Every NHWC plan at the U-Net's shapes gives each program whole groups spanning a multiple of
    16 bytes (so each tile row is 16-byte loads); wider rows where one tile per program still fits
    with enough programs, or where no program fits one tile anyway."""
    cpu = torch.device("cpu")
    for itemsize in (4, 2):
        for C, HW in ((64, 1024), (128, 1024), (256, 256), (384, 64), (512, 16), (128, 65536)):
            for N in (1, 256):
                p = plan(N, C, HW, 32, cpu, channels_last=True, itemsize=itemsize)
                assert p.groups_per_program * (C // 32) * itemsize % 16 == 0, (itemsize, C, HW, N)
    # CIFAR10 at batch 256, bf16: programs of 4 groups x 4 channels (32-byte rows) x 1024 positions
    p = plan(256, 128, 1024, 32, cpu, channels_last=True, itemsize=2)
    assert (p.groups_per_program, p.block_c, p.block_hw, p.one_tile) == (4, 16, 1024, True)
    # at batch 1 narrower programs (2 groups, 16 bytes) make twice as many
    assert plan(1, 128, 1024, 32, cpu, channels_last=True, itemsize=2).groups_per_program == 2
    # the 256x256 model at batch 1: no program fits one tile; 64-byte rows (8 groups), split
    p = plan(1, 128, 256 * 256, 32, cpu, channels_last=True, itemsize=2)
    assert p.groups_per_program == 8 and p.split > 1


def test_heuristic_splits_large_groups_at_batch_1():
    """The 256x256 model at batch 1 (32 groups of 4 x 65536) splits; batch 8 (256 groups) does not;
    CIFAR10's groups fit one tile, read once."""
    cpu = torch.device("cpu")
    assert plan(1, 128, 256 * 256, 32, cpu).split > 1
    assert plan(8, 128, 256 * 256, 32, cpu).split == 1
    assert not plan(8, 128, 256 * 256, 32, cpu).one_tile
    for C, HW in ((128, 1024), (256, 256), (384, 1024), (512, 16)):
        assert plan(1, C, HW, 32, cpu).one_tile


@pytest.mark.parametrize("split, tile", [(4, 64), (1, 64)], ids=["split", "looped"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_statistics_are_stable_for_a_large_mean(split, tile, channels_last):
    """Mean 1e3, std 0.1, split and looped programs: the float64 result on the same input is the
    truth (the reference op's own error here is 4.4e-4). The one-tile plan: tests/ops."""
    torch.manual_seed(2)
    x = 1e3 + torch.randn(1, 32, 8, 8) * 0.1
    ones, zeros = torch.ones(32, device=DEVICE), torch.zeros(32, device=DEVICE)
    xd = x.to(DEVICE)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    out = launch(xd, ones, zeros, 4, silu=False, split=split, tile=tile)
    ref = F.group_norm(x.double(), 4, eps=1e-6)
    assert (out.cpu().double() - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("split", [None, 3], ids=["fused", "split"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_launches_under_the_inputs_device(monkeypatch, split, channels_last):
    """Every kernel of the op is launched inside the device guard of x's device (kernels/_common.py)."""
    xd, w, b, add = inputs((1, 24, 5, 7), torch.float32, channels_last)
    module = sys.modules[launch.__module__]
    kernels = {"fused"} if split is None else {"stats", "apply"}
    kernels = {f"_gn_{'nhwc_' if channels_last else ''}{k}_kernel" for k in kernels}
    run = lambda: launch(xd, w.to(DEVICE), b.to(DEVICE), 4, split=split, tile=32 if split else None)  # noqa: E731
    assert_launched_under(guarded_launches(monkeypatch, module, run), xd.device, kernels)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels need a CUDA device")
@NEEDS_TWO_GPUS
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 128, 16, 16), (1, 128, 128, 128)], ids=["fused", "split"])
def test_runs_on_a_gpu_that_is_not_current(channels_last, shape):
    xd, w, b, add = inputs(shape, torch.bfloat16, channels_last)
    xd = xd.to("cuda:1")
    with torch.cuda.device(0):
        out = ops.group_norm_silu(
            xd, w.to(xd.device, xd.dtype), b.to(xd.device, xd.dtype), 32, add=add.to(xd.device, xd.dtype),
            backend="triton",
        )  # fmt: skip
    check(out, xd, w, b, add, 32, True, True)
