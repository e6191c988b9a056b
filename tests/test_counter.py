"""benchmarks.counter against counts worked out by hand, and the step it counts against the sampler's loop."""

import torch
import torch.nn.functional as F

import fastddpm
from benchmarks.counter import Counter, tensor_bytes
from benchmarks.counts import count_diffusers, count_fastddpm, fastddpm_step
from fastddpm.checkpoints import DEFAULT_MODEL

F32 = 4  # bytes per float32


def test_linear_then_relu_is_two_kernels_with_the_bytes_and_flops_of_a_gemm_and_a_map():
    x, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
    with Counter() as c:
        torch.relu(F.linear(x, w, b))
    launched = [(r.category, r.launches, r.bytes, r.flops) for r in c.records if r.launches]
    assert launched == [
        ("gemm", 1, (4 * 8 + 16 * 8 + 16 + 4 * 16) * F32, 2 * 4 * 8 * 16),  # addmm: x, w, b read; y written
        ("elementwise", 1, 2 * 4 * 16 * F32, 0),  # relu: read and write (4, 16)
    ]
    assert c.total("launches") == 2  # w.t() is a view: no kernel


def test_a_convolution_with_a_bias_is_two_kernels_as_cudnn_runs_it():
    """cuDNN convolves without the bias; PyTorch adds it in a second kernel over the output."""
    x, w, b = (torch.empty(s, device="meta") for s in ((2, 4, 8, 8), (6, 4, 3, 3), (6,)))
    with Counter() as c:
        F.conv2d(x, w, b, padding=1)
    y = 2 * 6 * 8 * 8
    assert [(r.category, r.launches, r.bytes) for r in c.records] == [
        ("convolution", 1, (2 * 4 * 8 * 8 + 6 * 4 * 9 + y) * F32),
        ("elementwise", 1, (2 * y + 6) * F32),  # output.add_(bias): read, write, and the bias
    ]
    assert c.records[0].flops == 2 * y * 4 * 9
    with Counter() as c:
        F.conv2d(x, w, None, padding=1)
    assert c.total("launches") == 1


def test_a_convolution_copies_an_input_not_in_the_layout_it_convolves_in():
    """An NHWC weight makes cuDNN convolve NHWC: an NCHW input is copied first, and the output is
    NHWC (on meta tensors too, whose own convolution would write NCHW)."""
    cl = torch.channels_last
    x, w = torch.empty(2, 4, 8, 8, device="meta"), torch.empty(6, 4, 3, 3, device="meta").to(memory_format=cl)
    with Counter() as c:
        y = F.conv2d(x, w, None, padding=1)
    assert [(r.op, r.category, r.bytes) for r in c.records][0] == (
        "convolution input copy",
        "copy",
        2 * x.numel() * F32,
    )
    assert y.is_contiguous(memory_format=cl) and c.total("launches") == 2
    x = x.to(memory_format=cl)
    with Counter() as c:
        F.conv2d(x, w, None, padding=1)
    assert c.total("launches") == 1


def test_an_out_of_place_baddbmm_copies_its_input_into_the_output_first():
    """PyTorch's baddbmm writes `self` (here a broadcast bias) into the output, then runs the GEMM
    with beta = 1, which reads the output back; in place (baddbmm_) it is one kernel."""
    bias, a, b = torch.randn(5), torch.randn(3, 4, 6), torch.randn(3, 6, 5)
    with Counter() as c:
        out = torch.baddbmm(bias, a, b)
    o = 3 * 4 * 5
    assert [(r.category, r.launches, r.bytes) for r in c.records] == [
        ("copy", 1, (5 + o) * F32),
        ("gemm", 1, (3 * 4 * 6 + 3 * 6 * 5 + 2 * o) * F32),
    ]
    with Counter() as c:
        out.baddbmm_(a, b)
    assert [(r.category, r.launches) for r in c.records] == [("gemm", 1)]


def test_views_and_allocations_launch_nothing():
    x = torch.randn(2, 3, 4)
    with Counter() as c:
        x.view(6, 4).transpose(0, 1).unsqueeze(0).expand(5, 4, 6)
        torch.empty(10)
        x.reshape(2, 12)
    assert c.total("launches") == 0 and c.total("bytes") == 0


def test_an_expanded_input_is_read_once_per_unique_element():
    row, full = torch.randn(4, 1), torch.randn(4, 8)
    assert tensor_bytes(row.expand(4, 8)) == 4 * F32
    with Counter() as c:
        row.expand(4, 8) + full
    assert c.total("bytes") == (4 + 32 + 32) * F32


def test_in_place_ops_read_their_destination_and_copies_do_not():
    x, y = torch.randn(8), torch.randn(8)
    with Counter() as c:
        x.add_(y)  # reads x and y, writes x
        x.copy_(y)  # reads y, writes x
        x.fill_(0.0)  # writes x
    assert [r.bytes for r in c.records] == [3 * 8 * F32, 2 * 8 * F32, 8 * F32]


def test_a_tensor_passed_twice_is_read_once():
    x = torch.randn(16)
    with Counter() as c:
        x * x
    assert c.total("bytes") == 2 * 16 * F32


def test_scaled_dot_product_attention_is_one_kernel_whatever_path_runs_it():
    B, H, Lq, Lk, D = 2, 3, 5, 7, 4
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    with Counter() as c:
        F.scaled_dot_product_attention(q, k, v)
    assert [(r.category, r.launches) for r in c.records] == [("attention", 1)]
    assert c.records[0].bytes == (2 * B * H * Lq * D + 2 * B * H * Lk * D) * F32
    assert c.records[0].flops == 4 * B * H * Lq * Lk * D


def test_a_device_filter_leaves_host_work_out():
    host, dev = torch.randn(3), torch.empty(3, device="meta")
    with Counter("meta") as c:
        host * 2  # scalar arithmetic on the CPU, as a scheduler does
        dev * 2
    assert c.total("launches") == 1


def test_the_counted_step_is_what_one_more_step_of_the_sampler_adds():
    """sample() at S + 1 steps launches exactly one counted step more than at S (real CPU tensors)."""
    sampler = fastddpm.load(DEFAULT_MODEL, backend="torch")
    sampler.cuda_graph = False
    sampler.sample(1, steps=1, seed=0, progress=False)  # every later run refreshes the same folds
    launches = {}
    for S in (3, 4):
        with Counter() as c:
            sampler.sample(2, steps=S, seed=0, progress=False)
        launches[S] = c.total("launches")
    table = sampler.step_table(4)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), sampler.frozen():  # as sample() runs its steps
        fastddpm_step(sampler, x, table, 2)  # the first computes the folds (fastddpm.folds)
        with Counter() as step:
            fastddpm_step(sampler, x, table, 2)
    assert launches[4] - launches[3] == step.total("launches") > 0


def test_the_cifar10_forward_has_the_papers_flops_less_four_ninths_of_its_upsampling_convolutions():
    """About 12.4 GFLOP per image in diffusers (DESIGN.md); fastddpm runs each Upsample's nearest
    x2 and 3x3 convolution as one stride-2 transposed convolution with a 4x4 kernel on the
    un-upsampled input: 16 taps per input position instead of 9 per each of 4 outputs."""
    diffusers_rows = {r.what: r for r in count_diffusers("cifar10", 1)}
    fastddpm_rows = {r.what: r for r in count_fastddpm("cifar10", 1, "torch", False)}
    assert 12.3e9 < diffusers_rows["forward"].flops < 12.5e9
    net = fastddpm.UNet(fastddpm.PRESETS["cifar10"])
    upsampling = 0
    for i, level in enumerate(net.up):
        if hasattr(level, "upsample"):
            C, side = level.upsample.conv.out_channels, 32 // 2 ** (i - 1)  # the output's side
            upsampling += 2 * 9 * C * C * side * side
    saved = diffusers_rows["forward"].flops - fastddpm_rows["forward"].flops
    assert saved == upsampling * 5 // 9 > 0
    assert fastddpm_rows["step"].launches > fastddpm_rows["forward"].launches


def test_each_fused_op_of_the_triton_backend_is_one_record_with_its_plans_kernels():
    """On meta tensors the Triton custom ops run their fakes: one record per call, no GroupNorm or
    softmax decomposition, and launches from the launch plan (a split GroupNorm is two kernels)."""
    net = fastddpm.UNet(fastddpm.PRESETS["cifar10"])
    norms = sum(isinstance(m, fastddpm.unet.Norm) for m in net.modules())
    attns = sum(isinstance(m, fastddpm.unet.AttnBlock) for m in net.modules())
    for batch in (1, 256):
        forward, step = count_fastddpm("cifar10", batch, "triton", False)
        fused = forward.categories["fused"]
        assert fused["calls"] == norms + attns and "norm" not in forward.categories
        assert norms + attns <= fused["launches"] <= 2 * (norms + attns)
        assert step.categories["fused"]["calls"] == norms + attns + 1  # and the reverse step
    # At batch 1 the GroupNorms of the 4x4 and 8x8 levels fill too few programs: they split.
    assert count_fastddpm("cifar10", 1, "triton", False)[0].categories["fused"]["launches"] > norms + attns
