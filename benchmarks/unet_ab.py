"""Time this checkout's U-Net forward against another commit's, interleaved, on the CPU.

    OMP_NUM_THREADS=1 python -m benchmarks.unet_ab counter        # fastddpm/unet.py at `counter`
    python -m benchmarks.unet_ab HEAD~3 --batch 8 --rounds 10 --model cifar10

Both networks hold the same random weights and run the torch backend in fp32 NCHW under no_grad,
each as a sampling run runs it (inside its weights' frozen() scope where it has one: fastddpm.folds).
Each round times one forward of each, in alternating order (base first in even rounds), so a drift
in the machine's load falls on both; the result is the median of the per-round ratios new / base and
their spread. The base commit's unet.py runs against this checkout's fastddpm (ops, reference).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from contextlib import ExitStack
from pathlib import Path

import torch

import fastddpm
from fastddpm import unet as current

ROOT = Path(__file__).resolve().parent.parent


def base_unet_module(ref: str) -> types.ModuleType:
    """fastddpm/unet.py as of git `ref`, imported as a module of this checkout's package."""
    source = subprocess.check_output(["git", "show", f"{ref}:fastddpm/unet.py"], cwd=ROOT, text=True)
    module = types.ModuleType("fastddpm._unet_base")
    module.__package__ = "fastddpm"
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{ref}:fastddpm/unet.py", "exec"), module.__dict__)
    return module


def _forward_seconds(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    start = time.perf_counter()
    unet(x, t)
    return time.perf_counter() - start


@torch.no_grad()
def compare(ref: str, model: str, batch: int, rounds: int) -> dict[str, float]:
    """Seconds per forward (medians) of base and new, and the per-round ratio new / base."""
    base = base_unet_module(ref)
    torch.manual_seed(0)
    new_net = current.UNet(fastddpm.PRESETS[model], backend="torch").eval()
    base_net = base.UNet(base.UNetConfig(**fastddpm.PRESETS[model].to_dict()), backend="torch").eval()
    base_net.load_state_dict(new_net.state_dict())
    cfg = new_net.config
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    t = torch.full((batch,), 500)
    times: dict[str, list[float]] = {"base": [], "new": []}
    with ExitStack() as scopes:
        for net in (base_net, new_net):
            if hasattr(net, "_folds"):
                scopes.enter_context(net._folds.frozen(net))
            net(x, t)  # warm-up: allocator, oneDNN primitives, folded weights
        for r in range(rounds):
            order = (("base", base_net), ("new", new_net))
            for name, net in order if r % 2 == 0 else reversed(order):
                times[name].append(_forward_seconds(net, x, t))
    ratios = [n / b for n, b in zip(times["new"], times["base"], strict=True)]
    return {
        "base_s": statistics.median(times["base"]),
        "new_s": statistics.median(times["new"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.unet_ab", description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the base commit (a git revision)")
    parser.add_argument("--model", default="cifar10", choices=sorted(fastddpm.PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    r = compare(args.ref, args.model, args.batch, args.rounds)
    print(
        f"{args.model} batch {args.batch} fp32 NCHW, {args.rounds} interleaved rounds,"
        f" {torch.get_num_threads()} thread(s): base {r['base_s'] * 1e3:.1f} ms,"
        f" new {r['new_s'] * 1e3:.1f} ms per forward (medians); new / base = {r['ratio']:.3f}"
        f" (median of rounds; spread {r['ratio_min']:.3f} to {r['ratio_max']:.3f})"
    )


if __name__ == "__main__":
    main()
