"""group_norm_silu on every backend equals the reference within the contract's tolerance: three
dtypes, NCHW and channels_last, add= and silu=False, the U-Net's channel counts, a strided add, a
misaligned x, float32 parameters with 16-bit activations, a skip tensor read in place (the CUDA
kernels' paths), and statistics that stay float32 and stable for a large mean. The reference
itself equals torch's GroupNorm and SiLU modules in float64."""

import pytest
import torch
import torch.nn.functional as F

from .backends import needs_gpu
from .tolerance import DTYPES, assert_equals_reference, assert_within_tolerance

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def inputs(b, shape, dtype, layout="nchw", *, seed=0, mean=1.0, std=2.0, param_dtype=None, misaligned=False):
    """x ~ N(mean, std^2) in dtype and layout on b's device; weight, bias, add in param_dtype
    (default: dtype). misaligned: x's values one element into a buffer, so no vector access is aligned."""
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = torch.randn(shape, generator=g) * std + mean
    w, b_, add = torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(N, C, generator=g)
    xd = x.to(b.device, dtype).contiguous(memory_format=LAYOUTS[layout])
    if misaligned:
        buf = torch.empty(xd.numel() + 1, dtype=dtype, device=b.device)[1:]
        xd = buf.as_strided(xd.shape, xd.stride()).copy_(xd)
    return xd, *(t.to(b.device, param_dtype or dtype) for t in (w, b_, add))


def check(b, x, w, bias, groups, *, silu=True, add=None):
    out = b.group_norm_silu(x, w, bias, groups, 1e-6, silu=silu, add=add)
    assert_equals_reference("group_norm_silu", out, x, w, bias, groups, 1e-6, silu=silu, add=add)


# --- the contract: dtypes, layouts, add and SiLU -------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_add", [True, False], ids=["add", "noadd"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "nosilu"])
def test_equals_reference(backend, layout, with_add, silu):
    """Each dtype; batch 1, 6 channels per group (not a power of two), 5x7 positions."""
    for dtype in DTYPES:
        x, w, bias, add = inputs(backend, (1, 24, 5, 7), dtype, layout)
        check(backend, x, w, bias, 4, silu=silu, add=add if with_add else None)


@pytest.mark.parametrize(
    "C, with_add, silu",
    [(64, True, True), (128, False, True), (256, True, False), (384, False, False), (512, True, True)],
)
def test_unet_channel_counts_channels_last(backend, C, with_add, silu):
    """Each dtype; the U-Net's channel counts with its 32 groups (2, 4, 8, 12, 16 channels per
    group), channels_last, 3x5 positions."""
    for dtype in DTYPES:
        x, w, bias, add = inputs(backend, (1, C, 3, 5), dtype, "nhwc", seed=C)
        check(backend, x, w, bias, 32, silu=silu, add=add if with_add else None)


VARIANTS = {
    "nosilu-noadd": {"silu": False, "with_add": False},
    "nosilu-add": {"silu": False},
    "misaligned": {"misaligned": True},
    "fp32-params": {"param_dtype": torch.float32},  # 16-bit activations, float32 parameters
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_variants(backend, variant, layout):
    """Each dtype, at 4 channels per group. Compiled code only: Triton's interpreter runs numpy on
    whole arrays, with no vector loads to misalign and no register dtypes."""
    if backend.name == "triton" and not backend.on_gpu:
        pytest.skip("Triton's interpreter: these variants test compiled code's loads and dtypes")
    options = dict(VARIANTS[variant])
    silu, with_add = options.pop("silu", True), options.pop("with_add", True)
    for dtype in DTYPES:
        x, w, bias, add = inputs(backend, (2, 64, 4, 4), dtype, layout, seed=2, **options)
        check(backend, x, w, bias, 16, silu=silu, add=add if with_add else None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_may_be_a_strided_view(backend, layout):
    """add may be any (N, C) view, e.g. a column slice."""
    x, w, bias, _ = inputs(backend, (2, 16, 3, 3), torch.float32, layout)
    add = torch.randn(2, 40, device=backend.device)[:, 8:24]
    check(backend, x, w, bias, 4, add=add)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "C1, C2, groups",
    [(12, 20, 8), (8, 8, 4), (6, 10, 4), (256, 128, 32)],
    ids=["straddle", "aligned", "straddle-odd", "unet-384"],
)
def test_skip_is_the_norm_of_the_concatenation(backend, layout, C1, C2, groups):
    """skip: the norm of cat([x, skip], dim=1), read from both in place (the U-Net's up path), at
    each dtype, with groups straddling the boundary (C1 not a multiple of C / groups) and add a
    broadcast row (the U-Net's pending bias)."""
    fmt = LAYOUTS[layout]
    for dtype in DTYPES:
        h, w, bias, _ = inputs(backend, (2, C1 + C2, 3, 5), dtype, layout, seed=C1)
        x, skip = (part.contiguous(memory_format=fmt) for part in (h[:, :C1], h[:, C1:]))
        add = torch.randn(C1 + C2, dtype=dtype).to(backend.device).expand(2, -1)
        out = backend.group_norm_silu(x, w, bias, groups, 1e-6, silu=True, add=add, skip=skip)
        assert out.shape == h.shape and out.is_contiguous(memory_format=fmt)
        assert_equals_reference(
            "group_norm_silu", out, x, w, bias, groups, 1e-6, silu=True, add=add, skip=skip
        )


def test_a_one_channel_input_takes_a_skip_in_either_layout(backend):
    """A 1-channel x is both contiguous and channels_last: a channels_last skip beside it is read
    in the layout the kernels take x in."""
    h, w, bias, _ = inputs(backend, (2, 9, 3, 5), torch.float32, "nhwc", seed=9)
    x, skip = (part.contiguous(memory_format=torch.channels_last) for part in (h[:, :1], h[:, 1:]))
    out = backend.group_norm_silu(x, w, bias, 3, 1e-6, silu=True, skip=skip)
    assert_equals_reference("group_norm_silu", out, x, w, bias, 3, 1e-6, silu=True, skip=skip)


def test_a_skip_that_does_not_fit_is_refused():
    """skip must match x in N, H, W, dtype, device and memory format; weight covers both."""
    from fastddpm import ops

    x, skip = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    w, b = torch.ones(16), torch.zeros(16)
    cases = [
        (torch.randn(2, 8, 4, 5), "skip must be"),
        (torch.randn(3, 8, 4, 4), "skip must be"),
        (skip.double(), "dtype"),
        (skip.to(memory_format=torch.channels_last), "memory format"),
        (skip[:, :, :, :2], "skip must be"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.group_norm_silu(x, w, b, 4, skip=bad, backend="torch")
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        ops.group_norm_silu(x, w[:8], b[:8], 4, skip=skip, backend="torch")


# --- the launch paths of the CUDA kernels --------------------------------------------------------

CUDA_SHAPES = [  # (N, C, H, W), groups: the launch path each takes in csrc/group_norm_silu.cu
    pytest.param((2, 64, 8, 8), 16, id="vec-fused"),  # 16-byte vectors (NCHW), one block per group
    pytest.param((2, 64, 4, 4), 8, id="cg8"),  # NHWC: 8 channels per group, 16-byte vectors
    pytest.param((2, 64, 4, 4), 16, id="cg4"),  # NHWC: 4 channels per group (CIFAR10's 128 / 32)
    pytest.param((1, 24, 5, 7), 4, id="odd"),  # 6 channels per group, 5x7: element-wise kernel
    pytest.param((3, 32, 3, 3), 8, id="3x3"),
    pytest.param((1, 5, 80, 80), 1, id="split3"),  # one group over 3 blocks, the last shorter
    pytest.param((1, 3, 97, 95), 1, id="split-odd"),  # split, element-wise
]
# channels_last tiles of whole groups (the NHWC plan) at the U-Nets' channel counts, 32 groups
CUDA_NHWC_SHAPES = [
    pytest.param((1, 128, 8, 8), 32, id="c128"),  # 4 channels per group: tiles of 8 (fp32) or 16 groups
    pytest.param((2, 256, 4, 4), 32, id="c256"),
    pytest.param((1, 384, 4, 4), 32, id="c384"),  # 12 per group: 16-bit tiles of 8 groups (96 channels)
    pytest.param((1, 512, 4, 4), 32, id="c512"),
    pytest.param((1, 1024, 2, 2), 32, id="c1024"),  # the 256x256 models' widest level
    pytest.param((1, 128, 32, 32), 32, id="cifar-32x32"),  # tiles of 4 groups, split in 2 at batch 1
    pytest.param((1, 32, 48, 48), 8, id="split9"),  # 128-byte tiles split over 9 blocks of positions
    pytest.param((2, 36, 5, 5), 12, id="c36"),  # 3 per group: fp32 tiles of 4 groups; 16-bit: C % 8 != 0
    pytest.param((1, 6, 4, 4), 3, id="c6"),  # C % 4 != 0: no 16-byte layout, element-wise kernel
]
CUDA_NHWC_VARIANT_SHAPES = [
    pytest.param((1, 128, 8, 8), 32, id="c128"),
    pytest.param((1, 384, 4, 4), 32, id="c384"),
    pytest.param((1, 32, 48, 48), 8, id="split9"),
    pytest.param((8, 128, 32, 32), 32, marks=pytest.mark.gpu, id="cifar-b8"),
    pytest.param((4, 384, 16, 16), 32, marks=pytest.mark.gpu, id="c384-16x16"),
]
# The Triton kernels' own paths (split, looped and one-tile programs) are forced through their
# launcher's keywords in tests/test_triton_group_norm_silu.py.


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, groups", CUDA_SHAPES)
def test_cuda_launch_paths(backend, shape, groups, dtype, layout):
    x, w, bias, add = inputs(backend, shape, dtype, layout, seed=sum(shape) + groups)
    check(backend, x, w, bias, groups, add=add)


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups", CUDA_NHWC_SHAPES)
def test_cuda_channels_last_tiles(backend, shape, groups, dtype):
    x, w, bias, add = inputs(backend, shape, dtype, "nhwc", seed=sum(shape) + groups)
    check(backend, x, w, bias, groups, add=add)


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["nosilu-noadd", "misaligned", "fp32-params"])
@pytest.mark.parametrize("shape, groups", CUDA_NHWC_VARIANT_SHAPES)
def test_cuda_channels_last_tile_variants(backend, shape, groups, variant, dtype):
    if shape[0] > 1 and not backend.on_gpu:
        needs_gpu(backend)
    options = dict(VARIANTS[variant])
    silu, with_add = options.pop("silu", True), options.pop("with_add", True)
    x, w, bias, add = inputs(backend, shape, dtype, "nhwc", seed=sum(shape) + groups, **options)
    check(backend, x, w, bias, groups, silu=silu, add=add if with_add else None)


# h = cat([x, skip], dim=1) read in place: (N, C, H, W) of h, groups, C1 (x's channels), and the
# launch path each takes in csrc/group_norm_silu.cu. A group straddles channel C1 unless the
# group's channels Cg divide it. channels_last vectors need 16 bytes of elements to divide C1.
CUDA_SKIP_SHAPES = [
    pytest.param((2, 64, 8, 8), 16, 26, id="vec-straddle"),  # NCHW vectors; NHWC: 26 % 4: element-wise
    pytest.param((2, 64, 8, 8), 16, 32, id="vec-boundary"),  # the boundary between groups, both 16-byte
    pytest.param((1, 384, 4, 4), 32, 256, id="nhwc-straddle"),  # 12 per group: group 21 = x's 252..255
    pytest.param((1, 128, 8, 8), 32, 36, id="nhwc-c1-4"),  # NHWC: fp32 16-byte; 16-bit 36 % 8: element-wise
    pytest.param((1, 24, 5, 7), 4, 9, id="odd"),  # element-wise kernel, group 1 straddles
    pytest.param((1, 5, 80, 80), 1, 2, id="split3"),  # one group over 3 blocks, two kernels
    pytest.param((1, 24, 40, 40), 2, 8, id="nhwc-split"),  # NHWC 16-byte tiles split over positions
    pytest.param((1, 4, 97, 95), 1, 2, id="split-odd"),  # split, element-wise
]
ADDS = ["rows", "broadcast", "none"]  # add (N, C); torch.randn(C).expand(N, C), strides (0, 1); None


PAD = 64  # NaN elements on either side of x and skip (a multiple of 16 bytes)


def amid_nans(t: torch.Tensor, misaligned: bool = False) -> torch.Tensor:
    """t's values in a buffer of NaNs, PAD elements in (PAD + 1: misaligned): a read outside t gives
    NaN, not a neighbouring tensor's values."""
    buf = torch.full((t.numel() + 2 * PAD + 1,), float("nan"), dtype=t.dtype, device=t.device)
    return buf[PAD + misaligned :].as_strided(t.shape, t.stride()).copy_(t)


def skip_inputs(b, shape, C1, dtype, layout, add, *, seed=0, misaligned_skip=False):
    """x (N, C1, H, W) and skip (N, C - C1, H, W) from inputs(...) of shape (N, C, H, W), each in
    `layout` amid NaNs, with weight, bias and add (of kind `add`, one of ADDS).
    misaligned_skip: skip's values one element off 16 bytes."""
    h, w, bias, rows = inputs(b, shape, dtype, layout, seed=seed)
    fmt = LAYOUTS[layout]
    x = amid_nans(h[:, :C1].contiguous(memory_format=fmt))
    skip = amid_nans(h[:, C1:].contiguous(memory_format=fmt), misaligned_skip)
    N, C = shape[:2]
    g = torch.Generator().manual_seed(seed + 1)
    adds = {"rows": rows, "broadcast": torch.randn(C, generator=g).to(b.device, dtype).expand(N, C)}
    return x, skip, w, bias, adds.get(add)


def check_skip(b, x, skip, w, bias, groups, *, add=None, silu=True):
    out = b.group_norm_silu(x, w, bias, groups, 1e-6, silu=silu, add=add, skip=skip)
    assert out.shape == (x.shape[0], w.shape[0], *x.shape[2:])
    assert_equals_reference("group_norm_silu", out, x, w, bias, groups, 1e-6, silu=silu, add=add, skip=skip)


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("add", ADDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, groups, C1", CUDA_SKIP_SHAPES)
def test_cuda_skip_launch_paths(backend, shape, groups, C1, dtype, layout, add):
    x, skip, w, bias, add_ = skip_inputs(backend, shape, C1, dtype, layout, add, seed=sum(shape) + C1)
    check_skip(backend, x, skip, w, bias, groups, add=add_)


@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_skip_misaligned(backend, layout):
    """skip one element off 16 bytes: the element-wise kernel, where x alone would take vectors."""
    for dtype in DTYPES:
        x, skip, w, bias, add = skip_inputs(
            backend, (2, 64, 8, 8), 32, dtype, layout, "rows", misaligned_skip=True
        )
        check_skip(backend, x, skip, w, bias, 16, add=add, silu=False)


# --- the DDPM networks' own sizes, on a GPU -------------------------------------------------------

GPU_SHAPES = [
    (8, 128, 32, 32),
    (1, 128, 32, 32),
    (64, 256, 16, 16),
    (1, 384, 32, 32),
    (1, 128, 256, 256),  # few groups per sample: split over programs
    (8, 128, 128, 128),
    (2, 512, 8, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_ddpm_shapes_on_gpu(backend, shape, dtype, layout):
    needs_gpu(backend)
    x, w, bias, add = inputs(backend, shape, dtype, layout)
    check(backend, x, w, bias, 32, add=add)


# --- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, groups",
    [((1, 32, 8, 8), 32), ((1, 32, 8, 8), 4), ((1, 2, 128, 256), 1)],
    ids=["1-channel-groups", "8-channel-groups", "one-group-of-65536"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_statistics_are_stable_for_a_large_mean(backend, shape, groups, layout):
    """Mean 1e3, std 0.1 in float32: within 1e-3 (CUDA channels_last: 2e-3) of the float64
    GroupNorm of the same input (the one-pass E[x^2] - E[x]^2 misses by more than 1e-2: see the
    test below). The group of 65536 elements is split over several programs or blocks."""
    # The CUDA channels_last kernel's statistics are looser here: 1.1e-3 to 1.6e-3 on the emulator.
    bound = 2e-3 if backend.name == "cuda" and layout == "nhwc" and groups > 1 else 1e-3
    C = shape[1]
    ones, zeros = torch.ones(C, device=backend.device), torch.zeros(C, device=backend.device)
    x = 1e3 + torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.1
    xd = x.to(backend.device).contiguous(memory_format=LAYOUTS[layout])
    out = backend.group_norm_silu(xd, ones, zeros, groups, silu=False)
    truth = F.group_norm(x.double(), groups, eps=1e-6)
    assert (out.cpu().double() - truth).abs().max().item() < bound


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
def test_reference_statistics_are_exact_where_one_pass_formulas_miss(backend):
    """Mean 1e3, std 0.1 and 0.01, groups of one channel: the reference is within 1e-5 of the
    float64 truth; F.group_norm alone in float32 (one fused pass) misses by 1e-3 and more, and the
    one-pass formula E[x^2] - E[x]^2 in float32 by more than 1e-2."""
    torch.manual_seed(2)
    for std in (0.1, 0.01):
        x = 1e3 + torch.randn(1, 32, 8, 8) * std
        out = backend.group_norm_silu(x, torch.ones(32), torch.zeros(32), 32, silu=False)
        truth = F.group_norm(x.double(), 32, eps=1e-6)
        assert (out.double() - truth).abs().max().item() < 1e-5
        assert (F.group_norm(x, 32, eps=1e-6).double() - truth).abs().max().item() > 1e-4
    g = x.view(1, 32, -1)
    naive_var = (g.square().mean(-1, keepdim=True) - g.mean(-1, keepdim=True).square()).clamp_min(0)
    naive = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(naive_var + 1e-6)).view_as(x)
    assert (naive.double() - truth).abs().max().item() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_statistics_are_float32_in_low_precision(backend, dtype, layout):
    """Values near 300 put a group's sum of x^2 far above fp16's 65504, and their variance below
    bf16's resolution of x^2: E[x^2] - E[x]^2 in the input dtype would overflow (fp16) or lose
    the variance (bf16)."""
    torch.manual_seed(5)
    x = (300.0 + 30.0 * torch.randn(2, 16, 8, 8)).to(backend.device, dtype)
    w, bias = torch.randn(16).to(backend.device, dtype), torch.randn(16).to(backend.device, dtype)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    check(backend, x, w, bias, 4, silu=False)


# --- the reference against torch's modules (every backend is held to the reference) ---------------


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "nosilu"])
@pytest.mark.parametrize("with_add", [True, False], ids=["add", "noadd"])
def test_reference_equals_torch_modules(backend, silu, with_add):
    """nn.GroupNorm (then F.silu) of x + add in float64, with random affine parameters."""
    torch.manual_seed(0)
    x, add = torch.randn(2, 64, 8, 8), torch.randn(2, 64)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    with torch.no_grad():
        ref = norm(x.double() + add.double()[:, :, None, None] if with_add else x.double())
        ref = F.silu(ref) if silu else ref
        w, bias = (p.float().to(backend.device) for p in (norm.weight, norm.bias))
        out = backend.group_norm_silu(
            x.to(backend.device),
            w,
            bias,
            32,
            1e-6,
            silu=silu,
            add=add.to(backend.device) if with_add else None,
        )
    assert_within_tolerance(out, ref, "group_norm_silu", torch.float32)
