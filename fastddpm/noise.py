"""The sampler's noise: x_T and each step's z, from a torch.Generator or from counter-based Philox.

Two sources:
- a torch.Generator (None: torch's global CPU one): the draws (x_T, then one z per step i > 0,
  and at i = 0 where the table's `final_draw` says diffusers' scheduler draws there too) come in
  the order diffusers' pipelines draw them, so the same seed gives the same images as that
  pipeline on the same weights;
- a Philox seed: noise that is a pure function of (seed, offset) on every device and backend.
  Batch b of a table with S steps draws x_T at offset b * (S + 1) and step i's z at offset
  b * (S + 1) + i + 1 (`noise_offset`), in-kernel where the backend has it, so a step needs no
  host RNG and can be replayed in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import philox_normal


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 N(0, I) drawn on the generator's device (as diffusers does), then moved to `device`."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def noise_offset(batch_index: int, num_steps: int, step_index: int | None = None) -> int:
    """The Philox offset of batch `batch_index`'s x_T (step_index None) or of step i's z."""
    base = batch_index * (num_steps + 1)
    return base if step_index is None else base + step_index + 1


@dataclass(frozen=True)
class BatchNoise:
    """The noise of one batch of a table with `num_steps` steps: Philox (seed, batch) when `seed` is
    set, else draws from `generator` (None: torch's global generator); `final_draw`: the last step
    draws from the generator too (StepTable.final_draw)."""

    num_steps: int
    generator: torch.Generator | None = None
    seed: int | None = None
    batch: int = 0
    final_draw: bool = False

    @property
    def philox(self) -> bool:
        return self.seed is not None

    def x_T(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The batch's starting noise, float32 `shape` on `device`."""
        if self.philox:
            return philox_normal(self.seed, noise_offset(self.batch, self.num_steps), shape, device)
        return randn(shape, self.generator, device)

    def offset(self, i: int) -> int:
        """Step i's Philox offset."""
        return noise_offset(self.batch, self.num_steps, i)

    def step(self, i: int, x: torch.Tensor) -> dict:
        """ops.ddpm_step's noise arguments for step i of x (N, C, H, W): the seed and offset, for the
        op to draw in-kernel, or z from the generator (see `z`)."""
        if self.philox:
            return {"seed": self.seed, "offset": self.offset(i)}
        return {"noise": self.z(i, x)}

    def z(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Step i's z as a tensor like x: Philox at its offset, or a generator draw (zeros without a
        draw at the last step, i = 0, unless `final_draw`)."""
        if self.philox:
            return philox_normal(self.seed, self.offset(i), x.shape, x.device)
        if i > 0 or self.final_draw:
            return randn(x.shape, self.generator, x.device)
        return torch.zeros_like(x)
