"""The "onnxruntime" sampler backend: ancestral sampling on an exported graph.

Two ways, one per export kind (fastddpm.export):

- `OnnxDenoiser`: a denoiser export run by onnxruntime, standing in for the U-Net in
  `fastddpm.Sampler`. The Sampler's one loop does the rest (ancestral, respaced, DDIM,
  callbacks), with fastddpm's `ddpm_step` between network calls; with the same
  generator it draws the same noise, so the images equal the PyTorch sampler's.
- `OnnxStepSampler`: a step export, whose graph holds the network, the update and the
  coefficient table; sampling is the reverse loop (fastddpm.loop) with that one graph as
  its step, drawing noise in the PyTorch sampler's order (x_T, then one z per step i > 0).

`load(path)` returns whichever the file holds. device="cpu" uses onnxruntime's CPU
provider; device="cuda" needs onnxruntime-gpu and binds torch CUDA tensors in place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import loop
from .noise import BatchNoise
from .onnx_format import OnnxExport, read_export, require
from .sampler import Sampler
from .schedule import StepTable

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"onnxruntime runs on cpu or cuda here, not {device}")
    return device


def session(path: str | os.PathLike, device: torch.device, options=None):
    """An onnxruntime InferenceSession on `device`: the CPU provider, or CUDA (onnxruntime-gpu)."""
    ort = require(
        "onnxruntime", "running ONNX exports", "pip install onnxruntime", " (onnxruntime-gpu for CUDA)"
    )
    if device.type == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ValueError(
                f"device {device} needs onnxruntime's CUDA provider, which this onnxruntime"
                f" ({ort.__version__}, providers {available}) lacks: pip install onnxruntime-gpu"
            )
        providers = [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    if options is None:
        # The sampler alternates onnxruntime (network) and torch (step): idle onnxruntime threads
        # must sleep, not spin, or they take the cores torch's threads need.
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def run_session(sess, inputs: dict[str, torch.Tensor], output: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Run `sess` on torch tensors (all on one device); returns the float32 output of `shape`.

    On CPU the tensors pass as numpy views; on CUDA they are bound in place (IO binding),
    after the current torch stream has finished writing them.
    """
    device = next(iter(inputs.values())).device
    if device.type == "cpu":
        feed = {name: t.contiguous().numpy() for name, t in inputs.items()}
        return torch.from_numpy(sess.run([output], feed)[0])
    binding = sess.io_binding()
    inputs = {name: t.contiguous() for name, t in inputs.items()}
    for name, t in inputs.items():
        binding.bind_input(name, "cuda", device.index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
    out = torch.empty(shape, dtype=torch.float32, device=device)
    binding.bind_output(output, "cuda", device.index, np.float32, tuple(shape), out.data_ptr())
    torch.cuda.current_stream(device).synchronize()
    sess.run_with_iobinding(binding)
    return out


def _run_batched(
    sess, info: OnnxExport, inputs: dict[str, torch.Tensor], output_channels: int
) -> torch.Tensor:
    """Run a graph on any batch: a static-batch graph gets chunks of its size, the last padded
    with zeros (rows are independent: normalization is per sample)."""
    n = next(iter(inputs.values())).shape[0]
    size = info.batch or n
    out = []
    for start in range(0, n, size):
        chunk = {k: v[start : start + size] for k, v in inputs.items()}
        rows = next(iter(chunk.values())).shape[0]
        if rows < size:
            chunk = {k: torch.cat([v, v.new_zeros((size - rows, *v.shape[1:]))]) for k, v in chunk.items()}
        shape = (size, output_channels, *info.image_shape()[1:])
        out.append(run_session(sess, chunk, info.outputs[0], shape)[:rows])
    return torch.cat(out)


class OnnxDenoiser:
    """eps_theta(x_t, t) from a fastddpm denoiser export, run by onnxruntime.

    Use it where a UNet goes: `fastddpm.Sampler(OnnxDenoiser("eps.onnx"), diffusion)`, or
    `fastddpm.ort.load("eps.onnx")`, which takes the diffusion config from the file.
    Called as denoiser(x (N, C, H, W), t (N,) or scalar) -> eps float32 (N, C, H, W).
    """

    def __init__(self, path: str | os.PathLike, *, device: torch.device | str = "cpu", options=None) -> None:
        self.export = read_export(path, kind="denoiser")
        self.config = self.export.unet_config
        self.device = _device(device)
        self.dtype = torch.float32  # the graph's input and output dtype, whatever the network's
        self.backend = "auto"  # the ddpm_step backend the Sampler runs between network calls
        self.session = session(path, self.device, options)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        C, H, W = self.export.image_shape()
        if x.dim() != 4 or tuple(x.shape[1:]) != (C, H, W):
            raise ValueError(f"x must have shape (N, {C}, {H}, {W}) for this export, got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but this onnxruntime session runs on {self.device}")
        t = torch.as_tensor(t, device=x.device)
        if t.dtype.is_floating_point or t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"t must be an integer scalar or (N,) tensor, got {t.dtype} {tuple(t.shape)}")
        inputs = {"x": x.float(), "t": t.long().expand(x.shape[0])}
        return _run_batched(self.session, self.export, inputs, self.config.out_channels)

    def __repr__(self) -> str:
        return f"OnnxDenoiser({str(self.export.path)!r}, device={str(self.device)!r})"


class OnnxStepSampler:
    """Ancestral sampling with a fastddpm step export: a loop around one graph.

    The steps (count, method, eta, variance, clipping) are the ones exported. With the same
    CPU generator (or x_T and generator) the draws are the PyTorch Sampler's, so the images
    are the same.
    """

    def __init__(self, path: str | os.PathLike, *, device: torch.device | str = "cpu", options=None) -> None:
        self.export = read_export(path, kind="step")
        self.config, self.diffusion = self.export.unet_config, self.export.diffusion
        self.device = _device(device)
        self.table = self.export.step.table(self.diffusion)  # the one the graph holds (read_export checks)
        self.num_steps, self.stochastic = len(self.table), self.table.stochastic
        self.timesteps = self.table.timesteps.tolist()
        self.session = session(path, self.device, options)

    def step(self, x_t: torch.Tensor, t: torch.Tensor | int, z: torch.Tensor | None = None) -> torch.Tensor:
        """One graph call: x_t float32 (N, C, H, W), step index t, noise z (zeros if None) -> x_{t-1}."""
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device).long().expand(n)
        if bool(((t < 0) | (t >= self.num_steps)).any()):
            raise ValueError(f"t out of range: this step graph has steps 0..{self.num_steps - 1}")
        z = torch.zeros_like(x_t) if z is None else z
        inputs = {"x_t": x_t.float(), "t": t, "z": z.float()}
        return _run_batched(self.session, self.export, inputs, self.config.out_channels)

    def sample(
        self,
        n: int,
        *,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """n samples in [-1, 1]: float32 (n, C, H, W) on this sampler's device."""
        return loop.sample(
            _StepGraph(self),
            self.table,
            n,
            self.export.image_shape(),
            self.device,
            clip_x0=self.export.step.clip_x0,
            batch_size=batch_size,
            generator=generator,
            x_T=x_T,
            progress=progress,
        )

    def __repr__(self) -> str:
        return f"OnnxStepSampler({str(self.export.path)!r}, device={str(self.device)!r})"


class _StepGraph:
    """The step strategy of a step export, and its own run (the loop runs one batch at a time):
    step i is one call of the graph with z drawn from the batch's noise. The graph returns x_{t-1}
    only, so a step exposes no eps (and takes no callback)."""

    def __init__(self, sampler: OnnxStepSampler) -> None:
        self.sampler = sampler

    def start(self, x_T: torch.Tensor, table: StepTable, clip_x0: bool, noise: BatchNoise) -> _StepGraph:
        self.x, self.stochastic, self.noise = x_T, table.stochastic, noise
        return self

    def step(self, i: int) -> None:
        z = self.noise.z(i, self.x) if self.stochastic else None
        self.x = self.sampler.step(self.x, i, z)


def load(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> Sampler | OnnxStepSampler:
    """A sampler for a fastddpm ONNX export: a Sampler around an OnnxDenoiser for a denoiser
    export (diffusion config from the file), an OnnxStepSampler for a step export."""
    info = read_export(Path(path), verify_graph=False)  # which kind; the sampler verifies the graph
    if info.kind == "step":
        return OnnxStepSampler(path, device=device)
    return Sampler(OnnxDenoiser(path, device=device), info.diffusion)
