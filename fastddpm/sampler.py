"""Samplers for eps-prediction DDPMs: ancestral (Algorithm 2), respaced, and DDIM.

One loop serves all three: each builds a `StepTable` (fastddpm.schedule) and runs

    x_T ~ N(0, I);  for i = S-1 .. 0:  eps = unet(x, timesteps[i]);  x = ddpm_step(x, eps, i)

Noise comes from one of two sources:
- a torch.Generator: the draws (x_T, then one z per step i > 0) come in the order
  diffusers' DDPMPipeline draws them, so the same seed gives the same images as that
  pipeline on the same weights;
- a Philox `seed` (`sample(..., seed=s)`): counter-based noise, a pure function of
  (seed, offset) on every device and backend. Batch b of a table with S steps draws
  x_T at offset b * (S + 1) and step i's z at offset b * (S + 1) + i + 1 (`noise_offset`),
  in-kernel where the backend has it, so a step needs no host RNG and can be replayed
  in a CUDA graph.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from . import config_schema, ops
from .graphs import GraphRunner
from .precision import Precision
from .reference import philox_normal, predict_x0
from .schedule import VARIANCES, Schedule, StepTable
from .unet import UNet

METHODS = ("ddpm", "ddim")

# A respacing string: "ddim50", or section counts "10,20,30" (fastddpm.schedule.space_timesteps).
SPACING = re.compile(r"ddim[1-9][0-9]*|[1-9][0-9]*(,[1-9][0-9]*)*")


class NonFiniteSamplesError(ValueError):
    """A batch of samples holds NaN or Inf: the model or the schedule is broken."""


def check_steps(steps: object) -> int | str | None:
    """`steps` as Sampler.sample takes it: None, a positive int, or a spacing string; else a ValueError."""
    if steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        return steps
    if isinstance(steps, str) and SPACING.fullmatch(steps):
        return int(steps) if steps.isdigit() else steps
    raise ValueError(
        f"steps must be None (all T), a positive int, or a spacing like '10,20' or 'ddim50', got {steps!r}"
    )


def check_eta(eta: object, method: str) -> float:
    """DDIM's eta: a finite number >= 0, and nonzero only with method 'ddim'; else a ValueError."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if eta != 0 and method != "ddim":
        raise ValueError(f"eta applies to method 'ddim' (--sampler ddim), not {method!r}; got eta={eta}")
    return float(eta)


def check_count(name: str, value: object) -> int:
    """A positive int (not a bool), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# callback(step_index, t, x_t, x0_pred): x_t and x0_pred are float32 (N, C, H, W).
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and how to sample it: beta schedule, variance, clipping."""

    beta_schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: str = "fixedlarge"
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; choose one of {', '.join(VARIANCES)}")
        config_schema.check_diffusion(asdict(self), "DiffusionConfig")  # types and ranges, as loaders
        self.schedule()  # rejects an unknown schedule name now, not at sampling time

    def schedule(self) -> Schedule:
        return Schedule.from_name(self.beta_schedule, self.num_timesteps, self.beta_start, self.beta_end)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown diffusion config keys: {sorted(unknown)}")
        return cls(**d)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 N(0, I) drawn on the generator's device (as diffusers does), then moved to `device`."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def noise_offset(batch_index: int, num_steps: int, step_index: int | None = None) -> int:
    """The Philox offset of batch `batch_index`'s x_T (step_index None) or of step i's z."""
    base = batch_index * (num_steps + 1)
    return base if step_index is None else base + step_index + 1


def placement(unet: UNet) -> tuple[torch.device, torch.dtype]:
    """The device and input dtype of a denoiser: its first parameter's, or, for one that is not a
    torch module (fastddpm.ort.OnnxDenoiser), its `device` and `dtype` attributes."""
    if isinstance(unet, torch.nn.Module):
        p = next(unet.parameters())
        return p.device, p.dtype
    return torch.device(unet.device), unet.dtype


class Sampler:
    """A U-Net and its diffusion, ready to sample: `Sampler(unet, diffusion).sample(16)`.

    precision: None (default) runs the network in its own dtype; "fp32", "tf32", "fp16" or
    "bf16" converts it IN PLACE to that mode's dtype (see fastddpm.precision), so
    `sampler.unet` is the caller's module, converted. channels_last=True converts its
    convolution weights in place to channels_last and feeds it NHWC-strided inputs. In every
    mode x_t stays float32 and the reverse step runs in float32. compile=True runs the network
    through `torch.compile(unet, fullgraph=True)` (Inductor; the first call of each batch size
    compiles, minutes on a CPU); `sampler.unet` stays the eager module.

    cuda_graph: on CUDA, run each batch by replaying one captured step (fastddpm.graphs): None
    (default) where possible, True to ask for it (a one-line notice where it falls back to
    eager), False never. Replays need seeded noise (`sample(seed=...)`) for steps that add noise.
    """

    def __init__(
        self,
        unet: UNet,
        diffusion: DiffusionConfig | None = None,
        *,
        precision: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        cuda_graph: bool | None = None,
    ) -> None:
        self.precision = Precision(precision, channels_last)
        self.unet = self.precision.apply(unet)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be a bool, got {compile!r}")
        if compile and not isinstance(unet, torch.nn.Module):
            raise ValueError(f"compile=True compiles a torch module; {type(unet).__name__} is not one")
        self.network = torch.compile(unet, fullgraph=True) if compile else unet
        self.diffusion = diffusion or DiffusionConfig()
        self.cuda_graph = cuda_graph

    @property
    def cuda_graph(self) -> bool | None:
        """None (graphs where possible), True (asked for) or False (never); see the class docstring."""
        return self._cuda_graph

    @cuda_graph.setter
    def cuda_graph(self, value: bool | None) -> None:
        if not (value is None or isinstance(value, bool)):
            raise ValueError(f"cuda_graph must be None (where possible), True or False, got {value!r}")
        self._cuda_graph = value
        self.graph_runner = None if value is False else GraphRunner(self, requested=value)

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's eps (N, C, H, W) float32 for x_t (N, C, H, W) float32 at timesteps t (N,)."""
        return self.network(self.precision.network_input(x, placement(self.unet)[1]), t).float()

    def step_table(
        self,
        steps: int | str | None = None,
        method: str = "ddpm",
        eta: float = 0.0,
        variance: str | None = None,
    ) -> StepTable:
        """The table for `steps` (None: all T; int or spacing string: respaced) on the U-Net's device."""
        if method not in METHODS:
            raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
        steps = check_steps(steps)
        eta = check_eta(eta, method)
        schedule = self.diffusion.schedule()
        if steps is not None and steps != len(schedule):
            schedule = schedule.respace(steps)
        device = placement(self.unet)[0]
        return schedule.step_table(method, variance or self.diffusion.variance, eta, device=device)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        steps: int | str | None = None,
        method: str = "ddpm",
        eta: float = 0.0,
        variance: str | None = None,
        clip_x0: bool | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        x_T: torch.Tensor | None = None,
        start_step: int | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
        callback_every: int = 100,
    ) -> torch.Tensor:
        """n samples in [-1, 1]: float32 (n, C, H, W) on the U-Net's device.

        steps: None for all T steps; an int S < T or an Improved-DDPM spacing string
        ("10,20", "ddim50") to respace. method: "ddpm" (ancestral) or "ddim" (with eta).
        variance, clip_x0: override the diffusion config's. Noise: from `generator`
        (DDPMPipeline's order; default torch's global CPU generator) or from Philox
        `seed` (see the module docstring); not both. x_T: the starting noise
        (n, C, H, W), else drawn from that source. start_step: the step index i to start
        the reverse process at (default S-1, the whole chain); it needs x_T, then the x_t
        at that step (e.g. a sample of q(x_t | x_0)). callback(i, t, x_t, x0_pred) runs
        every `callback_every` steps and at the last one.
        """
        check_count("n", n)
        batch_size = n if batch_size is None else check_count("batch_size", batch_size)
        check_count("callback_every", callback_every)
        if seed is not None:
            if generator is not None:
                raise ValueError("pass at most one of generator= and seed=")
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        table = self.step_table(steps, method, eta, variance)
        if start_step is not None:
            if x_T is None:
                raise ValueError("start_step needs x_T: the x_t to start the reverse process from")
            S = len(table)
            if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < S:
                raise ValueError(f"start_step must be an int in [0, {S - 1}], got {start_step!r}")
            # Steps start_step..0 keep their rows: the loop over the shortened table is the chain's tail.
            keep = slice(start_step + 1)
            table = StepTable(table.coef[keep], table.timesteps[keep], table.stochastic)
        clip_x0 = self.diffusion.clip_x0 if clip_x0 is None else clip_x0
        cfg = self.unet.config
        device = table.coef.device
        self.precision.check_device(device)
        shape = (n, cfg.in_channels, cfg.resolution, cfg.resolution)
        if x_T is not None and tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")

        out = []
        with tqdm(total=len(table) * -(-n // batch_size), disable=not progress, unit="step") as bar:
            for b, start in enumerate(range(0, n, batch_size)):
                size = min(batch_size, n - start)
                noise = generator if seed is None else (seed, b)
                if x_T is not None:
                    x = x_T[start : start + size].to(device, torch.float32)
                elif seed is None:
                    x = randn((size, *shape[1:]), generator, device)
                else:
                    x = philox_normal(seed, noise_offset(b, len(table)), (size, *shape[1:]), device)
                with self.precision.scope(device):
                    x0 = self._reverse(x, table, clip_x0, noise, bar, callback, callback_every)
                _check_finite(x0, b, start)
                out.append(x0)
        return torch.cat(out)

    def _reverse(
        self,
        x: torch.Tensor,
        table: StepTable,
        clip_x0: bool,
        noise_source: torch.Generator | tuple[int, int] | None,
        bar: tqdm,
        callback: StepCallback | None,
        callback_every: int,
    ) -> torch.Tensor:
        """Run every step of `table` from x = x_T (N, C, H, W) float32; returns x_0.

        noise_source: a generator (or None: torch's global one), or (seed, batch index)
        for in-kernel Philox noise. On CUDA the graph runner replays a captured step instead."""
        if self.graph_runner is not None:
            x0 = self.graph_runner.reverse(x, table, clip_x0, noise_source, bar, callback, callback_every)
            if x0 is not None:
                return x0
        for i in reversed(range(len(table))):
            t = table.timesteps[i]
            eps = self.predict_eps(x, t.expand(x.shape[0]))
            noise = {}
            if table.stochastic and isinstance(noise_source, tuple):
                seed, b = noise_source
                noise = {"seed": seed, "offset": noise_offset(b, len(table), i)}
            elif table.stochastic:
                noise = {"noise": randn(x.shape, noise_source, x.device) if i > 0 else torch.zeros_like(x)}
            if callback is not None and (i % callback_every == 0):
                callback(i, int(t), x, predict_x0(x, eps, i, table, clip_x0))
            x = ops.ddpm_step(x, eps, i, table, clip_x0=clip_x0, backend=self.unet.backend, **noise)
            bar.update(1)
        return x


def _check_finite(x0: torch.Tensor, b: int, start: int) -> None:
    """Raise NonFiniteSamplesError if batch b's samples x0 (k, C, H, W), images start.., hold NaN or Inf:
    one reduction and one host sync per batch."""
    if not bool(torch.isfinite(x0).all()):
        kind = "NaN" if bool(torch.isnan(x0).any()) else "Inf"
        raise NonFiniteSamplesError(
            f"batch {b} (images {start}..{start + x0.shape[0] - 1}) produced non-finite values ({kind});"
            " the model or the schedule is broken"
        )
