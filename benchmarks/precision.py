"""Accuracy of each precision mode against fp32, and fp16 headroom at 256x256, on the CPU.

    python -m benchmarks.precision [--out benchmarks/results/<date>-<machine>-precision.json]

1. The bundled digits model (fastddpm.checkpoints.DEFAULT_MODEL), all 1000 steps, and the
   CIFAR10 preset with random weights (seed 0), 10 respaced steps: every mode's final samples
   against fp32's from the same x_T and the same per-step noise (one seeded generator per run,
   drawn in the same order whatever the mode). Differences in [-1, 1] units and in uint8 levels
   (the saved images). fp16 and bf16 run channels_last: the CPU's fp16 convolution in NCHW is
   a slow fallback (hundreds of times fp32's time), its channels_last one is oneDNN's.
2. The lsun256 preset, random weights (seed 0), batch 1: forward hooks record the largest
   |output| of every module in an fp32 forward at a few t, against fp16's largest finite value
   (65504), and an fp16 forward at the same inputs is checked for inf and NaN.
3. With --speed: one reverse step of the CIFAR10 model (its diffusers config, random weights) on
   the CPU, diffusers' fp32 eager UNet2DModel + DDPMScheduler.step against fastddpm's network +
   ops.ddpm_step in each CPU configuration (fp32, bf16, with and without channels_last; with
   --compile also torch.compile'd bf16 channels_last), timed interleaved round by round in one
   process, so that load from other processes hits all alike: the figure is the ratio of medians.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import fastddpm
from fastddpm import checkpoints, images, ops
from fastddpm.io import atomic_write
from fastddpm.precision import MODES
from fastddpm.unet import UNet, preset

from .test_e2e import MODELS

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
LOW_PRECISION = ("fp16", "bf16")


def compare(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Differences of samples x from ref, (N, C, H, W) in [-1, 1], and of their uint8 images."""
    d = (x - ref).abs()
    levels = np.abs(images.to_uint8(x).astype(np.int16) - images.to_uint8(ref).astype(np.int16))
    return {
        "max_abs": d.max().item(),
        "mean_abs": d.mean().item(),
        "max_uint8_levels": int(levels.max()),
        "mean_uint8_levels": float(levels.mean()),
        "fraction_of_uint8_values_changed": float((levels > 0).mean()),
    }


def modes_against_fp32(sampler: fastddpm.Sampler, n: int, steps: int | None, seed: int) -> dict:
    """Sample n images in every mode from one x_T and one noise stream; each mode against fp32."""
    cfg = sampler.unet.config
    shape = (n, cfg.in_channels, cfg.resolution, cfg.resolution)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    out, results = {}, {}
    for mode in MODES:
        channels_last = mode in LOW_PRECISION
        run = fastddpm.Sampler(
            copy.deepcopy(sampler.unet), sampler.diffusion, precision=mode, channels_last=channels_last
        )
        start = time.perf_counter()
        out[mode] = run.sample(
            n, steps=steps, x_T=x_T, generator=torch.Generator().manual_seed(seed + 1), progress=False
        )
        results[mode] = {
            "channels_last": channels_last,
            "seconds": round(time.perf_counter() - start, 1),
            **compare(out[mode], out["fp32"]),
        }
        print(f"  {mode}: {results[mode]}", flush=True)
    return results


def fp16_headroom(timesteps: list[int]) -> dict:
    """Largest |output| of each module of the lsun256 network (random weights), fp32 forward, and
    whether the fp16 forward at the same (x, t) stays finite."""
    torch.manual_seed(0)
    unet = UNet(preset("lsun256")).eval()
    largest: dict[str, float] = {}

    def record(name):
        def hook(module, inputs, output):
            largest[name] = max(largest.get(name, 0.0), output.detach().abs().max().float().item())

        return hook

    handles = [m.register_forward_hook(record(name or "unet")) for name, m in unet.named_modules()]
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in timesteps:
            unet(x, torch.tensor([t]))
    for h in handles:
        h.remove()
    half = fastddpm.Sampler(unet, precision="fp16", channels_last=True).unet
    finite = {}
    with torch.no_grad():
        for t in timesteps:
            eps = half(x.half().contiguous(memory_format=torch.channels_last), torch.tensor([t]))
            finite[t] = {"isinf": bool(torch.isinf(eps).any()), "isnan": bool(torch.isnan(eps).any())}
    top = sorted(largest.items(), key=lambda kv: -kv[1])[:10]
    return {
        "timesteps": timesteps,
        "fp16_max": FP16_MAX,
        "largest_activation": top[0][1],
        "headroom": FP16_MAX / top[0][1],
        "largest_modules": dict(top),
        "fp16_output": finite,
        "modules_recorded": len(largest),
    }


def step_speed(batches: list[int], rounds: int, compiled: bool) -> dict:
    """Median seconds per reverse step (t = 500) of diffusers and of each fastddpm configuration, and
    each one's speed-up over diffusers, timed interleaved; batch -> results."""
    cpu = torch.device("cpu")
    model = MODELS["cifar10"]
    unet, scheduler = model.diffusers(cpu, torch.float32)
    scheduler.set_timesteps(1000)
    options = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
    samplers = {
        f"{p}{'-channels_last' if cl else ''}": model.fastddpm(cpu, "torch", precision=p, channels_last=cl)
        for p, cl in options
    }
    if compiled:
        samplers["bf16-channels_last-compiled"] = model.fastddpm(
            cpu, "torch", precision="bf16", channels_last=True, compile=True
        )
    results = {}
    for batch in batches:
        results[batch] = time_steps(batch, model.shape, unet, scheduler, samplers, rounds)
        speedups = ", ".join(f"{k} {v['speedup_over_diffusers']:.2f}x" for k, v in results[batch].items())
        print(f"  batch {batch}: {speedups}", flush=True)
    return results


def time_steps(batch, shape, unet, scheduler, samplers: dict, rounds: int) -> dict:
    """One batch of step_speed: each system's step timed once per round, systems interleaved."""
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)

    def diffusers_step():
        return scheduler.step(unet(x, 500).sample, 500, x, generator=generator).prev_sample

    def fastddpm_step(sampler):
        table = sampler.step_table()  # all 1000 steps: step index 500 is t = 500
        t = table.timesteps[500].expand(batch)
        dtype = sampler.denoiser.dtype
        return lambda: ops.ddpm_step(
            x, sampler.network(sampler.precision.network_input(x, dtype), t).float(), 500, table, noise=z
        )

    steps = {"diffusers-fp32": diffusers_step, **{k: fastddpm_step(s) for k, s in samplers.items()}}
    times = {name: [] for name in steps}
    with torch.no_grad():
        for step in steps.values():
            step()  # warm-up (and compilation)
        for _ in range(rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    return {
        name: {"s_per_step": m, "speedup_over_diffusers": median["diffusers-fp32"] / m}
        for name, m in median.items()
    }


def machine() -> str:
    try:
        name = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in name.splitlines() if "Model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    date = datetime.date.today().isoformat()
    parser.add_argument("--out", default=f"benchmarks/results/precision/{date}-cpu-precision.json")
    parser.add_argument("--skip-lsun", action="store_true", help="leave out the 256x256 overflow check")
    parser.add_argument(
        "--only-speed", action="store_true", help="only the CPU speed section (implies --speed)"
    )
    parser.add_argument("--speed", action="store_true", help="also time a step against diffusers (CPU)")
    parser.add_argument("--compile", action="store_true", help="with --speed: add a torch.compile'd row")
    parser.add_argument("--rounds", type=int, default=7, help="--speed: interleaved rounds (default 7)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # steadier on a shared machine; the figures are accuracy, not speed

    result = {"date": date, "machine": machine(), "torch": torch.__version__, "device": "cpu"}
    if args.speed or args.only_speed:
        print(f"CPU step speed against diffusers, {args.rounds} interleaved rounds, 1 thread", flush=True)
        result["cpu_step_speed"] = step_speed([1, 8], args.rounds, args.compile)
    if args.only_speed:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
        print(f"wrote {args.out}")
        return
    print("digits (bundled model), 1000 steps, 16 samples", flush=True)
    digits = fastddpm.load(str(checkpoints.DEFAULT_MODEL))
    result["digits"] = {"n": 16, "steps": 1000, "modes": modes_against_fp32(digits, 16, None, seed=0)}

    print("cifar10 preset, random weights, 10 respaced steps, 2 samples", flush=True)
    torch.manual_seed(0)
    cifar = fastddpm.Sampler(UNet(preset("cifar10")).eval())
    result["cifar10_random"] = {"n": 2, "steps": 10, "modes": modes_against_fp32(cifar, 2, 10, seed=0)}

    if not args.skip_lsun:
        print("lsun256 preset, random weights: fp16 headroom", flush=True)
        result["lsun256_fp16"] = fp16_headroom([999, 500, 0])
        print(f"  {result['lsun256_fp16']}", flush=True)

    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
