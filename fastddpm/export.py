"""ONNX export of fastddpm networks, and the reader that checks a file is one.

Two kinds of graph, both with float32 inputs and outputs whatever the network's dtype:

    denoiser   x (N, C, H, W) float32, t (N,) int64 timestep      -> eps (N, C, H, W)
    step       x_t (N, C, H, W), t (N,) int64 step index, z (N, C, H, W) noise
                                                                  -> x_prev (N, C, H, W)

The step graph holds the network, the clipped-x0 update and the coefficient table: the
network receives `StepTable.timesteps[t]`, and `x_prev = mean + sigma_t z` (sigma is 0 at
step index 0). A runtime samples with nothing but a loop around it.

During export the fused kernels are swapped for standard ops on a copy of the network (the
caller's model is never touched): attention is the reference's MatMul, Softmax, MatMul,
and GroupNorm is written as ONNX's InstanceNormalization pattern (reshape to (N, G, -1),
InstanceNormalization with unit scale, reshape back, per-channel Mul and Add), which
TensorRT's parser maps to its native normalization layer; see docs/design-notes.md.
Statistics, softmax and the timestep embedding stay float32 in a float16 export.

Every file carries metadata (`metadata_props`) naming it a fastddpm export of a kind, with
the U-Net and diffusion configs and a SHA-256 fingerprint of the graph (its nodes and its
weights, `graph_sha256`). `read_export` checks them before anything runs it: the configs
through fastddpm.config_schema, the graph's inputs and outputs, the fingerprint (flipped
weight bytes, or another graph under copied metadata, are refused), and for a step export
the step table inside the graph against the one its metadata's steps and method give.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import hashlib
import importlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__, ops, reference
from . import config_schema as schema
from .io import atomic_write
from .sampler import METHODS, DiffusionConfig, Sampler
from .schedule import StepTable
from .unet import AttnBlock, Norm, UNet, UNetConfig

FORMAT = "fastddpm-onnx-1"
DEFAULT_OPSET = 18
MIN_OPSET = 18
KINDS = ("denoiser", "step")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Graph inputs and outputs of each kind, in order.
INPUTS = {"denoiser": ("x", "t"), "step": ("x_t", "t", "z")}
OUTPUTS = {"denoiser": ("eps",), "step": ("x_prev",)}
MATMULS_PER_ATTENTION = 6  # the q, k, v projections, q k^T, P v, proj_out
# Largest error allowed when an export is verified against the PyTorch reference: absolute for
# float32 (the project's bound), relative to the output's scale for float16.
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2
_EXTERNAL_DATA_BYTES = 1_800_000_000  # below ONNX's 2 GiB protobuf limit everything stays in one file


class ExportError(ValueError):
    """A model that cannot be exported, or a file that is not a usable fastddpm export."""


class MissingPackageError(ops.BackendUnavailableError):
    """An optional package (onnx, onnxscript, onnxruntime, tensorrt) that this path needs."""


def require(module: str, purpose: str, install: str | None = None, note: str = "") -> ModuleType:
    """Import `module`, or raise MissingPackageError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingPackageError(
            f"{purpose} needs the Python package {module!r} ({err}); install it with"
            f" `{install or 'pip install ' + module}`{note}"
        ) from err


_STEP_FIELDS = {
    "steps": schema.Field("json", optional=True),
    "method": schema.Field("str", choices=METHODS),
    "eta": schema.Field("float", 0, None),
    "variance": schema.Field("str", choices=("fixedlarge", "fixedsmall"), optional=True),
    "clip_x0": schema.Field("bool"),
}


@dataclass(frozen=True)
class StepSpec:
    """The reverse steps a step graph holds: as `Sampler.step_table` takes them."""

    steps: int | str | None = None
    method: str = "ddpm"
    eta: float = 0.0
    variance: str | None = None
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.eta != 0 and self.method != "ddim":
            raise ValueError(f"eta={self.eta} applies to the ddim method only, not {self.method}")

    @classmethod
    def from_dict(cls, d: object, source: str) -> StepSpec:
        """A StepSpec from metadata, every field's type checked."""
        v = schema.check(_STEP_FIELDS, d, source)
        steps = v["steps"]
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int | str)):
            raise schema.ConfigError(
                f"{source}: steps must be null, an int or a spacing string, got {steps!r:.40}"
            )
        return cls(**v)

    def table(self, diffusion: DiffusionConfig, device: torch.device | str = "cpu") -> StepTable:
        return Sampler(_Placed(device), diffusion).step_table(
            self.steps, self.method, self.eta, self.variance
        )


@dataclass(frozen=True)
class OnnxExport:
    """What a fastddpm ONNX file holds. batch None: dynamic; max_abs_error: from verification."""

    kind: str
    unet_config: UNetConfig
    diffusion: DiffusionConfig
    dtype: str = "float32"
    batch: int | None = None
    opset: int = DEFAULT_OPSET
    step: StepSpec | None = None
    path: Path | None = None
    max_abs_error: float | None = field(default=None, compare=False)
    graph_sha256: str | None = field(default=None, compare=False)  # graph_fingerprint of the file

    @property
    def inputs(self) -> tuple[str, ...]:
        return INPUTS[self.kind]

    @property
    def outputs(self) -> tuple[str, ...]:
        return OUTPUTS[self.kind]

    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.unet_config
        return cfg.in_channels, cfg.resolution, cfg.resolution

    def metadata(self) -> dict[str, str]:
        meta = {
            "fastddpm.format": FORMAT,
            "fastddpm.version": __version__,
            "fastddpm.kind": self.kind,
            "fastddpm.inputs": json.dumps(list(self.inputs)),
            "fastddpm.outputs": json.dumps(list(self.outputs)),
            "fastddpm.dtype": self.dtype,
            "fastddpm.batch": "dynamic" if self.batch is None else str(self.batch),
            "fastddpm.unet_config": json.dumps(self.unet_config.to_dict()),
            "fastddpm.diffusion_config": json.dumps(self.diffusion.to_dict()),
        }
        if self.step is not None:
            meta["fastddpm.step"] = json.dumps(self.step.__dict__)
        if self.graph_sha256 is not None:
            meta["fastddpm.graph_sha256"] = self.graph_sha256
        return meta


class _Placed:
    """Stands in for a network where only a device is needed (building a step table)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device, self.dtype = torch.device(device), torch.float32


# --- the graph that gets exported --------------------------------------------------------------


def _onnx_group_norm_silu(
    norm: Norm, x: torch.Tensor, *, silu: bool, add: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """GroupNorm(+SiLU) in the form that exports to ONNX InstanceNormalization; float32 inside.

    x (N, C, H, W) -> (N, G, C/G * H * W) -> InstanceNormalization (unit scale, zero bias)
    -> (N, C, H, W) -> * weight[c] + bias[c] -> SiLU. Same function as the reference.
    """
    h = x.float()
    if add is not None:
        h = h + add.float()[:, :, None, None]
    N, C, H, W = h.shape
    y = F.instance_norm(h.reshape(N, norm.num_groups, -1), eps=norm.eps).reshape(N, C, H, W)
    y = y * norm.weight.float()[:, None, None] + norm.bias.float()[:, None, None]
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def _exportable_copy(unet: UNet, dtype: torch.dtype) -> UNet:
    """A CPU copy of `unet` in eval mode that calls only standard ops; norms keep float32 weights."""
    net = copy.deepcopy(unet).cpu().eval().to(dtype)
    net.backend = "torch"  # attention through the reference: MatMul, Softmax, MatMul
    for module in net.modules():
        if isinstance(module, Norm):
            module.float()
            module.forward = functools.partial(_onnx_group_norm_silu, module)
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


def _export_failure(err: Exception) -> str:
    """The innermost cause of an exporter error, in one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


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
            f"cannot export this {type(unet).__name__} to ONNX: {_export_failure(err)}. fastddpm exports"
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
    Softmax, MatMul, and its four 1x1 projections (q, k, v, proj_out) as MatMul."""
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


# --- reading a file back -----------------------------------------------------------------------

_ELEMENT_TYPES = {1: "float32", 7: "int64", 10: "float16"}  # onnx.TensorProto data types


def _graph_signature(values) -> list[tuple[str, str, tuple[int | str, ...]]]:
    """(name, element type, shape) of each graph input or output; a dynamic dim is its name."""
    out = []
    for v in values:
        tensor = v.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim
        )
        out.append((v.name, _ELEMENT_TYPES.get(tensor.elem_type, f"type {tensor.elem_type}"), dims))
    return out


def read_export(path: str | os.PathLike, kind: str | None = None, *, verify_graph: bool = True) -> OnnxExport:
    """Read and check a fastddpm ONNX export: its metadata, its graph signature and, with
    verify_graph, its fingerprint (graph_sha256) and, for a step export, its step table.

    Raises FileNotFoundError for a missing file and ExportError, naming the problem, for a
    file that is not ONNX, not a fastddpm export, not of `kind` (when given), whose inputs
    and outputs do not have the names, types and shapes its metadata implies, whose nodes or
    weights are not those it was exported with, or whose step table is not the one its
    metadata describes.
    """
    onnx = require("onnx", "reading ONNX files")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ExportError(f"{path} is not an ONNX model: {_export_failure(err)}") from err
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("fastddpm.format") != FORMAT:
        found = meta.get("fastddpm.format")
        raise ExportError(
            f"{path} is not a fastddpm export"
            + (
                f" of a format this version reads (it says {found!r:.40}, expected {FORMAT!r})"
                if found
                else ""
            )
            + "; export one with `fastddpm export onnx` or fastddpm.export.to_onnx"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    info = info_from_metadata(meta, path, opset)
    if kind is not None and info.kind != kind:
        raise ExportError(
            f"{path} is a fastddpm {info.kind} export; a {kind} export is needed here"
            f" ({' '.join(INPUTS[kind])} -> {' '.join(OUTPUTS[kind])})"
        )
    _check_signature(info, model.graph)
    if verify_graph:
        if info.graph_sha256 is None:
            raise ExportError(
                f"{path}: its metadata has no fastddpm.graph_sha256 fingerprint; export it again"
            )
        try:
            found = graph_fingerprint(model, path.parent)
        except Exception as err:  # a missing or short external data file, a damaged tensor
            raise ExportError(f"{path}: its weights cannot be read: {_export_failure(err)}") from err
        if found != info.graph_sha256:
            raise ExportError(
                f"{path}: its graph or weights are not the ones it was exported with (SHA-256"
                f" {found[:12]}..., its metadata records {info.graph_sha256[:12]}...)"
            )
        if info.kind == "step":
            _check_step_table(info, model, path)
    return info


def graph_fingerprint(model, base_dir: str | os.PathLike) -> str:
    """SHA-256 of an ONNX graph: every node (op, domain, inputs, outputs, attributes) in order and
    every initializer (name, type, dims, values, wherever they are stored), by name."""
    onnx = require("onnx", "reading ONNX files")
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(json.dumps([node.op_type, node.domain, list(node.input), list(node.output)]).encode())
        for attribute in node.attribute:
            h.update(attribute.SerializeToString(deterministic=True))
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        values = onnx.numpy_helper.to_array(tensor, str(base_dir))
        h.update(json.dumps([tensor.name, tensor.data_type, list(tensor.dims)]).encode())
        h.update(values.astype(values.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def _check_step_table(info: OnnxExport, model, path: Path) -> None:
    """The step graph's coefficient table ("coef", (S, NUM_COEFS)) and timesteps ((S,) int64) must
    be the ones the metadata's diffusion config and steps give (a lie about steps or method)."""
    onnx = require("onnx", "reading ONNX files")
    try:
        table = info.step.table(info.diffusion)
    except ValueError as err:
        raise ExportError(f"{path}: its metadata's steps do not make a step table: {err}") from None
    coef, timesteps = table.coef.numpy(), table.timesteps.numpy()
    arrays = {t.name: t for t in model.graph.initializer if len(t.dims) <= 2}
    graph_coef = arrays.get("coef")
    if graph_coef is None or tuple(graph_coef.dims) != coef.shape:
        dims = None if graph_coef is None else tuple(graph_coef.dims)
        raise ExportError(
            f"{path}: its metadata gives a step table of shape {coef.shape}, its graph holds {dims}"
            f" (steps {info.step.steps!r}, method {info.step.method!r} in its metadata)"
        )
    got = onnx.numpy_helper.to_array(graph_coef, str(path.parent))
    steps_found = any(
        tuple(t.dims) == timesteps.shape
        and t.data_type == onnx.TensorProto.INT64
        and (onnx.numpy_helper.to_array(t, str(path.parent)) == timesteps).all()
        for t in arrays.values()
    )
    if not (abs(got - coef) <= 1e-6 * (1 + abs(coef))).all() or not steps_found:
        raise ExportError(
            f"{path}: its graph's step table is not the one its metadata describes (steps"
            f" {info.step.steps!r}, method {info.step.method!r}, eta {info.step.eta})"
        )


def info_from_metadata(meta: dict[str, str], path: Path | None = None, opset: int = 0) -> OnnxExport:
    """The OnnxExport that fastddpm metadata (OnnxExport.metadata()) describes; ExportError naming
    the file and the key if any entry is missing, of the wrong type or out of range."""
    from .checkpoints import diffusion_config_from_dict

    source = f"{path or 'ONNX export'}: fastddpm metadata"
    try:
        for key in ("fastddpm.kind", "fastddpm.dtype", "fastddpm.batch", "fastddpm.unet_config"):
            if key not in meta:
                raise schema.ConfigError(f"{source} has no {key}")
        kind, dtype, batch = meta["fastddpm.kind"], meta["fastddpm.dtype"], meta["fastddpm.batch"]
        if kind not in KINDS or dtype not in DTYPES:
            raise ExportError(f"{path}: unknown kind {kind!r:.40} or dtype {dtype!r:.40} in its metadata")
        if (kind == "step") != ("fastddpm.step" in meta):
            raise ExportError(
                f"{path}: a {kind} export {'needs' if kind == 'step' else 'has no'} fastddpm.step"
            )
        if batch != "dynamic" and not (batch.isascii() and batch.isdecimal() and 1 <= int(batch) <= 2**20):
            raise schema.ConfigError(
                f"{source}: fastddpm.batch must be 'dynamic' or a positive int, got {batch!r:.40}"
            )
        entries = {}
        for key in ("unet_config", "diffusion_config", "step"):
            if f"fastddpm.{key}" in meta:
                entries[key] = schema.parse_json(meta[f"fastddpm.{key}"], f"{source} fastddpm.{key}")
        if "diffusion_config" not in entries:
            raise schema.ConfigError(f"{source} has no fastddpm.diffusion_config")
        fingerprint = meta.get("fastddpm.graph_sha256")
        if fingerprint is not None and not (
            len(fingerprint) == 64 and all(c in "0123456789abcdef" for c in fingerprint)
        ):
            raise schema.ConfigError(f"{source}: fastddpm.graph_sha256 must be 64 hex digits")
        return OnnxExport(
            kind=kind,
            unet_config=UNetConfig.from_dict(entries["unet_config"], f"{source} fastddpm.unet_config"),
            diffusion=diffusion_config_from_dict(
                entries["diffusion_config"], f"{source} fastddpm.diffusion_config"
            ),
            dtype=dtype,
            batch=None if batch == "dynamic" else int(batch),
            opset=opset,
            step=StepSpec.from_dict(entries["step"], f"{source} fastddpm.step")
            if "step" in entries
            else None,
            path=path,
            graph_sha256=fingerprint,
        )
    except ExportError:
        raise
    except ValueError as err:  # ConfigError, and a StepSpec or DiffusionConfig that refuses
        raise ExportError(str(err) if str(err).startswith(source) else f"{source}: {err}") from None


def _check_signature(info: OnnxExport, graph) -> None:
    n = "batch" if info.batch is None else info.batch
    image = (n, *info.image_shape())
    out_image = (n, info.unet_config.out_channels, *info.image_shape()[1:])
    expected_inputs = [(info.inputs[0], "float32", image), ("t", "int64", (n,))]
    if info.kind == "step":
        expected_inputs.append(("z", "float32", image))
    expected_outputs = [(info.outputs[0], "float32", out_image)]
    for what, got, want in (
        ("inputs", _graph_signature(graph.input), expected_inputs),
        ("outputs", _graph_signature(graph.output), expected_outputs),
    ):
        if [g[0] for g in got] != [w[0] for w in want]:
            raise ExportError(
                f"{info.path}: graph {what} are {[g[0] for g in got]}; a fastddpm {info.kind} export"
                f" has {[w[0] for w in want]}"
            )
        for (name, etype, dims), (_, want_type, want_dims) in zip(got, want, strict=True):
            dims = tuple(
                "batch" if isinstance(d, str) and info.batch is None and i == 0 else d
                for i, d in enumerate(dims)
            )
            if etype != want_type or dims != want_dims:
                raise ExportError(
                    f"{info.path}: {what[:-1]} {name!r} is {etype} {_shape(dims)}; this export's"
                    f" metadata implies {want_type} {_shape(want_dims)}"
                )


def _shape(dims: tuple) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"
