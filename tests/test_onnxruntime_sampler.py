"""The onnxruntime backend (CPU provider): the same images as the PyTorch sampler from the same noise.

Tolerance: fp32 max abs error 1e-5 on the final images. The network's outputs differ from
PyTorch's by ~1e-6 (onnxruntime's kernels sum in another order); the clipped-x0 steps do not
amplify that (measured: under 1e-6 after 30 ancestral steps).
"""

import json

import pytest
import torch

import fastddpm
from fastddpm import export, ops, ort
from fastddpm.schedule import space_timesteps

from .conftest import tiny_unet

T = 30
IMAGE_TOLERANCE = 1e-5


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sampler():
    """The tiny preset with perturbed norms, T = 30 steps: the PyTorch reference."""
    return fastddpm.Sampler(tiny_unet(), fastddpm.DiffusionConfig(num_timesteps=T))


@pytest.fixture(scope="module")
def onnx_sampler(sampler, tmp_path_factory):
    """fastddpm.ort.load of a dynamic-batch denoiser export: a Sampler around an OnnxDenoiser."""
    path = tmp_path_factory.mktemp("ort") / "eps.onnx"
    export.to_onnx(sampler, path)
    return ort.load(path)


@pytest.fixture(scope="module")
def step_sampler(sampler, tmp_path_factory):
    """A full-step export (network + clipped-x0 update + table), respaced to 10 steps, static batch 2."""
    path = tmp_path_factory.mktemp("ort") / "step.onnx"
    export.to_onnx(sampler, path, kind="step", steps=10, batch=2)
    return ort.load(path)


def test_load_gives_a_sampler_with_the_files_diffusion(onnx_sampler, sampler):
    assert isinstance(onnx_sampler, fastddpm.Sampler)
    assert isinstance(onnx_sampler.unet, ort.OnnxDenoiser)
    assert onnx_sampler.diffusion == sampler.diffusion
    assert onnx_sampler.unet.config == sampler.unet.config


def test_ancestral_sampling_gives_the_pytorch_images(onnx_sampler, sampler):
    ours = onnx_sampler.sample(3, generator=seeded(0), progress=False)
    theirs = sampler.sample(3, generator=seeded(0), progress=False)
    assert ours.shape == (3, 3, 16, 16)
    assert (ours - theirs).abs().max().item() <= IMAGE_TOLERANCE
    assert ours.std() > 0.1  # real images, not a constant


@pytest.mark.parametrize("method, steps, eta", [("ddpm", 7, 0.0), ("ddim", "ddim10", 0.5)])
def test_respaced_and_ddim_sampling_give_the_pytorch_images(onnx_sampler, sampler, method, steps, eta):
    x_T = torch.randn(2, 3, 16, 16, generator=seeded(1))
    kwargs = dict(steps=steps, method=method, eta=eta, x_T=x_T, progress=False)
    ours = onnx_sampler.sample(2, generator=seeded(2), **kwargs)
    theirs = sampler.sample(2, generator=seeded(2), **kwargs)
    assert (ours - theirs).abs().max().item() <= IMAGE_TOLERANCE


def test_the_step_graph_equals_one_pytorch_step(step_sampler, sampler):
    table = sampler.step_table(steps=10)
    g = seeded(3)
    for t in ([9, 9], [0, 0], [4, 7]):  # per-sample step indices too
        t = torch.tensor(t)
        x_t, z = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
        with torch.no_grad():
            eps = sampler.unet(x_t, table.timesteps[t])
        expected = ops.ddpm_step(x_t, eps, t, table, noise=z)
        assert (step_sampler.step(x_t, t, z) - expected).abs().max().item() <= 1e-5


def test_the_step_graph_loop_gives_the_pytorch_images(step_sampler, sampler):
    # n = 3 on a graph of static batch 2: the second call pads one row.
    ours = step_sampler.sample(3, generator=seeded(4), progress=False)
    theirs = sampler.sample(3, steps=10, generator=seeded(4), progress=False)
    assert (ours - theirs).abs().max().item() <= IMAGE_TOLERANCE
    assert ours.min() >= -1 and ours.max() <= 1


def test_the_step_graph_holds_the_table(step_sampler):
    assert step_sampler.num_steps == 10 and step_sampler.stochastic
    assert step_sampler.timesteps == space_timesteps(T, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert step_sampler.export.step == export.StepSpec(steps=10, clip_x0=True)


@pytest.mark.parametrize("method", ["dpmpp-2m-sde", "unipc", "euler-a"])
def test_a_solver_on_the_onnx_network_gives_the_pytorch_images(onnx_sampler, sampler, method):
    kwargs = dict(steps=5, method=method, spacing="trailing", seed=4, progress=False)
    assert (
        onnx_sampler.sample(2, **kwargs) - sampler.sample(2, **kwargs)
    ).abs().max().item() <= IMAGE_TOLERANCE


def test_fractional_timesteps_are_refused_by_an_onnx_network(onnx_sampler):
    """Euler's linspace spacing visits fractional t, which an int64 ONNX input cannot hold."""
    with pytest.raises(ValueError, match="fractional timesteps here, which only a torch network"):
        onnx_sampler.sample(1, steps=7, method="euler", spacing="linspace", progress=False)


def test_bad_arguments(step_sampler, onnx_sampler):
    with pytest.raises(ValueError, match=r"x_T must have shape \(2, 3, 16, 16\)"):
        step_sampler.sample(2, x_T=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="n must be a positive int"):
        step_sampler.sample(0)
    with pytest.raises(ValueError, match=r"t out of range: this step graph has steps 0\.\.9"):
        step_sampler.step(torch.randn(1, 3, 16, 16), 10)
    with pytest.raises(ValueError, match="t must be an integer scalar or"):
        onnx_sampler.unet(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 1.0]))


def _with_metadata(path, out, **changes):
    import onnx

    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props} | changes
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(out))
    return out


def test_a_step_export_whose_metadata_lies_is_refused(step_sampler, tmp_path):
    """The step table inside the graph is compared with the one the metadata's steps and method give."""
    path = step_sampler.export.path
    step = step_sampler.export.step.__dict__
    for change, message in (
        ({"steps": 20}, r"gives a step table of shape \(20, 7\), its graph holds \(10, 7\)"),
        ({"method": "ddim"}, "its graph's step table is not the one its metadata describes"),
        ({"variance": "fixedsmall"}, "its graph's step table is not the one its metadata describes"),
        ({"eta": 1.0}, "eta=1.0 applies to the ddim method only"),
    ):
        lie = _with_metadata(path, tmp_path / "lie.onnx", **{"fastddpm.step": json.dumps({**step, **change})})
        with pytest.raises(export.ExportError, match=message):
            ort.load(lie)


def test_flipped_weights_or_another_graph_under_copied_metadata_are_refused(step_sampler, tmp_path):
    import onnx

    model = onnx.load(str(step_sampler.export.path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(tensor.raw_data)
    raw[len(raw) // 2] ^= 0x01
    tensor.raw_data = bytes(raw)
    onnx.save(model, str(tmp_path / "flipped.onnx"))
    with pytest.raises(
        export.ExportError, match="its graph or weights are not the ones it was exported with"
    ):
        ort.load(tmp_path / "flipped.onnx")
    del model.graph.node[:]
    del model.graph.initializer[:]
    model.graph.node.append(onnx.helper.make_node("Identity", ["x_t"], ["x_prev"]))
    onnx.save(model, str(tmp_path / "identity.onnx"))
    with pytest.raises(
        export.ExportError, match="its graph or weights are not the ones it was exported with"
    ):
        ort.OnnxStepSampler(tmp_path / "identity.onnx")
