"""attention on every backend equals the reference within the contract's tolerance: three dtypes;
head dims 1 to 512; Lq and Lk ragged against the tiles and unequal; q, k, v contiguous, in the
U-Net's (N, heads, D, L) storage or as rows inside wider rows; a given scale; scores large enough
to overflow a naive softmax or fp16; and the explicit formula in float64. The reference itself
equals SDPA in float64."""

import pytest
import torch
import torch.nn.functional as F

from .backends import needs_gpu
from .tolerance import DTYPES, assert_equals_reference, assert_within_tolerance

LAYOUTS = ["contiguous", "unet", "padded-rows"]


def qkv(b, B, H, Lq, Lk, D, dtype, layout="contiguous", *, seed=0, scale=1.0):
    """q (B, H, Lq, D) and k, v (B, H, Lk, D) on b's device. layout "unet": (N, heads, D, L)
    transposed to (N, heads, L, D), L the unit-stride dimension, as the U-Net hands them over;
    "padded-rows": rows of D inside rows of D + 8 (strided positions, contiguous D)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in (Lq, Lk, Lk):
        t = (torch.randn(B, H, L, D, generator=g) * scale).to(b.device, dtype)
        if layout == "unet":
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif layout == "padded-rows":
            wide = torch.zeros(B, H, L, D + 8, dtype=dtype, device=b.device)
            wide[..., :D] = t
            t = wide[..., :D]
        out.append(t)
    return out


def check(b, q, k, v, scale=None):
    out = b.attention(q, k, v, scale)
    assert out.shape == q.shape
    assert_equals_reference("attention", out, q, k, v, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_reference(backend, dtype, layout):
    """Lq = 23, Lk = 19, D = 40: all ragged."""
    check(backend, *qkv(backend, 2, 2, 23, 19, 40, dtype, layout))


SHAPES = [  # (B, heads, Lq, Lk, D)
    pytest.param((1, 1, 40, 70, 64), id="d64-masked"),  # Lq, Lk past the tiles' ends
    pytest.param((2, 3, 33, 33, 8), id="d8-heads"),  # diffusers' CIFAR10 heads of dim 8
    pytest.param((1, 2, 21, 70, 16), id="d16"),
    pytest.param((1, 1, 19, 37, 12), id="d12"),  # 16-bit rows of 24 bytes: element loads
    pytest.param((1, 2, 20, 37, 40), id="d40"),  # D not a multiple of 8: element loads
    pytest.param((1, 1, 17, 45, 136), id="d136"),  # D in (128, 256]: two CUDA warps share a row
    pytest.param((1, 1, 20, 40, 256), id="d256"),
    pytest.param((1, 1, 20, 40, 512), id="d512"),  # the 256x256 models' head dim; four warps per row
    pytest.param((1, 1, 5, 9, 1), id="d1"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_head_dims_and_lengths(backend, shape, dtype):
    check(backend, *qkv(backend, *shape, dtype, seed=shape[2] * 1000 + shape[3] + shape[4]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_and_scale(backend, layout, dtype):
    """Scale 0.3 at D = 8, 16 and 64; on a GPU at Lq = 100, Lk = 130 (several tiles), on the CPU
    at 24 and 30."""
    Lq, Lk = (100, 130) if backend.on_gpu else (24, 30)
    for D in (8, 16, 64):
        check(backend, *qkv(backend, 2, 2, Lq, Lk, D, dtype, layout, seed=D), scale=0.3)


def test_scale_and_unequal_lengths(backend):
    check(backend, *qkv(backend, 1, 3, 5, 30, 16, torch.float32, seed=2), scale=0.3)


def test_large_scores_do_not_overflow(backend):
    """Scores of several hundred: the online softmax subtracts the running max."""
    q, k, v = qkv(backend, 1, 1, 16, 40, 32, torch.float32, seed=3)
    check(backend, q * 8, k * 8, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_softmax_is_float32_in_low_precision(backend, dtype):
    """q k^T reaches ~1.3e5 (over fp16's 65504) before the 1/8 scale: fp16 scores would be inf."""
    torch.manual_seed(6)
    q, k = (45.0 + torch.randn(1, 1, 16, 64) for _ in range(2))
    q, k, v = (t.to(backend.device, dtype) for t in (q, k, torch.randn(1, 1, 16, 64)))
    assert (q.float() @ k.float().transpose(-1, -2)).max() > 65504
    check(backend, q, k, v)


# --- the reference against SDPA in float64; every backend against the explicit formula ------------


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
@pytest.mark.parametrize("heads, lq, lk, d", [(1, 16, 16, 32), (4, 10, 7, 8), (1, 5, 9, 512)])
def test_reference_equals_sdpa_in_float64(backend, heads, lq, lk, d):
    torch.manual_seed(3)
    q, k, v = torch.randn(2, heads, lq, d), torch.randn(2, heads, lk, d), torch.randn(2, heads, lk, d)
    qd, kd, vd = (t.to(backend.device) for t in (q, k, v))
    for scale in (None, 0.3):
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
        assert_within_tolerance(backend.attention(qd, kd, vd, scale), ref, "attention", torch.float32)


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_in_low_precision_within_tolerance_of_sdpa_in_float64(backend, dtype):
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 1, 64, 256) * 3 for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = backend.attention(*(t.to(backend.device, dtype) for t in (q, k, v)))
    assert out.dtype == dtype
    assert_within_tolerance(out, ref, "attention", dtype)


def test_equals_the_explicit_formula_with_strided_heads(backend):
    """The U-Net's strided head views (B, L, heads, D) -> (B, heads, L, D): softmax(q k^T s) v."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 64, 4, 8).transpose(1, 2) for _ in range(3))  # (2, 4, 64, 8), strided
    expected = ((q.double() @ k.double().transpose(-1, -2)) * 8**-0.5).softmax(-1) @ v.double()
    out = backend.attention(*(t.to(backend.device) for t in (q, k, v)))
    assert_within_tolerance(out, expected, "attention", torch.float32)


# --- the DDPM networks' attention on a GPU --------------------------------------------------------

GPU_SHAPES = [  # (B, heads, L, D) at 16x16 (L = 256), and a longer one
    (1, 1, 256, 256),
    (16, 1, 256, 256),
    (64, 1, 256, 256),
    (1, 1, 256, 512),
    (4, 1, 256, 512),
    (8, 1, 256, 512),
    (16, 32, 256, 8),
    (2, 4, 1024, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_ddpm_shapes_on_gpu(backend, shape, dtype):
    needs_gpu(backend)
    B, H, L, D = shape
    check(backend, *qkv(backend, B, H, L, L, D, dtype, "unet"))
