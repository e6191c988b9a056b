"""ONNX export: standard ops only, the GroupNorm and attention forms, onnxruntime equal to PyTorch,
and clear errors for models that cannot be exported and files that are not fastddpm exports."""

import functools

import numpy as np
import onnx
import pytest
import torch

import fastddpm
from fastddpm import export, onnx_format, ort
from fastddpm.cli import main
from fastddpm.unet import PRESETS, UNet

from .conftest import tiny_unet

# The ops a DDPM U-Net export may hold: nothing custom, nothing fastddpm-specific.
STANDARD_OPS = {
    "Add", "Cast", "Concat", "Conv", "Cos", "Gather", "Gemm", "InstanceNormalization", "MatMul", "Mul",
    "Reshape", "Resize", "Sigmoid", "Sin", "Softmax", "Transpose", "Unsqueeze", "Shape", "Pad", "Clip",
    "Sub", "Expand", "Squeeze", "Split",
}  # fmt: skip


@pytest.fixture(scope="module")
def diffusers_export(tiny_diffusers, tmp_path_factory):
    """(sampler, info, path): a real diffusers checkpoint (8-dim heads, perturbed norms), dynamic batch."""
    folder, _ = tiny_diffusers
    sampler = fastddpm.load(folder)
    path = tmp_path_factory.mktemp("onnx") / "eps.onnx"
    return sampler, export.to_onnx(sampler, path), path


@functools.cache
def _session(path):
    return ort.session(path, torch.device("cpu"))


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    """(unet, info, path): the tiny preset with a float16 network, static batch 2."""
    unet = tiny_unet()
    path = tmp_path_factory.mktemp("onnx16") / "eps16.onnx"
    return unet, export.to_onnx(unet, path, dtype="float16", batch=2), path


def test_export_passes_the_checker_and_names_its_inputs(diffusers_export):
    sampler, info, path = diffusers_export
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["x", "t"]
    assert [o.name for o in model.graph.output] == ["eps"]
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    assert model.opset_import[0].version >= 18
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fastddpm.format"] == onnx_format.FORMAT and meta["fastddpm.kind"] == "denoiser"
    assert export.read_export(path) == export.OnnxExport(
        "denoiser", sampler.unet.config, sampler.diffusion, "float32", None, 18, None, path
    )


def test_groupnorm_is_instance_normalization_and_attention_is_matmul_softmax(diffusers_export):
    sampler, _, path = diffusers_export
    counts = export.exported_ops(path)
    norms = sum(isinstance(m, fastddpm.unet.Norm) for m in sampler.unet.modules())
    attns = sum(isinstance(m, fastddpm.unet.AttnBlock) for m in sampler.unet.modules())
    assert counts["InstanceNormalization"] == norms == 21
    assert (
        counts["Softmax"] == attns and counts["MatMul"] == 4 * attns
    )  # attention 2, projections 2 (q, k, v stacked)
    assert "GroupNormalization" not in counts and "LayerNormalization" not in counts
    assert set(counts) <= STANDARD_OPS, set(counts) - STANDARD_OPS
    # The InstanceNormalization pattern: unit scale and zero bias as initializers (TensorRT needs
    # them constant), one per group; the per-channel affine follows as Mul and Add.
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "InstanceNormalization"):
        scale, bias = inits[node.input[1]], inits[node.input[2]]
        assert scale.shape == bias.shape == (sampler.unet.config.num_groups,)
        assert np.all(scale == 1) and np.all(bias == 0)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_onnxruntime_equals_pytorch(diffusers_export, batch):
    sampler, _, path = diffusers_export
    sess = _session(path)
    g = torch.Generator().manual_seed(batch)
    T = sampler.diffusion.num_timesteps
    for t in ([0] * batch, [T - 1] * batch, torch.randint(0, T, (batch,), generator=g).tolist()):
        x = torch.randn(batch, 3, 16, 16, generator=g)
        t = torch.tensor(t)
        with torch.no_grad():
            expected = sampler.unet(x, t)
        got = ort.run_session(sess, {"x": x, "t": t}, "eps", expected.shape)
        assert (got - expected).abs().max().item() <= 1e-4


def test_export_reports_its_measured_error(diffusers_export):
    _, info, _ = diffusers_export
    assert info.max_abs_error is not None and info.max_abs_error <= 1e-4


def test_float16_export_keeps_statistics_softmax_and_embedding_in_float32(fp16_export):
    unet, info, path = fp16_export
    assert info.dtype == "float16" and info.batch == 2
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16

    def input_types(op: str) -> set[int]:
        return {types[n.input[0]] for n in model.graph.node if n.op_type == op}

    assert input_types("InstanceNormalization") == {FLOAT}
    assert input_types("Softmax") == {FLOAT}
    assert input_types("Sin") == input_types("Cos") == {FLOAT}
    assert input_types("Conv") == {FLOAT16}
    # Graph inputs and outputs are float32 whatever the network's dtype.
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [FLOAT, onnx.TensorProto.INT64]
    assert model.graph.output[0].type.tensor_type.elem_type == FLOAT


def test_float16_export_runs_within_half_precision_of_float32_pytorch(fp16_export):
    unet, info, path = fp16_export
    denoiser = ort.OnnxDenoiser(path)  # static batch 2: 3 rows run as 2 + (1 padded to 2)
    x, t = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 500, 999])
    with torch.no_grad():
        expected = unet(x, t)
    error = (denoiser(x, t) - expected).abs().max().item()
    assert error <= 1e-2 * expected.abs().max().item()
    assert info.max_abs_error <= 1e-2 * max(1.0, expected.abs().max().item())


# --- bad input ------------------------------------------------------------------------------------


@torch.library.custom_op("fastddpm_test::unexportable", mutates_args=())
def _unexportable(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_unexportable.register_fake
def _(x):
    return torch.empty_like(x)


class UNetWithForeignOp(UNet):
    """A U-Net whose output passes through an op that has no ONNX translation."""

    def forward(self, x, t):
        return _unexportable(super().forward(x, t))


def test_a_model_with_an_op_onnx_cannot_express_gets_a_clear_error(tmp_path):
    cfg = fastddpm.UNetConfig(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8,
                              dropout=0.0, num_groups=4)  # fmt: skip
    with pytest.raises(
        export.ExportError, match=r"cannot export this UNetWithForeignOp to ONNX.*fastddpm_test"
    ):
        export.to_onnx(UNetWithForeignOp(cfg), tmp_path / "x.onnx", verify=False)
    assert not (tmp_path / "x.onnx").exists()


def test_only_fastddpm_networks_export(tmp_path):
    with pytest.raises(TypeError, match="exports a fastddpm UNet or Sampler, got Conv2d"):
        export.to_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="opset must be an int >= 18"):
        export.to_onnx(UNet(PRESETS["tiny"]), tmp_path / "x.onnx", opset=17)


def test_an_onnx_file_that_is_not_a_fastddpm_export(tmp_path):
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", 1, [1])], [value("y", 1, [1])])
    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(export.ExportError, match="is not a fastddpm export"):
        export.read_export(path)
    with pytest.raises(export.ExportError, match="is not a fastddpm export"):
        ort.load(path)
    (tmp_path / "junk.onnx").write_bytes(b"\x00 not protobuf at all \xff" * 10)
    with pytest.raises(export.ExportError, match="is not an ONNX model"):
        export.read_export(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        export.read_export(tmp_path / "missing.onnx")


def _edited(path, tmp_path, edit):
    model = onnx.load(str(path))
    edit(model)
    out = tmp_path / "edited.onnx"
    onnx.save(model, str(out))
    return out


def test_wrong_input_names_or_shapes_are_named(diffusers_export, tmp_path):
    _, _, path = diffusers_export

    def rename(model):
        model.graph.input[0].name = "sample"

    def resize(model):
        model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32

    def retype(model):
        model.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.FLOAT

    with pytest.raises(export.ExportError, match=r"graph inputs are \['sample', 't'\]; .* has \['x', 't'\]"):
        export.read_export(_edited(path, tmp_path, rename))
    with pytest.raises(
        export.ExportError, match=r"input 'x' is float32 \(batch, 3, 32, 16\); .*\(batch, 3, 16, 16\)"
    ):
        export.read_export(_edited(path, tmp_path, resize))
    with pytest.raises(export.ExportError, match=r"input 't' is float32 \(batch\); .* implies int64"):
        ort.OnnxDenoiser(_edited(path, tmp_path, retype))
    with pytest.raises(export.ExportError, match="is a fastddpm denoiser export; a step export is needed"):
        ort.OnnxStepSampler(path)


def test_the_denoiser_checks_its_input(diffusers_export):
    _, _, path = diffusers_export
    denoiser = ort.OnnxDenoiser(path)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, 16, 16\) for this export"):
        denoiser(torch.randn(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="onnxruntime's CUDA provider"):
        ort.OnnxDenoiser(path, device="cuda")


# --- the command --------------------------------------------------------------------------------


def test_export_command_writes_a_step_graph(tmp_path, capsys):
    out = tmp_path / "step.onnx"
    argv = ["export", "onnx", "--preset", "tiny", "--kind", "step", "--steps", "ddim5", "--sampler", "ddim"]
    assert main([*argv, "--batch", "1", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "GroupNorm as 21 InstanceNormalization, attention as 16 MatMul" in stdout
    assert "(with its projections) + 4 Softmax" in stdout
    assert "verified with onnxruntime against PyTorch" in stdout
    info = export.read_export(out)
    assert (info.kind, info.batch, info.step.steps, info.step.method) == ("step", 1, "ddim5", "ddim")


def test_export_command_errors_are_one_line(tmp_path, capsys):
    assert (
        main(["export", "onnx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")]) == 1
    )
    assert capsys.readouterr().err.startswith("fastddpm: error: no such checkpoint")


def test_every_export_records_the_fingerprint_of_its_graph(diffusers_export, tmp_path):
    _, info, path = diffusers_export
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fastddpm.graph_sha256"] == info.graph_sha256 == export.graph_fingerprint(model, path.parent)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {k: v for k, v in meta.items() if k != "fastddpm.graph_sha256"})
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(export.ExportError, match="has no fastddpm.graph_sha256 fingerprint; export it again"):
        ort.OnnxDenoiser(tmp_path / "old.onnx")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("fastddpm.unet_config", '{"ch": "32"}', "fastddpm.unet_config: unknown key|fastddpm.unet_config: "),
        ("fastddpm.diffusion_config", "[1]", "fastddpm.diffusion_config: expected a JSON object, got list"),
        ("fastddpm.batch", "-3", "fastddpm.batch must be 'dynamic' or a positive int"),
        ("fastddpm.graph_sha256", "xyz", "fastddpm.graph_sha256 must be 64 hex digits"),
    ],
)
def test_metadata_of_the_wrong_type_is_named(diffusers_export, tmp_path, key, value, message):
    _, _, path = diffusers_export
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props} | {key: value}
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(export.ExportError, match=message):
        export.read_export(tmp_path / "bad.onnx")


def test_export_and_convert_check_the_output_before_working(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    model = str(fastddpm.checkpoints.DEFAULT_MODEL)
    for argv, message in (
        (["export", "onnx", "--out", str(tmp_path / "file" / "x.onnx")], "is not a directory"),
        (["export", "onnx", "--out", str(tmp_path)], "is a directory, not a file"),
        (["export", "onnx", "--out", str(tmp_path / ("a" * 250 + ".onnx"))], "the file system allows"),
        (
            ["convert", model, str(tmp_path / "file" / "m.safetensors"), "--to", "native"],
            "is not a directory",
        ),
        (
            ["convert", model, str(tmp_path / "file"), "--to", "diffusers"],
            "a diffusers checkpoint is a folder",
        ),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
