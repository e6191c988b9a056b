"""Kernels launched and bytes moved per U-Net forward and per sampling step, counted on meta tensors.

    python -m benchmarks.counts            # the Markdown table of benchmarks/README.md
    python -m benchmarks.counts --json F   # every row, with its per-category split
    python -m benchmarks.counts --before F # each fastddpm figure as "before -> now (now / before)",
                                           # before: the --json rows of an earlier commit

Systems (random weights; counts do not depend on them), fp32:
- "diffusers": `UNet2DModel` of the model's diffusers config; a step is `unet(x, t).sample` and
  `DDPMScheduler.step(eps, t, x)` (its noise drawn on the device).
- "fastddpm": `fastddpm.UNet` of the same config for each backend, NCHW and channels_last; a step is
  the eager loop's `Sampler.predict_eps` and `ops.ddpm_step` with Philox noise.
Models: "cifar10" (google/ddpm-cifar10-32's config, tests/data/ddpm-cifar10-32) and "lsun256"
(fastddpm.PRESETS["lsun256"]). Counting is shape-only (benchmarks.counter on meta tensors), so a
batch-256 forward of the 256x256 network counts in seconds on any CPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastddpm
from fastddpm import ops
from fastddpm.checkpoints import (
    diffusion_config_to_diffusers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from fastddpm.reference import memory_format_of

from .counter import Counter

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "ddpm-cifar10-32"
MODELS = ("cifar10", "lsun256")
BATCHES = (1, 256)
# The fastddpm backends whose ops run on meta tensors. The cuda backend's do not: its library needs a
# GPU to load, so its rows are counted where one is (its plans launch what the Triton ones do).
COUNTED_BACKENDS = ("torch", "triton")
STEP_INDEX = 500  # a middle step: it adds noise, as all but the last do


def model_configs(model: str) -> tuple[dict, dict]:
    """(diffusers UNet2DModel config, DDPMScheduler config) of a model name."""
    if model == "cifar10":
        read = lambda name: json.loads((DATA / name).read_text())  # noqa: E731
        return read("unet_config.json"), read("scheduler_config.json")
    if model == "lsun256":
        diffusion = fastddpm.DiffusionConfig(variance="fixedsmall")
        return unet_config_to_diffusers(fastddpm.PRESETS["lsun256"]), diffusion_config_to_diffusers(diffusion)
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")


@dataclass(frozen=True)
class Row:
    """The counts of one system and configuration."""

    system: str  # "diffusers" or "fastddpm"
    model: str
    batch: int
    backend: str  # fastddpm's backend; "-" for diffusers
    channels_last: bool
    what: str  # "forward" or "step"
    launches: int
    memory_bound_bytes: int  # every op outside convolutions and GEMMs
    bytes: int
    flops: int
    categories: dict[str, dict[str, int]]


def _row(counter: Counter, **fields) -> Row:
    return Row(
        **fields,
        launches=counter.total("launches"),
        memory_bound_bytes=counter.memory_bound_bytes(),
        bytes=counter.total("bytes"),
        flops=counter.total("flops"),
        categories=counter.by_category(),
    )


@torch.no_grad()
def count_diffusers(model: str, batch: int) -> list[Row]:
    """The forward and step rows of diffusers' UNet2DModel + DDPMScheduler."""
    import diffusers

    unet_json, scheduler_json = model_configs(model)
    with torch.device("meta"):
        unet = diffusers.UNet2DModel.from_config(unet_json).eval()
        size = unet_json["sample_size"]
        x = torch.empty(batch, unet_json.get("in_channels", 3), size, size)
    scheduler = diffusers.DDPMScheduler.from_config(scheduler_json)
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    t = scheduler.timesteps[len(scheduler.timesteps) - 1 - STEP_INDEX]  # a CPU tensor, as the pipeline's
    fields = dict(system="diffusers", model=model, batch=batch, backend="-", channels_last=False)
    with Counter("meta") as forward:
        unet(x, t)
    with Counter("meta") as step:
        eps = unet(x, t).sample
        scheduler.step(eps, t, x)
    return [_row(forward, what="forward", **fields), _row(step, what="step", **fields)]


def fastddpm_step(sampler: fastddpm.Sampler, x: torch.Tensor, table, i: int) -> torch.Tensor:
    """One step of the eager loop at step index i with Philox noise: x_t (N, C, H, W) -> x_{t-1}."""
    eps = sampler.predict_eps(x, table.timesteps[i].expand(x.shape[0]))
    return ops.ddpm_step(x, eps, i, table, seed=0, offset=i + 1, backend=sampler.unet.backend)


def triton_launches(op: str, args: tuple) -> int:
    """The kernels one call of a Triton fused op launches, from its launch plan: GroupNorm over more
    programs than one pass can hold runs a statistics and an apply kernel, attention with its keys
    split over programs a combine kernel after the split ones. Off CUDA (meta tensors) the plans
    are made for an H100's SM count."""
    if op == "group_norm_silu":
        from fastddpm.kernels.group_norm_silu import plan

        x, num_groups = args[0], args[3]
        N, C, H, W = x.shape
        nhwc = memory_format_of(x) == torch.channels_last  # as the launcher decides
        p = plan(N, C, H * W, num_groups, x.device, channels_last=nhwc, itemsize=x.element_size())
        return 1 if p.split == 1 else 2
    if op == "attention":
        from fastddpm.kernels.attention import plan

        q, k = args[0], args[1]
        p = plan(q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype, q.device)
        return 1 if p.kv_splits == 1 else 2
    return 1


@torch.no_grad()
def count_fastddpm(model: str, batch: int, backend: str, channels_last: bool) -> list[Row]:
    """The forward and step rows of fastddpm on `backend` (a concrete one)."""
    unet_json, scheduler_json = model_configs(model)
    config = unet_config_from_diffusers(unet_json)
    diffusion = fastddpm.checkpoints.diffusion_config_from_diffusers(scheduler_json)
    with torch.device("meta"):
        unet = fastddpm.UNet(config, backend=backend).eval()
    sampler = fastddpm.Sampler(unet, diffusion, channels_last=channels_last, cuda_graph=False)
    table = sampler.step_table()
    x = torch.empty(batch, config.in_channels, config.resolution, config.resolution, device="meta")
    t = table.timesteps[STEP_INDEX].expand(batch)
    fields = dict(system="fastddpm", model=model, batch=batch, backend=backend, channels_last=channels_last)
    launches = triton_launches if backend == "triton" else None
    with sampler.frozen():  # as sample() runs: the first forward computes the folds (fastddpm.folds)
        sampler.predict_eps(x, t)
        with Counter("meta", launches) as forward:
            sampler.predict_eps(x, t)
        with Counter("meta", launches) as step:
            fastddpm_step(sampler, x, table, STEP_INDEX)
    return [_row(forward, what="forward", **fields), _row(step, what="step", **fields)]


def available(backends: tuple[str, ...]) -> list[str]:
    """The backends that can run here (Triton's, on a machine without a GPU, under TRITON_INTERPRET=1)."""
    status = ops.backend_status()
    return [b for b in backends if status[b] == "available"]


def all_rows(models: tuple[str, ...] = MODELS, batches: tuple[int, ...] = BATCHES) -> list[Row]:
    rows = []
    for model in models:
        for batch in batches:
            rows += count_diffusers(model, batch)
            for backend in available(COUNTED_BACKENDS):
                for channels_last in (False, True):
                    rows += count_fastddpm(model, batch, backend, channels_last)
    return rows


def by_config(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Rows (as dicts: asdict(Row), or an earlier --json) by (model, batch, system, backend,
    channels_last), then by what ("forward", "step")."""
    grouped: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["model"], r["batch"], r["system"], r["backend"], r["channels_last"])
        grouped.setdefault(key, {})[r["what"]] = r
    return grouped


def table(rows: list[Row]) -> str:
    """The Markdown table: launches per step and per forward, memory-bound GB per forward."""
    lines = [
        "| model | batch | system | backend | layout | launches / step | launches / forward"
        " | memory-bound GB / forward | GFLOP / forward |",
        "|---|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for (model, batch, system, backend, cl), r in by_config([asdict(r) for r in rows]).items():
        f, s = r["forward"], r["step"]
        lines.append(
            f"| {model} | {batch} | {system} | {backend} | {'NHWC' if cl else 'NCHW'} | {s['launches']}"
            f" | {f['launches']} | {f['memory_bound_bytes'] / 1e9:.3f} | {f['flops'] / 1e9:.1f} |"
        )
    return "\n".join(lines)


def comparison(before: list[dict], rows: list[Row]) -> str:
    """The Markdown table of fastddpm's rows against `before` (the --json rows of an earlier
    commit): launches per step and per forward, memory-bound GB per forward, each "before -> now
    (now / before)"."""
    old = by_config(before)
    lines = [
        "| model | batch | backend | layout | launches / step | launches / forward"
        " | memory-bound GB / forward |",
        "|---|---:|---|---|---:|---:|---:|",
    ]

    def cell(was: float, now: float, scale: float = 1.0, digits: int = 0) -> str:
        return f"{was / scale:.{digits}f} -> {now / scale:.{digits}f} ({now / was:.0%})"

    for key, now in by_config([asdict(r) for r in rows]).items():
        model, batch, system, backend, cl = key
        if system != "fastddpm" or key not in old:
            continue
        (f, s), (f0, s0) = (now["forward"], now["step"]), (old[key]["forward"], old[key]["step"])
        lines.append(
            f"| {model} | {batch} | {backend} | {'NHWC' if cl else 'NCHW'}"
            f" | {cell(s0['launches'], s['launches'])} | {cell(f0['launches'], f['launches'])}"
            f" | {cell(f0['memory_bound_bytes'], f['memory_bound_bytes'], 1e9, 3)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.counts", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write every row, with its per-category split")
    parser.add_argument("--before", type=Path, help="compare with these rows (an earlier --json)")
    args = parser.parse_args(argv)
    rows = all_rows()
    if args.before:
        print(comparison(json.loads(args.before.read_text()), rows))
    else:
        print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
