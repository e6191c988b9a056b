"""TensorRT: engine files, the mismatch checks, and (where tensorrt imports and a GPU exists) the
engine and the CUDA-graph sampler. CI has neither, so the TensorRT path is not exercised there:
those tests skip with that reason. What needs no TensorRT (the engine file's header, the
compatibility check, the error without TensorRT) runs everywhere."""

import importlib.util

import pytest
import torch

from fastddpm import export, trt
from fastddpm.cli import main
from fastddpm.unet import PRESETS, UNet

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="needs `import tensorrt` (pip install tensorrt, from NVIDIA's package index) and a CUDA GPU;"
    " CI has neither, so the TensorRT path is not exercised there",
)


def header(**changes) -> trt.EngineHeader:
    info = export.OnnxExport("denoiser", PRESETS["tiny"], export.DiffusionConfig(), "float16")
    fields = dict(
        tensorrt="10.9.0",
        gpu="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        export=info.metadata(),
        min_batch=1,
        opt_batch=8,
        max_batch=16,
    )
    return trt.EngineHeader(**{**fields, **changes})


# --- everywhere -----------------------------------------------------------------------------------


def test_engine_file_round_trip(tmp_path):
    path = tmp_path / "e.engine"
    trt.write_engine(path, header(), b"serialized engine bytes")
    got, engine = trt.read_engine(path)
    assert got == header() and engine == b"serialized engine bytes"
    assert got.info().unet_config == PRESETS["tiny"] and got.info().dtype == "float16"


def test_a_file_that_is_not_a_fastddpm_engine(tmp_path):
    (tmp_path / "plain.engine").write_bytes(b"\x00" * 64)  # e.g. trtexec's own serialized engine
    with pytest.raises(trt.EngineMismatchError, match="is not a fastddpm TensorRT engine"):
        trt.read_engine(tmp_path / "plain.engine")
    with pytest.raises(trt.EngineMismatchError, match="is not a fastddpm TensorRT engine"):
        trt.TensorRTDenoiser(tmp_path / "plain.engine")  # rejected before TensorRT is needed
    with pytest.raises(FileNotFoundError, match="no such engine file"):
        trt.read_engine(tmp_path / "missing.engine")


def test_an_engine_for_another_tensorrt_version_or_gpu():
    here = dict(tensorrt="10.9.0", gpu="NVIDIA H100 80GB HBM3", compute_capability=(9, 0))
    assert trt.check_compatible(header(), **here) == []
    with pytest.raises(
        trt.EngineMismatchError, match=r"built with TensorRT 10\.3\.0 .*this is TensorRT 10\.9\.0"
    ):
        trt.check_compatible(header(tensorrt="10.3.0"), **here)
    with pytest.raises(trt.EngineMismatchError, match=r"on NVIDIA A100.*\(sm_80\).*GPU architecture differs"):
        trt.check_compatible(header(gpu="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0)), **here)
    # Same architecture, another model: TensorRT can run it; fastddpm warns.
    warnings = trt.check_compatible(header(gpu="NVIDIA H100 PCIe"), **here)
    assert len(warnings) == 1 and "built on NVIDIA H100 PCIe" in warnings[0]


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_error_says_how_to_install_it(tmp_path, capsys):
    with pytest.raises(trt.TensorRTUnavailableError, match=r"install it with `pip install tensorrt`"):
        trt.build_engine(tmp_path / "eps.onnx", tmp_path / "eps.engine")
    assert main(["export", "trt", str(tmp_path / "eps.onnx"), "--out", str(tmp_path / "e.engine")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastddpm: error: the TensorRT path needs the Python package 'tensorrt'")
    assert "pip install tensorrt" in err and len(err.strip().splitlines()) == 1


# --- where TensorRT and a GPU are ----------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(unet, engine path, timing cache): the tiny preset, fp16 export, batch profile 1..4."""
    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"]).eval()
    folder = tmp_path_factory.mktemp("trt")
    export.to_onnx(unet, folder / "eps16.onnx", dtype="float16")
    cache = folder / "timing.cache"
    trt.build_engine(
        folder / "eps16.onnx", folder / "eps16.engine", max_batch=4, opt_batch=2, timing_cache=cache
    )
    return unet, folder / "eps16.engine", cache


@needs_tensorrt
def test_engine_equals_pytorch_within_half_precision(built):
    unet, path, cache = built
    assert cache.stat().st_size > 0
    denoiser = trt.TensorRTDenoiser(path)
    for n in (1, 3):
        x = torch.randn(n, 3, 16, 16)
        t = torch.tensor([0, 500, 999][:n])
        with torch.no_grad():
            expected = unet(x, t)
        got = denoiser(x.cuda(), t.cuda()).cpu()
        assert (got - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()
    with pytest.raises(ValueError, match=r"batch 5 is outside this engine's profile \[1, 4\]"):
        denoiser(torch.randn(5, 3, 16, 16, device="cuda"), 0)


@needs_tensorrt
def test_graphed_sampler_equals_eager_steps(built):
    from fastddpm.sampler import Sampler

    _, path, _ = built
    sampler = trt.TensorRTSampler(path)
    eager = Sampler(sampler.unet, sampler.diffusion)
    x_T = torch.randn(2, 3, 16, 16)
    # DDIM with eta = 0 draws no noise: the CUDA graph and the eager loop must agree.
    kwargs = dict(steps="ddim10", method="ddim", x_T=x_T, progress=False)
    graphed = sampler.sample(2, **kwargs)
    assert (graphed - eager.sample(2, **kwargs)).abs().max().item() <= 1e-3
    images = sampler.sample(3, steps=20, generator=torch.Generator().manual_seed(0), progress=False)
    assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1


@needs_tensorrt
def test_a_rebuild_reuses_the_timing_cache(built, tmp_path):
    _, _, cache = built
    before = cache.read_bytes()
    onnx_path = cache.parent / "eps16.onnx"
    trt.build_engine(onnx_path, tmp_path / "again.engine", max_batch=4, timing_cache=cache)
    assert len(cache.read_bytes()) >= len(before)


@needs_tensorrt
def test_an_engine_whose_header_lies_is_refused(built, tmp_path):
    _, path, _ = built
    head, engine = trt.read_engine(path)
    trt.write_engine(
        tmp_path / "other.engine", trt.EngineHeader(**{**head.__dict__, "tensorrt": "9.0.0"}), engine
    )
    with pytest.raises(trt.EngineMismatchError, match="built with TensorRT 9.0.0"):
        trt.TensorRTDenoiser(tmp_path / "other.engine")
    trt.write_engine(tmp_path / "corrupt.engine", head, engine[: len(engine) // 2])
    with pytest.raises(trt.EngineMismatchError, match="could not deserialize"):
        trt.TensorRTDenoiser(tmp_path / "corrupt.engine")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"min_batch": "1"}, "min_batch must be an int"),
        ({"max_batch": 0}, "max_batch must be an int >= 1"),
        ({"compute_capability": [9]}, "compute_capability must be two ints"),
        ({"export": []}, "export must map metadata names to strings"),
        ({"extra": 1}, "unknown key extra"),
        ({"opt_batch": 32}, "min_batch <= opt_batch <= max_batch"),
    ],
)
def test_an_engine_header_of_the_wrong_types_is_refused(tmp_path, change, message):
    import json
    import struct

    head = json.dumps({**json.loads(header().to_bytes()), **change}).encode()
    path = tmp_path / "e.engine"
    path.write_bytes(trt.ENGINE_MAGIC + struct.pack("<I", len(head)) + head + b"engine")
    with pytest.raises(trt.EngineMismatchError, match=f"unreadable fastddpm engine header: .*{message}"):
        trt.read_engine(path)


def test_an_engine_header_whose_export_metadata_lies_is_refused():
    bad = header().export | {"fastddpm.diffusion_config": '{"clip_x0": "false"}'}
    with pytest.raises(
        export.ExportError, match="fastddpm.diffusion_config: unknown key|clip_x0|missing key"
    ):
        header(export=bad).info()
