"""The DDPM paper's pictures of the process (Ho et al. 2020, Sec. 4.3).

Progressive generation (Fig. 6): for a few samples, a row each, the predicted x0
(x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, the sampler's callback) at
chosen timesteps from t = T-1 on the left down to the final samples x_0 in the last
column.

Interpolation (Fig. 8): encode two images x0, x0' with the forward process and the
same noise, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, mix them,
xbar_t = (1 - lambda) x_t + lambda x_t', and decode each mix with the reverse process
from t down to 0.

Both give frames (R, K, C, H, W) in [-1, 1], R rows of K images; `save_strip` writes
them as one PNG of R*H x K*W pixels (times the scale), no padding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import images
from .noise import randn
from .sampler import Sampler
from .schedule import Schedule

DEFAULT_COLUMNS = 8
DEFAULT_ROWS = 8
MAX_LAMBDAS = 1000  # an interpolation row decodes each lambda: more is a typo, not a figure


# --- progressive generation ---------------------------------------------------------------------


def strip_steps(
    sampled: Sequence[int], *, columns: int | None = None, timesteps: Sequence[int] | None = None
) -> list[int]:
    """The step indices i of a strip's columns, left to right: S-1 (t = T-1 unless chosen
    otherwise) first, 0 (the final samples) last.

    sampled: the timesteps the sampler visits, sampled[i] for step index i (StepTable.timesteps,
    ascending, sampled[0] = 0). Give at most one of: columns, that many columns at evenly spaced
    step indices from S-1 to 0 (default 8, at most S); timesteps, explicit t values the sampler
    visits, in any order, 0 added if missing.
    """
    sampled = [int(t) for t in sampled]
    S = len(sampled)
    if columns is not None and timesteps is not None:
        raise ValueError("give the strip's columns or its timesteps, not both")
    if timesteps is None:
        columns = DEFAULT_COLUMNS if columns is None else columns
        if isinstance(columns, bool) or not isinstance(columns, int) or not 1 <= columns <= S:
            raise ValueError(f"columns must be an int in [1, {S}] (the sampler's steps), got {columns!r}")
        if columns == 1:
            return [0]
        # floor(x + 1/2), not round(): round-half-even could map two columns to one step.
        return [math.floor((S - 1) * (1 - k / (columns - 1)) + 0.5) for k in range(columns)]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in timesteps):
        raise ValueError(f"timesteps must be ints, got {list(timesteps)}")
    chosen = sorted(set(timesteps) | {0}, reverse=True)
    index = {t: i for i, t in enumerate(sampled)}
    missing = [t for t in chosen if t not in index]
    if missing:
        raise ValueError(
            f"timesteps {missing} are not among the {S} the sampler visits"
            f" ({_summary(sampled)}); choose from those, or sample all T steps"
        )
    return [index[t] for t in chosen]


def _summary(values: Sequence[int]) -> str:
    """The timesteps a sampler visits, shortened for an error message."""
    if len(values) <= 12:
        return ", ".join(map(str, values))
    return f"{values[0]}, {values[1]}, ..., {values[-1]}"


class ProgressRecorder:
    """A Sampler callback that keeps x0_pred at the step indices `steps` for the first `rows`
    samples. Sampling in batches calls it once per batch and step; rows accumulate in order."""

    def __init__(self, steps: Sequence[int], rows: int) -> None:
        self.rows = rows
        self.kept: dict[int, list[torch.Tensor]] = {i: [] for i in steps}

    def __call__(self, i: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if i in self.kept:
            have = sum(len(x) for x in self.kept[i])
            if have < self.rows:
                self.kept[i].append(x0_pred[: self.rows - have].float().cpu())

    def frames(self, steps: Sequence[int], x0: torch.Tensor) -> torch.Tensor:
        """(rows, K, C, H, W): x0_pred at steps[:-1], then the final samples x0 (N, C, H, W)."""
        columns = [torch.cat(self.kept[i]) for i in steps[:-1]] + [x0[: self.rows].float().cpu()]
        return torch.stack(columns, dim=1)


def progress_strip(
    sampler: Sampler,
    n: int,
    *,
    columns: int | None = None,
    timesteps: Sequence[int] | None = None,
    rows: int | None = None,
    **sample_options,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sample n images and record the paper's progressive-generation figure.

    Returns (x0, frames, column_t): the samples (n, C, H, W) as `sampler.sample(n,
    **sample_options)` returns them; frames (rows, K, C, H, W) whose last column is x0[:rows]
    itself and whose other columns are x0_pred at the chosen steps (`strip_steps`); and the
    t of each column. rows: default min(n, 8).
    """
    rows = min(n, DEFAULT_ROWS) if rows is None else rows
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= n:
        raise ValueError(f"rows must be an int in [1, {n}] (the number of samples), got {rows!r}")
    if "callback" in sample_options or "callback_every" in sample_options:
        raise ValueError("progress_strip sets the sampler's callback itself")
    sampled = sampler.step_table(sample_options.get("steps")).timesteps.tolist()
    steps = strip_steps(sampled, columns=columns, timesteps=timesteps)
    recorder = ProgressRecorder(steps[:-1], rows)
    # Every step, so any choice of steps works: x0_pred is one elementwise op beside a U-Net call.
    x0 = sampler.sample(n, callback=recorder, callback_every=1, **sample_options)
    return x0, recorder.frames(steps, x0), [sampled[i] for i in steps]


def save_strip(path: str | os.PathLike, frames: torch.Tensor, scale: int = 1) -> None:
    """Frames (R, K, C, H, W) in [-1, 1] -> a PNG of R*H x K*W pixels times `scale`, row r
    holding frames[r] left to right, no padding; written atomically."""
    if frames.dim() != 5:
        raise ValueError(f"expected frames (R, K, C, H, W), got shape {tuple(frames.shape)}")
    images.save_grid(path, frames.flatten(0, 1), nrow=frames.shape[1], scale=scale, pad=0)


# --- interpolation ------------------------------------------------------------------------------


def encode(x0: torch.Tensor, t: int, eps: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """A sample of q(x_t | x0): sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; x0, eps (N, C, H, W),
    t an original timestep 0..T-1 of `schedule` (not respaced); float32."""
    if not 0 <= t < len(schedule):
        raise ValueError(f"t must be in [0, {len(schedule) - 1}], got {t}")
    abar = float(schedule.abar[t])
    return math.sqrt(abar) * x0.float() + math.sqrt(1.0 - abar) * eps.float()


def start_step(sampler: Sampler, t: int, steps: int | str | None = None, method: str = "ddpm") -> int:
    """The step index i at which `sampler` with `steps` and `method` (as in Sampler.sample)
    decodes x_t: the one whose timestep is t; t must be one the sampler visits."""
    sampled = sampler.step_table(steps, method).timesteps.tolist()
    if t not in sampled:
        raise ValueError(
            f"t = {t} is not among the {len(sampled)} timesteps the sampler visits ({_summary(sampled)})"
        )
    return sampled.index(t)


def lambdas_from(spec: int | Sequence[float]) -> list[float]:
    """An int L >= 2: L evenly spaced values 0..1 (11 -> 0, 0.1, ..., 1); or the values themselves."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 2 <= spec <= MAX_LAMBDAS:
            raise ValueError(
                f"the number of lambdas must be at least 2 and at most {MAX_LAMBDAS}, got {spec}"
            )
        return np.linspace(0.0, 1.0, spec).tolist()
    values = [float(v) for v in spec]
    if not 1 <= len(values) <= MAX_LAMBDAS or not all(0.0 <= v <= 1.0 for v in values):
        shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
        raise ValueError(f"lambdas must be values in [0, 1], 1 to {MAX_LAMBDAS} of them, got [{shown}]")
    return values


def interpolate(
    sampler: Sampler,
    x0: torch.Tensor,
    x0_prime: torch.Tensor,
    *,
    t: int = 500,
    lambdas: int | Sequence[float] = 11,
    seed: int = 0,
    steps: int | str | None = None,
    method: str = "ddpm",
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Decoded interpolations (L, C, H, W) in [-1, 1] between images x0 and x0_prime (C, H, W).

    Both are encoded to x_t, x_t' with the same eps; each xbar_t = (1 - lambda) x_t + lambda x_t'
    is decoded by the reverse process from t to 0 (`steps`, `method`, `eta`,
    `use_clipped_model_output` as in Sampler.sample; t must be a timestep those steps visit; a
    solver that keeps history cannot start there). eps and the reverse process's noise
    come from torch.Generator().manual_seed(seed); every lambda is decoded with the same noise
    (the generator restarts from one state), so the row varies with lambda alone, and lambda = 0
    and 1 give exactly the decodings of x_t and x_t'. progress: a progress bar per lambda.
    """
    cfg = sampler.unet.config
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    for name, x in (("x0", x0), ("x0_prime", x0_prime)):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have the model's image shape {shape}, got {tuple(x.shape)}")
    first = start_step(sampler, t, steps, method)
    weights = lambdas_from(lambdas)
    device = sampler.denoiser.device
    generator = torch.Generator().manual_seed(seed)
    eps = randn((1, *shape), generator, device)
    schedule = sampler.diffusion.schedule()
    x_t = encode(x0[None].to(device), t, eps, schedule)
    x_t_prime = encode(x0_prime[None].to(device), t, eps, schedule)
    state = generator.get_state()
    out = []
    for lam in weights:
        generator.set_state(state)
        xbar_t = (1.0 - lam) * x_t + lam * x_t_prime
        out.append(
            sampler.sample(
                1,
                x_T=xbar_t,
                start_step=first,
                steps=steps,
                method=method,
                eta=eta,
                use_clipped_model_output=use_clipped_model_output,
                generator=generator,
                progress=progress,
            )
        )
    return torch.cat(out)


def interpolation_strip(
    sampler: Sampler,
    x0: torch.Tensor,
    x0_prime: torch.Tensor,
    ts: Sequence[int],
    *,
    sources: bool = True,
    **options,
) -> torch.Tensor:
    """Frames (len(ts), K, C, H, W): a row of `interpolate(sampler, x0, x0_prime, t=t, **options)`
    per t, with the sources x0 and x0_prime (C, H, W) as first and last columns if `sources`
    (K = L + 2, else L)."""
    if not ts:
        raise ValueError("give at least one t")
    rows = []
    for t in ts:
        row = interpolate(sampler, x0, x0_prime, t=t, **options).cpu()
        if sources:
            row = torch.cat([x0[None].float().cpu(), row, x0_prime[None].float().cpu()])
        rows.append(row)
    return torch.stack(rows)


def read_image(path: str | os.PathLike, channels: int, resolution: int) -> torch.Tensor:
    """An image file -> (channels, resolution, resolution) float32 in [-1, 1] (the inverse of
    images.to_uint8). Converted to grey (channels 1) or RGB (3); never resized."""
    if channels not in (1, 3):
        raise ValueError(f"images can be read for 1 or 3 channels, not {channels}")
    if not Path(path).is_file():
        what = (
            "a directory"
            if Path(path).is_dir()
            else "not a regular file"
            if Path(path).exists()
            else "missing"
        )
        raise ValueError(f"{path} is {what}: interpolate takes two image files")
    try:
        with Image.open(path) as image:
            if image.size != (resolution, resolution):
                w, h = image.size
                raise ValueError(
                    f"{path} is {w}x{h}; the model takes {resolution}x{resolution} images: resize it first"
                )
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's errors for a broken file
        raise ValueError(f"{path} is not a readable image: {err}") from None
    x = torch.from_numpy(pixels.reshape(resolution, resolution, channels)).permute(2, 0, 1)
    return x / 127.5 - 1.0
