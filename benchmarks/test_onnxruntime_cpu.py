"""One reverse step of the CIFAR10 model on the CPU: onnxruntime against PyTorch, fp32.

    pytest benchmarks/test_onnxruntime_cpu.py --benchmark-only

The network is built from google/ddpm-cifar10-32's config (32 attention heads, as diffusers
runs it) with random weights. Rows, per step at batch 1 and 8:
- pytorch: fastddpm's U-Net (torch backend) + ops.ddpm_step, eager;
- onnxruntime: the denoiser export on onnxruntime's CPU provider + ops.ddpm_step (what
  `fastddpm.ort.load("eps.onnx")` samples with);
- onnxruntime_step_graph: the full-step export (network, update and table in one graph).
Both exports are verified against PyTorch (max abs error <= 1e-4) before anything is timed.
"""

import json
from pathlib import Path

import pytest
import torch

import fastddpm
from fastddpm import export, ops, ort
from fastddpm.checkpoints import unet_config_from_diffusers

CONFIG = Path(__file__).parent.parent / "tests" / "data" / "ddpm-cifar10-32"
T_INDEX = 500


@pytest.fixture(scope="module")
def sampler():
    torch.manual_seed(0)
    config = unet_config_from_diffusers(json.loads((CONFIG / "unet_config.json").read_text()))
    return fastddpm.Sampler(fastddpm.UNet(config).eval())


@pytest.fixture(scope="module")
def exports(sampler, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar10-onnx")
    denoiser = export.to_onnx(sampler, folder / "eps.onnx")
    step = export.to_onnx(sampler, folder / "step.onnx", kind="step")
    assert denoiser.max_abs_error <= 1e-4 and step.max_abs_error <= 1e-4
    return ort.OnnxDenoiser(folder / "eps.onnx"), ort.OnnxStepSampler(folder / "step.onnx")


@pytest.fixture(scope="module", params=[1, 8], ids=lambda b: f"batch{b}")
def batch(request):
    torch.manual_seed(0)
    return torch.randn(request.param, 3, 32, 32), torch.randn(request.param, 3, 32, 32)


@pytest.mark.benchmark(group="cpu-step-cifar10-onnxruntime")
def test_pytorch(benchmark, sampler, batch):
    x, noise = batch
    table = sampler.step_table()
    t = table.timesteps[T_INDEX].expand(x.shape[0])

    @torch.no_grad()
    def step():
        return ops.ddpm_step(x, sampler.unet(x, t), T_INDEX, table, noise=noise)

    benchmark(step)


@pytest.mark.benchmark(group="cpu-step-cifar10-onnxruntime")
def test_onnxruntime(benchmark, sampler, exports, batch):
    x, noise = batch
    denoiser, _ = exports
    table = sampler.step_table()
    t = table.timesteps[T_INDEX].expand(x.shape[0])
    with torch.no_grad():
        expected = ops.ddpm_step(x, sampler.unet(x, t), T_INDEX, table, noise=noise)

    def step():
        return ops.ddpm_step(x, denoiser(x, t), T_INDEX, table, noise=noise)

    assert (benchmark(step) - expected).abs().max().item() <= 1e-4


@pytest.mark.benchmark(group="cpu-step-cifar10-onnxruntime")
def test_onnxruntime_step_graph(benchmark, sampler, exports, batch):
    x, noise = batch
    _, step_graph = exports
    table = sampler.step_table()
    with torch.no_grad():
        t = table.timesteps[T_INDEX].expand(x.shape[0])
        expected = ops.ddpm_step(x, sampler.unet(x, t), T_INDEX, table, noise=noise)

    got = benchmark(step_graph.step, x, T_INDEX, noise)
    assert (got - expected).abs().max().item() <= 1e-4
