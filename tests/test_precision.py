"""Precision modes and channels_last (fastddpm.precision): conversion, accuracy against fp32, the
TF32 flags' scope, torch.compile, and bad input. The ops' float32 statistics and softmax in 16-bit
inputs, on every backend: tests/ops."""

import subprocess
import sys

import pytest
import torch

import fastddpm
from fastddpm.precision import MODES, Precision

from .conftest import tiny_unet

# Bounds on the final samples' max distance from fp32 (in [-1, 1] units) for the tiny random-weight
# U-Net over 5 steps from the same noise: about 3x what an AVX-512 CPU gave (fp16 0.008-0.010,
# bf16 0.054-0.076, NCHW-channels_last). `python -m benchmarks.precision` measures real models.
SAMPLE_BOUND = {"fp32": 0.0, "tf32": 0.0, "fp16": 0.03, "bf16": 0.2}


def samples(precision: str | None, channels_last: bool = False, backend: str = "torch") -> torch.Tensor:
    sampler = fastddpm.Sampler(
        tiny_unet(backend), fastddpm.DiffusionConfig(), precision=precision, channels_last=channels_last
    )
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return sampler.sample(2, steps=5, x_T=x_T, generator=torch.Generator().manual_seed(2), progress=False)


@pytest.fixture(scope="module")
def fp32_samples():
    return samples("fp32")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_each_mode_runs_and_stays_near_fp32(mode, channels_last, fp32_samples):
    x = samples(mode, channels_last)
    assert x.dtype == torch.float32 and x.shape == fp32_samples.shape
    assert torch.isfinite(x).all()
    diff = (x - fp32_samples).abs().max().item()
    # channels_last reorders the convolutions' sums: equal to fp32 within float32 rounding.
    assert diff <= SAMPLE_BOUND[mode] + (1e-4 if channels_last else 0.0)
    if mode in ("fp16", "bf16"):
        assert diff > 0  # the network really ran in low precision


def test_the_unet_is_converted_in_place_as_documented():
    unet = tiny_unet()
    sampler = fastddpm.Sampler(unet, precision="bf16", channels_last=True)
    assert sampler.unet is unet
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert unet.conv_in.weight.dim() == 4 and not unet.conv_in.weight.is_contiguous()
    untouched = tiny_unet()
    fastddpm.Sampler(untouched)  # precision None: the network's own dtype and layout
    assert all(p.dtype == torch.float32 for p in untouched.parameters())
    assert untouched.conv_in.weight.is_contiguous()


def test_default_precision_runs_the_network_in_its_own_dtype():
    unet = tiny_unet().to(torch.bfloat16)
    sampler = fastddpm.Sampler(unet)
    assert sampler.precision.mode is None
    x = sampler.sample(1, steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert x.dtype == torch.float32 and unet.conv_in.weight.dtype == torch.bfloat16


def test_channels_last_activations_stay_channels_last():
    """Every module's 4-D output keeps the channels_last format through the whole U-Net."""
    unet = tiny_unet().to(memory_format=torch.channels_last)
    lost = []

    def hook(module, inputs, output):
        if output.dim() == 4 and not output.is_contiguous(memory_format=torch.channels_last):
            lost.append(type(module).__name__)

    for module in unet.modules():
        module.register_forward_hook(hook)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = unet(x, torch.tensor([3, 700]))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert lost == []


@pytest.mark.parametrize("mode", ["fp32", "tf32"])
def test_tf32_flags_are_set_only_inside_the_scope(mode):
    """The flags exist without a GPU, so the scope's bookkeeping is checked on the CPU."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = False, True  # torch's defaults
        with Precision(mode).scope(torch.device("cuda")):
            assert matmul.allow_tf32 == cudnn.allow_tf32 == (mode == "tf32")
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
        with pytest.raises(RuntimeError), Precision(mode).scope(torch.device("cuda")):
            raise RuntimeError("restored on errors too")
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
        with Precision(mode).scope(torch.device("cpu")):  # TF32 is CUDA's: the CPU is untouched
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_on_cuda_stays_near_fp32(mode):
    def run(mode):
        sampler = fastddpm.Sampler(tiny_unet().cuda(), precision=mode, channels_last=True)
        x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        return sampler.sample(2, steps=5, x_T=x_T, generator=torch.Generator().manual_seed(2), progress=False)

    diff = (run(mode) - run("fp32")).abs().max().item()
    assert diff <= {**SAMPLE_BOUND, "fp32": 1e-4, "tf32": 0.03}[mode]  # TF32: 10-bit mantissa products


def test_bad_modes_and_options_are_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        fastddpm.Sampler(tiny_unet(), precision="fp8")
    with pytest.raises(ValueError, match="channels_last must be a bool"):
        fastddpm.Sampler(tiny_unet(), channels_last="yes")
    with pytest.raises(ValueError, match="apply to a torch module"):
        Precision("fp16").apply(object())
    with pytest.raises(ValueError, match="not meta"):
        Precision("bf16").check_device(torch.device("meta"))
    with pytest.raises(ValueError, match="compile must be a bool"):
        fastddpm.Sampler(tiny_unet(), compile="inductor")


def test_cli_precision_and_channels_last(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "fastddpm", "sample", "-n", "2", "--steps", "3", "--no-progress", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )

    out = run("--precision", "bf16", "--channels-last", "--npz", "s.npz")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "s.npz").exists()
    bad = run("--precision", "fp8")
    assert bad.returncode != 0 and "invalid choice: 'fp8'" in bad.stderr
    onnx = run("--model", "x.onnx", "--precision", "fp16")
    assert onnx.returncode == 1 and "its dtype was fixed at export" in onnx.stderr


# --- torch.compile ---------------------------------------------------------------------------------


# Inductor's C++ build takes minutes per configuration on a CPU, so it compiles the two that matter on
# the CPU (plain fp32, and bf16 channels_last, the fastest); the other dtype and layout combinations
# compile with aot_eager, where Dynamo's fullgraph tracing (the graph-break check) is the same.
COMPILE_CASES = [
    ("fp32", False, "inductor"),
    ("bf16", True, "inductor"),
    ("fp32", True, "aot_eager"),
    ("fp16", False, "aot_eager"),
    ("fp16", True, "aot_eager"),
    ("bf16", False, "aot_eager"),
]  # tf32 is fp32 on the CPU


@pytest.mark.parametrize(("mode", "channels_last", "compiler"), COMPILE_CASES)
def test_compile_fullgraph_reference_backend(mode, channels_last, compiler):
    """The U-Net compiles as one graph (fullgraph=True: a graph break raises) on the CPU with backend
    "torch", in every dtype and memory format, through Sampler(compile=True), and equals eager."""
    unet = tiny_unet("torch")
    sampler = fastddpm.Sampler(unet, precision=mode, channels_last=channels_last, compile=True)
    dtype = unet.conv_in.weight.dtype
    x = sampler.precision.network_input(torch.randn(1, 3, 16, 16), dtype)
    t = torch.tensor([500])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = unet(x, t)
        if compiler == "inductor":
            compiled = sampler.network(x, t)  # torch.compile(unet, fullgraph=True): Inductor
        else:
            compiled = torch.compile(unet, fullgraph=True, backend=compiler)(x, t)
    assert compiled.dtype == dtype
    assert compiled.is_contiguous(memory_format=torch.channels_last) == channels_last
    bound = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}[mode]  # Inductor fuses, so rounding differs
    assert (compiled.float() - eager.float()).abs().max().item() <= bound
