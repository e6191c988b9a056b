"""ONNX export of fastddpm networks (the file format and its reader: fastddpm.onnx_format).

Two kinds of graph, both with float32 inputs and outputs whatever the network's dtype:

    denoiser   x (N, C, H, W) float32, t (N,) int64 timestep      -> eps (N, C, H, W)
    step       x_t (N, C, H, W), t (N,) int64 step index, z (N, C, H, W) noise
                                                                  -> x_prev (N, C, H, W)

The step graph holds the network, the clipped-x0 update and the coefficient table: the
network receives `StepTable.timesteps[t]`, and `x_prev = mean + sigma_t z` (sigma is 0 at
step index 0). A runtime samples with nothing but a loop around it.

A copy of the network (the caller's model is never touched) is exported on the reference
backend, whose ops trace to standard ONNX ops under torch.export (fastddpm.reference):
attention as MatMul, Softmax, MatMul, and GroupNorm as ONNX's InstanceNormalization pattern
(reshape to (N, G, -1), InstanceNormalization with unit scale, reshape back, per-channel Mul
and Add), which TensorRT's parser maps to its native normalization layer; see
docs/design-notes.md. Statistics, softmax and the timestep embedding stay float32 in a float16
export. The file gets fastddpm's metadata and graph fingerprint, and is read back and verified.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from . import ops, reference
from ._version import __version__
from .io import atomic_write
from .onnx_format import (
    DEFAULT_OPSET,
    DTYPES,
    KINDS,
    MIN_OPSET,
    ExportError,
    OnnxExport,
    StepSpec,
    export_failure,
    graph_fingerprint,
    read_export,
    require,
)
from .sampler import Sampler
from .schedule import DiffusionConfig, StepTable
from .unet import AttnBlock, Norm, UNet

MATMULS_PER_ATTENTION = 4  # the q, k, v projection (one, stacked), q k^T, P v, proj_out
# Largest error allowed when an export is verified against the PyTorch reference: absolute for
# float32 (the project's bound), relative to the output's scale for float16.
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2
_EXTERNAL_DATA_BYTES = 1_800_000_000  # below ONNX's 2 GiB protobuf limit everything stays in one file


# --- the graph that gets exported --------------------------------------------------------------


def _exportable_copy(unet: UNet, dtype: torch.dtype) -> UNet:
    """A CPU copy of `unet` in eval mode on the reference backend, whose ops trace to standard ONNX
    ops (fastddpm.reference under torch.export); norms keep float32 weights."""
    net = copy.deepcopy(unet).cpu().eval().to(dtype)
    net.backend = "torch"
    for module in net.modules():
        if isinstance(module, Norm):
            module.float()
    return net


class _Denoiser(nn.Module):
    """x float32 (N, C, H, W), t int64 (N,) -> eps float32, the network in its own dtype."""

    def __init__(self, unet: UNet, dtype: torch.dtype) -> None:
        super().__init__()
        self.unet, self.dtype = unet, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x.to(self.dtype), t).float()


class _Step(nn.Module):
    """x_t, z float32 (N, C, H, W), t int64 (N,) step index -> x_{t-1} float32 (N, C, H, W)."""

    def __init__(self, unet: UNet, dtype: torch.dtype, table: StepTable, clip_x0: bool) -> None:
        super().__init__()
        self.denoiser, self.clip_x0 = _Denoiser(unet, dtype), clip_x0
        self.register_buffer("coef", table.coef.cpu())
        self.register_buffer("timesteps", table.timesteps.cpu())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        eps = self.denoiser(x_t, self.timesteps[t])
        # stochastic=True even for a table without noise: sigma is then 0 and z adds nothing,
        # but z stays a graph input, so every step graph has the same three inputs.
        table = StepTable(self.coef, self.timesteps, stochastic=True)
        # The reference itself: ops.ddpm_step's range check on t cannot be traced.
        return reference.ddpm_step(x_t, eps, t, table, noise=z, clip_x0=self.clip_x0)


def _unwrap(model: Sampler | UNet, diffusion: DiffusionConfig | None) -> tuple[UNet, DiffusionConfig]:
    if isinstance(model, Sampler):
        model, diffusion = model.unet, diffusion or model.diffusion
    if not isinstance(model, UNet):
        raise TypeError(f"to_onnx exports a fastddpm UNet or Sampler, got {type(model).__name__}")
    return model, diffusion or DiffusionConfig()


def _example_inputs(info: OnnxExport, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs for tracing and verification; t spread over the whole range of steps."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *info.image_shape())
    if info.kind == "denoiser":
        top = info.diffusion.num_timesteps - 1
    else:
        top = len(info.step.table(info.diffusion)) - 1
    t = torch.linspace(top, 0, batch).round().long() if batch > 1 else torch.tensor([top // 2])
    inputs = {info.inputs[0]: torch.randn(shape, generator=g), "t": t}
    if info.kind == "step":
        inputs["z"] = torch.randn(shape, generator=g)
    return inputs


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines, warnings and log messages (errors still raise)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_onnx(
    model: Sampler | UNet,
    path: str | os.PathLike,
    *,
    kind: str = "denoiser",
    diffusion: DiffusionConfig | None = None,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    dtype: str = "float32",
    steps: int | str | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
    variance: str | None = None,
    clip_x0: bool | None = None,
    verify: bool = True,
) -> OnnxExport:
    """Export a U-Net (or a Sampler's) to an ONNX file at `path`; returns what was written.

    kind: "denoiser" (x, t) -> eps, or "step" (x_t, t, z) -> x_prev with the steps given by
    steps/method/eta/variance/clip_x0 (as Sampler.sample takes them). batch: None for a
    dynamic batch, else that static size. dtype: the network's ("float32" or "float16");
    inputs and outputs are float32 either way. verify: check the file with onnx.checker and
    run it with onnxruntime against the PyTorch reference (float32: max abs error <= 1e-4;
    float16: <= 1e-2 of the output's scale), raising ExportError beyond that.
    """
    unet, diffusion = _unwrap(model, diffusion)
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}; choose one of {', '.join(KINDS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be None (dynamic) or a positive int, got {batch!r}")
    step = None
    if kind == "step":
        clip_x0 = diffusion.clip_x0 if clip_x0 is None else clip_x0
        step = StepSpec(steps, method, eta, variance, clip_x0)
    info = OnnxExport(kind, unet.config, diffusion, dtype, batch, opset, step, Path(path))
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export (torch's exporter)")

    net = _exportable_copy(unet, DTYPES[dtype])
    module = (
        _Denoiser(net, DTYPES[dtype])
        if kind == "denoiser"
        else _Step(net, DTYPES[dtype], step.table(diffusion), step.clip_x0)
    )
    example = _example_inputs(info, batch or 2, seed=0)
    dynamic = None
    if batch is None:
        n = torch.export.Dim("batch")
        dynamic = {name: {0: n} for name in info.inputs}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                tuple(example.values()),
                dynamo=True,
                input_names=list(info.inputs),
                output_names=list(info.outputs),
                opset_version=opset,
                dynamic_shapes=dynamic,
                optimize=True,
                verbose=False,
            )
    except Exception as err:  # the exporter raises RuntimeError subclasses of many kinds
        raise ExportError(
            f"cannot export this {type(unet).__name__} to ONNX: {export_failure(err)}. fastddpm exports"
            " its own ops as standard ONNX ops; this comes from other code in the model (an op with no"
            " ONNX translation, or control flow that depends on tensor values)"
        ) from err
    program.model.metadata_props.update(info.metadata())
    program.model.producer_name = "fastddpm"
    program.model.producer_version = __version__
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx = require("onnx", "ONNX export")

    def fingerprinted(tmp: Path) -> None:  # the fingerprint of the graph as saved, added to its metadata
        model = onnx.load(str(tmp), load_external_data=False)
        entry = model.metadata_props.add()
        entry.key, entry.value = "fastddpm.graph_sha256", graph_fingerprint(model, tmp.parent)
        onnx.save(model, str(tmp))

    size = sum(p.numel() * p.element_size() for p in module.parameters())
    if size > _EXTERNAL_DATA_BYTES:  # weights in a data file beside it, named after it
        program.save(path, external_data=True)
        fingerprinted(path)
    else:

        def write(tmp: str) -> None:
            program.save(tmp, external_data=False)
            fingerprinted(Path(tmp))

        atomic_write(path, write)

    onnx.checker.check_model(str(path), full_check=True)
    _check_standard_ops(path, unet)
    info = read_export(path)  # the file reads back as what was written
    if verify:
        info = _verify(info, unet, path)
    return info


# --- what the graph holds ----------------------------------------------------------------------


def exported_ops(path: str | os.PathLike) -> collections.Counter:
    """How often each op type occurs in the graph at `path` ("domain::Op" outside ai.onnx)."""
    onnx = require("onnx", "reading ONNX files")
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node
    )


def _check_standard_ops(path: Path, unet: UNet) -> None:
    """Standard ai.onnx ops only; one InstanceNormalization per GroupNorm; attention as MatMul,
    Softmax, MatMul, and its 1x1 projections as two MatMul (q, k, v stacked; proj_out)."""
    counts = exported_ops(path)
    custom = sorted(op for op in counts if "::" in op)
    if custom:
        raise ExportError(f"the exported graph holds non-standard ops {custom}")
    norms = sum(isinstance(m, Norm) for m in unet.modules())
    attns = sum(isinstance(m, AttnBlock) for m in unet.modules())
    found = (counts["InstanceNormalization"], counts["Softmax"], counts["MatMul"])
    if found != (norms, attns, MATMULS_PER_ATTENTION * attns):
        raise ExportError(
            f"the exporter changed the graph's form: expected {norms} InstanceNormalization (one per"
            f" GroupNorm), {attns} Softmax and {MATMULS_PER_ATTENTION * attns} MatMul (attention and"
            f" its projections), found {found}"
        )


def _verify(info: OnnxExport, unet: UNet, path: Path) -> OnnxExport:
    """Run the file with onnxruntime against the float32 PyTorch reference; raise beyond tolerance."""
    from .ort import run_session, session  # onnxruntime is imported there, lazily

    reference_net = copy.deepcopy(unet).cpu().float().eval()
    reference_net.backend = "torch"
    inputs = _example_inputs(info, info.batch or 3, seed=1)
    with torch.no_grad():
        if info.kind == "denoiser":
            expected = reference_net(inputs["x"], inputs["t"])
        else:
            table = info.step.table(info.diffusion)
            eps = reference_net(inputs["x_t"], table.timesteps[inputs["t"]])
            expected = ops.ddpm_step(
                inputs["x_t"], eps, inputs["t"], table, noise=inputs["z"], clip_x0=info.step.clip_x0
            )
    got = run_session(session(path, torch.device("cpu")), inputs, info.outputs[0], expected.shape)
    error = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    bound = FP32_TOLERANCE if info.dtype == "float32" else FP16_TOLERANCE * max(scale, 1.0)
    if not error <= bound:
        raise ExportError(
            f"{path}: onnxruntime's output differs from PyTorch's by {error:.3g} (allowed {bound:.3g})"
        )
    return OnnxExport(**{**info.__dict__, "max_abs_error": error})
