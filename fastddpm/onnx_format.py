"""The fastddpm ONNX format: what an export file holds and the reader that checks a file is one.

Two kinds of graph, both with float32 inputs and outputs whatever the network's dtype:

    denoiser   x (N, C, H, W) float32, t (N,) int64 timestep      -> eps (N, C, H, W)
    step       x_t (N, C, H, W), t (N,) int64 step index, z (N, C, H, W) noise
                                                                  -> x_prev (N, C, H, W)

Every file carries metadata (`metadata_props`) naming it a fastddpm export of a kind, with
the U-Net and diffusion configs and a SHA-256 fingerprint of the graph (its nodes and its
weights, `graph_sha256`). `read_export` checks them before anything runs it: the configs
through fastddpm.config_schema, the graph's inputs and outputs, the fingerprint (flipped
weight bytes, or another graph under copied metadata, are refused), and for a step export
the step table inside the graph against the one its metadata's steps and method give.
fastddpm.export writes these files; fastddpm.ort and fastddpm.trt read them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from . import config_schema as schema
from . import ops
from ._version import __version__
from .checkpoints import diffusion_config_from_dict
from .schedule import METHODS, DiffusionConfig, StepTable, step_table
from .unet import UNetConfig

FORMAT = "fastddpm-onnx-1"
DEFAULT_OPSET = 18
MIN_OPSET = 18
KINDS = ("denoiser", "step")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Graph inputs and outputs of each kind, in order.
INPUTS = {"denoiser": ("x", "t"), "step": ("x_t", "t", "z")}
OUTPUTS = {"denoiser": ("eps",), "step": ("x_prev",)}


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
    """The reverse steps a step graph holds: as `schedule.step_table` takes them."""

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
        return step_table(diffusion, self.steps, self.method, self.eta, self.variance, device)


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


def export_failure(err: Exception) -> str:
    """The innermost cause of an exporter error, in one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


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
        raise ExportError(f"{path} is not an ONNX model: {export_failure(err)}") from err
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
            raise ExportError(f"{path}: its weights cannot be read: {export_failure(err)}") from err
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
