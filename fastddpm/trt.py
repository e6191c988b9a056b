"""TensorRT: an engine built from a fastddpm denoiser export, and a sampler that runs it.

Written against the TensorRT 10 Python API; `tensorrt` is imported only when needed, and
without it every entry point raises TensorRTUnavailableError saying how to install it.
CI has no GPU and no TensorRT: none of this runs there (tests/test_tensorrt.py skips).

Precision: the network is built strongly typed, so every layer runs in the type the ONNX
graph gives it. Export with dtype="float16" for an fp16 engine: its casts keep GroupNorm
statistics (InstanceNormalization -> TensorRT's normalization layer), the attention
softmax and the timestep embedding in float32; a float32 export gives a float32 engine.

Engine files: b"FDDPMTRT", a little-endian uint32 header length, a JSON header (TensorRT
version, GPU name and compute capability, the export's fastddpm metadata, the batch
profile), then TensorRT's serialized engine. The header is checked before TensorRT sees
the engine, so an engine built for another GPU or TensorRT version fails with an error
that says which, rather than TensorRT's deserialization failure.

Sampling (`TensorRTSampler`): the reverse loop (fastddpm.loop) with `TensorRTSteps` as its
step strategy. One reverse step, the engine's execute_async_v3 then fastddpm's fused
`ops.ddpm_step` (backend "auto": the CUDA or Triton kernel where built), is captured in a
CUDA graph per batch size and replayed once per step. The step index and the noise live in
device buffers the graph reads: the index is written before each replay, and z is drawn
inside the graph from a CUDA generator registered with it, so every replay gets fresh noise.
(A seed= step would bake one Philox (seed, offset) into the graph, and every replay would
reuse the same z.)
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import config_schema as schema
from . import ops
from .io import atomic_write
from .noise import BatchNoise
from .onnx_format import (
    ExportError,
    MissingPackageError,
    OnnxExport,
    info_from_metadata,
    read_export,
    require,
)
from .sampler import Sampler
from .schedule import StepTable

ENGINE_MAGIC = b"FDDPMTRT"
ENGINE_FORMAT = "fastddpm-trt-1"
INSTALL_NOTE = (
    " (NVIDIA's wheels, which fetch TensorRT's libraries from NVIDIA's package index at install time;"
    " TensorRT also needs a CUDA GPU)"
)


class TensorRTUnavailableError(MissingPackageError):
    """TensorRT (or the CUDA GPU it needs) is not available here."""


class EngineMismatchError(ValueError):
    """An engine file built for another GPU or TensorRT version, or not a fastddpm engine at all."""


def require_tensorrt():
    """The tensorrt module (version 10 or newer), or TensorRTUnavailableError saying how to get it."""
    try:
        trt = require("tensorrt", "the TensorRT path", "pip install tensorrt", INSTALL_NOTE)
    except MissingPackageError as err:
        raise TensorRTUnavailableError(str(err)) from err
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailableError(f"fastddpm needs TensorRT 10 or newer, found {trt.__version__}")
    return trt


def _require_gpu(device: torch.device | str | None) -> torch.device:
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("TensorRT needs a CUDA GPU, and torch sees none here")
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        raise ValueError(f"TensorRT runs on a CUDA device, not {device}")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


_LOGGER = None


def _logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


# --- the engine file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineHeader:
    """What an engine file says about itself; checked before deserializing."""

    tensorrt: str
    gpu: str
    compute_capability: tuple[int, int]
    export: dict[str, str]  # the ONNX export's fastddpm metadata
    min_batch: int
    opt_batch: int
    max_batch: int
    format: str = ENGINE_FORMAT

    def info(self) -> OnnxExport:
        return info_from_metadata(self.export)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "engine header") -> EngineHeader:
        """The header's JSON, every field's type checked (config_schema); ValueError naming it."""
        d = schema.check(_HEADER_FIELDS, schema.json_object(data.decode("utf-8"), source), source)
        if len(d["compute_capability"]) != 2:
            raise schema.ConfigError(f"{source}: compute_capability must be two ints")
        if not isinstance(d["export"], dict) or not all(isinstance(v, str) for v in d["export"].values()):
            raise schema.ConfigError(f"{source}: export must map metadata names to strings")
        if not d["min_batch"] <= d["opt_batch"] <= d["max_batch"]:
            raise schema.ConfigError(f"{source}: batches must satisfy min_batch <= opt_batch <= max_batch")
        return cls(**d)


_HEADER_FIELDS = {
    "tensorrt": schema.Field("str"),
    "gpu": schema.Field("str"),
    "compute_capability": schema.Field("ints", 0, 1000),
    "export": schema.Field("json"),
    "min_batch": schema.Field("int", 1, 2**20),
    "opt_batch": schema.Field("int", 1, 2**20),
    "max_batch": schema.Field("int", 1, 2**20),
    "format": schema.Field("str"),
}


def write_engine(path: str | os.PathLike, header: EngineHeader, engine: bytes) -> None:
    head = header.to_bytes()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(ENGINE_MAGIC + struct.pack("<I", len(head)) + head)
            f.write(engine)

    atomic_write(path, write)


def read_engine(path: str | os.PathLike) -> tuple[EngineHeader, bytes]:
    """The header and TensorRT's serialized engine; EngineMismatchError if not a fastddpm engine file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such engine file: {path}")
    data = path.read_bytes()
    if not data.startswith(ENGINE_MAGIC) or len(data) < len(ENGINE_MAGIC) + 4:
        raise EngineMismatchError(
            f"{path} is not a fastddpm TensorRT engine (no {ENGINE_MAGIC.decode()} header); build one with"
            " `fastddpm export trt`"
        )
    (size,) = struct.unpack_from("<I", data, len(ENGINE_MAGIC))
    start = len(ENGINE_MAGIC) + 4
    try:
        header = EngineHeader.from_bytes(data[start : start + size], f"{path}: engine header")
    except ValueError as err:  # ConfigError, and UnicodeDecodeError
        raise EngineMismatchError(f"{path}: unreadable fastddpm engine header: {err}") from None
    if header.format != ENGINE_FORMAT:
        raise EngineMismatchError(
            f"{path}: engine format {header.format!r}; this fastddpm reads {ENGINE_FORMAT!r}"
        )
    return header, data[start + size :]


def check_compatible(
    header: EngineHeader,
    *,
    tensorrt: str,
    gpu: str,
    compute_capability: tuple[int, int],
    path: str = "engine",
) -> list[str]:
    """Raise EngineMismatchError if the engine cannot run with this TensorRT version and GPU.

    TensorRT engines are specific to the TensorRT version and the GPU architecture. Another
    GPU of the same compute capability can run it (TensorRT warns, as this returns: a list
    of warnings) though its tactics were timed elsewhere.
    """
    built = f"TensorRT {header.tensorrt} on {header.gpu} (sm_{''.join(map(str, header.compute_capability))})"
    here = f"TensorRT {tensorrt} on {gpu} (sm_{''.join(map(str, compute_capability))})"
    if header.tensorrt != tensorrt or tuple(header.compute_capability) != tuple(compute_capability):
        what = "TensorRT version" if header.tensorrt != tensorrt else "GPU architecture"
        raise EngineMismatchError(
            f"{path} was built with {built}, but this is {here}: a TensorRT engine runs only with the"
            f" TensorRT version and GPU architecture it was built for ({what} differs); rebuild it here"
            " with `fastddpm export trt` from the ONNX export"
        )
    if header.gpu != gpu:
        return [f"{path} was built on {header.gpu} and runs on {gpu}; rebuild it here for the best tactics"]
    return []


def _gpu(device: torch.device) -> tuple[str, tuple[int, int]]:
    return torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))


# --- building ----------------------------------------------------------------------------------


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    workspace_gib: float | None = None,
    device: torch.device | str | None = None,
) -> EngineHeader:
    """Build a TensorRT engine from a fastddpm denoiser export and write it to `engine_path`.

    The network is strongly typed (precision as the ONNX graph's types say). A dynamic-batch
    export gets one optimization profile over batch: min_batch <= opt_batch <= max_batch
    (max default 64, opt default max); a static-batch export is built for its batch.
    timing_cache: a file read before building (if present) and written after, so rebuilds
    skip tactic timing.
    """
    trt = require_tensorrt()
    info = read_export(onnx_path, kind="denoiser")
    if info.batch is not None:
        asked = [b for b in (opt_batch, max_batch) if b is not None] + ([min_batch] if min_batch != 1 else [])
        if any(b != info.batch for b in asked):
            raise ValueError(
                f"{onnx_path} has a static batch of {info.batch};"
                " export it with a dynamic batch for a batch profile"
            )
        min_batch = opt_batch = max_batch = info.batch
    else:
        max_batch = max_batch or max(64, min_batch)
        opt_batch = opt_batch or max_batch
        if not 1 <= min_batch <= opt_batch <= max_batch:
            raise ValueError(
                "the batch profile must satisfy 1 <= min <= opt <= max,"
                f" got {min_batch}, {opt_batch}, {max_batch}"
            )
    device = _require_gpu(device)
    logger = _logger(trt)
    with torch.cuda.device(device):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        if info.batch is None:
            C, H, W = info.image_shape()
            profile = builder.create_optimization_profile()
            profile.set_shape("x", (min_batch, C, H, W), (opt_batch, C, H, W), (max_batch, C, H, W))
            profile.set_shape("t", (min_batch,), (opt_batch,), (max_batch,))
            config.add_optimization_profile(profile)
        cache_file = Path(timing_cache) if timing_cache is not None else None
        cache = config.create_timing_cache(
            cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
        )
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            # a cache from another TensorRT version or GPU: time afresh, and overwrite it below
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(
                f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see its log)"
            )
        if cache_file is not None:
            data = bytes(memoryview(config.get_timing_cache().serialize()))
            atomic_write(cache_file, lambda tmp: Path(tmp).write_bytes(data))
        gpu, capability = _gpu(device)
    header = EngineHeader(trt.__version__, gpu, capability, info.metadata(), min_batch, opt_batch, max_batch)
    write_engine(engine_path, header, bytes(memoryview(serialized)))
    return header


# --- running -----------------------------------------------------------------------------------


class TensorRTDenoiser:
    """eps_theta(x_t, t) run by a fastddpm TensorRT engine; stands in for the U-Net in a Sampler.

    Called as denoiser(x (N, C, H, W), t (N,) or scalar) -> eps float32 (N, C, H, W), on
    the current CUDA stream, for N within the engine's batch profile.
    """

    def __init__(self, engine_path: str | os.PathLike, *, device: torch.device | str | None = None) -> None:
        self.header, serialized = read_engine(engine_path)  # first: no TensorRT needed to reject a file
        trt = require_tensorrt()
        self.device = _require_gpu(device)
        gpu, capability = _gpu(self.device)
        self.warnings = check_compatible(
            self.header,
            tensorrt=trt.__version__,
            gpu=gpu,
            compute_capability=capability,
            path=str(engine_path),
        )
        self.export = self.header.info()
        self.config = self.export.unet_config
        self.dtype = torch.float32  # the engine's x and eps, whatever precision runs inside
        self.backend = "auto"  # ops.ddpm_step's backend between network calls
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(_logger(trt))
            self.engine = self.runtime.deserialize_cuda_engine(serialized)
            if self.engine is None:
                raise EngineMismatchError(
                    f"TensorRT {trt.__version__} could not deserialize {engine_path} on {gpu}, although its"
                    f" header says it was built with TensorRT {self.header.tensorrt} on {self.header.gpu};"
                    " rebuild it with `fastddpm export trt`"
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if sorted(inputs) != sorted(self.export.inputs) or sorted(names) != sorted(
            self.export.inputs + self.export.outputs
        ):
            raise EngineMismatchError(f"{engine_path}: engine tensors {names} are not a fastddpm denoiser's")
        torch_types = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
        }
        self.io_dtypes = {n: torch_types[self.engine.get_tensor_dtype(n)] for n in names}

    def check_batch(self, n: int) -> None:
        h = self.header
        if not h.min_batch <= n <= h.max_batch:
            raise ValueError(
                f"batch {n} is outside this engine's profile [{h.min_batch}, {h.max_batch}]:"
                " sample with a batch_size inside it, or rebuild with other --min-batch/--max-batch"
            )

    def enqueue(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Run the engine on contiguous device buffers of its I/O dtypes, asynchronously on `stream`."""
        for name, tensor in (("x", x), ("t", t)):
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"the engine rejects input {name} of shape {tuple(tensor.shape)}")
        for name, tensor in (("x", x), ("t", t), ("eps", eps)):
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT's execute_async_v3 failed (see TensorRT's log)")

    def __call__(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        n = x.shape[0]
        self.check_batch(n)
        x = x.to(self.device, self.io_dtypes["x"]).contiguous()
        t = torch.as_tensor(t, device=self.device).to(self.io_dtypes["t"]).expand(n).contiguous()
        eps = torch.empty(
            (n, self.config.out_channels, *x.shape[2:]), dtype=self.io_dtypes["eps"], device=self.device
        )
        self.enqueue(x, t, eps, torch.cuda.current_stream(self.device))
        return eps.float()


class _GraphedStep:
    """One reverse step at batch n, captured in a CUDA graph: x <- ddpm_step(x, engine(x, t), i, z).
    A StepRun of the reverse loop: `x` is the graph's x_t buffer, `step(i)` one replay."""

    def __init__(
        self, den: TensorRTDenoiser, table: StepTable, clip_x0: bool, n: int, noise: torch.Generator
    ) -> None:
        dev, (C, H, W) = den.device, den.export.image_shape()
        self.den, self.table, self.clip_x0, self.noise = den, table, clip_x0, noise
        self.x = torch.zeros((n, C, H, W), dtype=torch.float32, device=dev)  # x_t, float32 between steps
        self.x_in = torch.zeros_like(self.x, dtype=den.io_dtypes["x"])
        self.t_in = torch.zeros((n,), dtype=den.io_dtypes["t"], device=dev)
        self.eps = torch.zeros((n, den.config.out_channels, H, W), dtype=den.io_dtypes["eps"], device=dev)
        self.z = torch.zeros_like(self.x)
        self.i = torch.zeros((1,), dtype=torch.long, device=dev)  # the step index, written before each replay
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # TensorRT's and the allocator's first-run work stays out of the graph
                self._step(stream)
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph.register_generator_state(noise)
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            self._step(stream)

    def _step(self, stream: torch.cuda.Stream) -> None:
        self.x_in.copy_(self.x)
        self.t_in.copy_(self.table.timesteps.index_select(0, self.i).expand_as(self.t_in))
        self.den.enqueue(self.x_in, self.t_in, self.eps, stream)
        if self.table.stochastic:
            self.z.normal_(generator=self.noise)
        x_prev = ops.ddpm_step(
            self.x, self.eps.float(), self.i, self.table, noise=self.z, clip_x0=self.clip_x0, backend="auto"
        )
        self.x.copy_(x_prev)

    def step(self, i: int) -> torch.Tensor:
        """Step index i, one replay; returns the engine's eps buffer (its I/O dtype)."""
        self.i.fill_(i)
        self.graph.replay()
        return self.eps


class TensorRTSteps:
    """The step strategy of a TensorRT engine: one CUDA graph replay per step (see the module
    docstring), a graph per batch size and clip_x0 for the table it was captured with."""

    def __init__(self, denoiser: TensorRTDenoiser) -> None:
        self.denoiser = denoiser
        self.noise = torch.Generator(device=denoiser.device)
        self.graphs: dict[tuple[int, bool], _GraphedStep] = {}
        self.table: StepTable | None = None

    def start(self, x_T: torch.Tensor, table: StepTable, clip_x0: bool, noise: BatchNoise) -> _GraphedStep:
        if noise.philox:
            raise ValueError(
                "the TensorRT sampler draws its noise from a CUDA generator seeded from generator=; not seed="
            )
        self.denoiser.check_batch(x_T.shape[0])
        if table is not self.table:  # a graph reads the table it was captured with
            self.graphs.clear()
            self.table = table
        key = (x_T.shape[0], clip_x0)
        if key not in self.graphs:
            self.graphs[key] = _GraphedStep(self.denoiser, table, clip_x0, x_T.shape[0], self.noise)
        step = self.graphs[key]
        generator = noise.generator
        source = generator.device if generator is not None else torch.device("cpu")
        self.noise.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=source)))
        step.x.copy_(x_T)
        return step


class TensorRTSampler(Sampler):
    """Sampling with a fastddpm TensorRT engine, each step one CUDA graph replay.

    `TensorRTSampler("eps.engine").sample(n, steps=..., method=..., generator=...)` takes
    Sampler.sample's arguments except seed. x_T comes from `generator` as in the PyTorch
    sampler; the per-step noise from a CUDA generator seeded from it.
    """

    def __init__(self, engine_path: str | os.PathLike, *, device: torch.device | str | None = None) -> None:
        denoiser = TensorRTDenoiser(engine_path, device=device)
        super().__init__(denoiser, denoiser.export.diffusion)
        self.engine_steps = TensorRTSteps(denoiser)

    @property
    def strategy(self) -> TensorRTSteps:
        return self.engine_steps
