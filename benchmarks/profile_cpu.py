"""Where a CIFAR10 forward's CPU time goes: fastddpm against diffusers, by torch profiler.

    python -m benchmarks.profile_cpu [--batch 8] [--precision fp32|bf16] [--channels-last] [--rows 10]

Both networks from google/ddpm-cifar10-32's config (benchmarks.test_e2e.MODELS), random weights,
t = 500; one warm-up forward, then `--forwards` profiled ones. Prints each system's operators by
self CPU time (diffusers always fp32 eager, the baseline of the end-to-end suite).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from .test_e2e import MODELS


def profile_table(forward, forwards: int, rows: int) -> str:
    """The profiler's table of `forwards` calls of forward(), sorted by self CPU time."""
    with torch.no_grad():
        forward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                forward()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--forwards", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10)
    args = parser.parse_args()

    model = MODELS["cifar10"]
    cpu = torch.device("cpu")
    x = torch.randn(args.batch, *model.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((args.batch,), 500)
    sampler = model.fastddpm(cpu, "torch", precision=args.precision, channels_last=args.channels_last)
    unet, _ = model.diffusers(cpu, torch.float32)
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"fastddpm {args.precision} {layout}, batch {args.batch}, {args.forwards} forwards")
    print(profile_table(lambda: sampler.predict_eps(x, t), args.forwards, args.rows))
    print(f"diffusers fp32 eager NCHW, batch {args.batch}, {args.forwards} forwards")
    print(profile_table(lambda: unet(x, 500).sample, args.forwards, args.rows))


if __name__ == "__main__":
    main()
