"""The sampler: a denoiser and its diffusion, ready to sample; ancestral (Algorithm 2), respaced, DDIM.

Each builds a `StepTable` (fastddpm.schedule.step_table) and runs the reverse loop
(fastddpm.loop) over it with a step strategy: eager steps, or CUDA graph replays
(fastddpm.graphs). Noise comes from a torch.Generator (diffusers' DDPMPipeline's order) or from
a Philox `seed` (fastddpm.noise).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import torch

from . import loop
from .graphs import GraphRunner
from .loop import Denoiser, StepCallback, StepStrategy
from .precision import Precision
from .schedule import METHODS, DiffusionConfig, StepTable, check_eta, step_coefficients, step_table
from .solver_table import SolverTable
from .solvers import SOLVERS, solver_table
from .solvers.ddim import ddim_eps_table
from .solvers.steps import Eager
from .unet import UNet, UNetConfig

__all__ = ["SAMPLERS", "Sampler", "TorchDenoiser"]

SAMPLERS = (*METHODS, *SOLVERS)  # every `method` Sampler.sample takes


def check_clipped_model_output(value: object, method: str) -> None:
    """use_clipped_model_output: a bool, and True only with method 'ddim'; else a ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"use_clipped_model_output must be a bool, got {value!r}")
    if value and method != "ddim":
        raise ValueError(f"use_clipped_model_output applies to method 'ddim', not {method!r}")


class TorchDenoiser:
    """A torch eps-network (the U-Net, or any module with its `config` and `backend`) as a
    fastddpm.loop.Denoiser, under the sampler's precision policy.

    `network` is what runs (the module, or `torch.compile` of it); x_t goes in in the module's
    dtype and the precision's memory format, eps comes out float32. Device and dtype are the first
    parameter's, read at each access: the module may be moved or converted after this is built.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        precision: Precision,
    ) -> None:
        self.module, self.network, self.precision = module, network, precision

    @property
    def config(self) -> UNetConfig:
        return self.module.config

    @property
    def backend(self) -> str:
        return self.module.backend

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def weights(self) -> tuple:
        """What a captured call bakes in of the module: train/eval mode, each parameter's and
        buffer's address, dtype and strides, and the generation of the tensors the U-Net derives
        from them (fastddpm.folds: refreshed in place while their addresses hold)."""
        m = self.module
        folds = getattr(m, "_folds", None)
        return (m.training, None if folds is None else folds.generation) + tuple(
            (t.data_ptr(), t.dtype, t.stride()) for t in (*m.parameters(), *m.buffers())
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(self.precision.network_input(x, self.dtype), t).float()


class Sampler:
    """A U-Net and its diffusion, ready to sample: `Sampler(unet, diffusion).sample(16)`.

    unet: a torch eps-network (fastddpm.UNet), or a Denoiser that is not a torch module
    (fastddpm.ort.OnnxDenoiser, fastddpm.trt.TensorRTDenoiser).

    precision: None (default) runs the network in its own dtype; "fp32", "tf32", "fp16" or
    "bf16" converts it IN PLACE to that mode's dtype (see fastddpm.precision), so
    `sampler.unet` is the caller's module, converted; "auto" picks the fastest of those that the
    network's device runs natively, now (fastddpm.precision.auto_mode; `sampler.precision.mode`
    says which). channels_last=True converts its
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
        unet: UNet | Denoiser,
        diffusion: DiffusionConfig | None = None,
        *,
        precision: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        cuda_graph: bool | None = None,
    ) -> None:
        is_module = isinstance(unet, torch.nn.Module)
        device = next(unet.parameters()).device if is_module else torch.device(unet.device)
        self.precision = Precision(precision, channels_last).resolved(device)
        self.unet = self.precision.apply(unet)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be a bool, got {compile!r}")
        if compile and not is_module:
            raise ValueError(f"compile=True compiles a torch module; {type(unet).__name__} is not one")
        self.network = torch.compile(unet, fullgraph=True) if compile else unet
        self.denoiser: Denoiser = TorchDenoiser(unet, self.network, self.precision) if is_module else unet
        self._weights = self.denoiser.weights if is_module else tuple  # what a CUDA graph bakes in
        self.eager = Eager(self.denoiser)
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
        self.graph_runner = (
            None if value is False else GraphRunner(self.denoiser, self._weights, requested=value)
        )

    @property
    def strategy(self) -> StepStrategy:
        """How each step runs: the graph runner (which falls back to eager steps), or eager steps
        (fastddpm.solvers.steps.Eager: EagerSteps, or SolverSteps for a solver's table)."""
        return self.graph_runner or self.eager

    def frozen(self) -> AbstractContextManager:
        """A scope that holds the network's weights constant: its forwards without gradients reuse
        the tensors the U-Net derives from them (fastddpm.folds), recomputed on entry. sample()
        runs inside one; a loop of predict_eps calls may too."""
        folds = getattr(self.unet, "_folds", None)
        return nullcontext() if folds is None else folds.frozen(self.unet)

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's eps (N, C, H, W) float32 for x_t (N, C, H, W) float32 at timesteps t (N,)."""
        return self.denoiser(x, t)

    def step_table(
        self,
        steps: int | str | None = None,
        method: str = "ddpm",
        eta: float = 0.0,
        variance: str | None = None,
        spacing: str | None = None,
        model_eps: bool = False,
    ) -> StepTable | SolverTable:
        """The table for `steps` (None: all T; int or spacing string: respaced) on the denoiser's
        device; `spacing` (one of schedule.SPACINGS) overrides the diffusion config's. A solver
        (fastddpm.solvers.SOLVERS) needs an int `steps` and takes no eta or variance.
        model_eps (method ddim): DDIM with the network's eps in the direction term
        (fastddpm.solvers.ddim), a SolverTable."""
        diffusion = self.diffusion if spacing is None else replace(self.diffusion, spacing=spacing)
        if method in SOLVERS:
            check_eta(eta, method)
            if variance is not None:
                raise ValueError(f"variance applies to methods ddpm and ddim, not the {method} solver")
            return solver_table(method, diffusion, steps, self.denoiser.device)
        if method not in METHODS:
            raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(SAMPLERS)}")
        if model_eps and method == "ddim":
            coef = step_coefficients(diffusion, steps, method, eta, variance)
            return ddim_eps_table(*coef, device=self.denoiser.device)
        return step_table(diffusion, steps, method, eta, variance, self.denoiser.device)

    def sample(
        self,
        n: int,
        *,
        steps: int | str | None = None,
        method: str = "ddpm",
        eta: float = 0.0,
        variance: str | None = None,
        spacing: str | None = None,
        clip_x0: bool | None = None,
        use_clipped_model_output: bool = False,
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

        steps: None for all T steps; an int S < T, respaced by the diffusion config's spacing
        (a diffusers folder: its scheduler's timestep_spacing, so the images are its pipeline's;
        fastddpm's own checkpoints: Improved DDPM's rule), or an Improved-DDPM spacing string
        ("10,20", "ddim50"). method: "ddpm" (ancestral), "ddim" (with eta), or a few-step
        solver of fastddpm.solvers (SOLVERS: "dpmpp-2m", "unipc", "euler", ...; an int `steps`,
        equal to that diffusers scheduler's steps, not clipping x0 unless clip_x0=True). variance,
        spacing ("improved", "leading", "trailing", "linspace"), clip_x0: override the config's.
        use_clipped_model_output (method ddim, as diffusers' DDIMPipeline takes it): the direction
        term uses eps re-derived from the clipped x0 (the fused DDPM step's form, graph-captured);
        False (default, diffusers' default) keeps the network's eps (fastddpm.solvers.ddim).
        Noise: from `generator` (DDPMPipeline's order; default torch's global CPU generator) or
        from Philox `seed` (fastddpm.noise); not both. x_T: the starting noise (n, C, H, W), else
        drawn from that source. start_step: the step index i to start the reverse process
        at (default S-1, the whole chain); it needs x_T, then the x_t at that step (e.g. a
        sample of q(x_t | x_0)). callback(i, t, x_t, x0_pred) runs every `callback_every`
        steps and at the last one.
        """
        check_clipped_model_output(use_clipped_model_output, method)
        if clip_x0 is None:  # diffusers' solvers do not clip x0 (without thresholding)
            clip_x0 = False if method in SOLVERS else self.diffusion.clip_x0
        model_eps = method == "ddim" and clip_x0 and not use_clipped_model_output
        table = self.step_table(steps, method, eta, variance, spacing, model_eps=model_eps)
        device = self.denoiser.device
        self.precision.check_device(device)
        cfg = self.denoiser.config
        with self.frozen():
            return loop.sample(
                self.strategy,
                table,
                n,
                (cfg.in_channels, cfg.resolution, cfg.resolution),
                device,
                clip_x0=clip_x0,
                batch_size=batch_size,
                generator=generator,
                seed=seed,
                x_T=x_T,
                start_step=start_step,
                progress=progress,
                callback=callback,
                callback_every=callback_every,
                scope=self.precision.scope,
            )
