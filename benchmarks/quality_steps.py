"""Quality against steps: each sampler's classifier Frechet distance on the bundled digits model.

For every sampler (ancestral DDPM, DDIM and each few-step solver) at 5, 10, 20, 50, 100 and 1000
steps: N = 360 digits from seed 0, scored as tests/test_quality.py scores them (the Frechet
distance between a digits classifier's hidden features of the samples and of the 360 held-out
real digits; real-against-real is about 34.5). Writes the table as JSON and the plot (x: network
evaluations, log scale; y: distance; the 1000-step ancestral level as a reference line).

    python -m benchmarks.quality_steps [--out benchmarks/results/quality/quality-steps.json]
        [--plot docs/quality-vs-steps.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import fastddpm
from fastddpm import data
from fastddpm.checkpoints import DEFAULT_MODEL
from fastddpm.io import atomic_write
from fastddpm.precision import cpu_capability
from fastddpm.sampler import SAMPLERS
from tests.test_quality import N, classifier, frechet_distance, hidden_features

STEPS = (5, 10, 20, 50, 100, 1000)


def measure(samplers: tuple[str, ...] = SAMPLERS, steps: tuple[int, ...] = STEPS) -> dict:
    """{"rows": [{sampler, steps, evaluations, fd}], "real_fd": ..., ...} for the bundled model."""
    clf = classifier()
    heldout = hidden_features(clf, data.digits("heldout"))
    real = data.digits("train")[np.random.default_rng(0).choice(1437, N, replace=False)]
    sampler = fastddpm.load(DEFAULT_MODEL)  # in its own dtype, float32
    rows = []
    for name in samplers:
        for S in steps:
            try:
                evaluations = len(sampler.step_table(S, name))
            except ValueError as err:  # e.g. a multistep solver's linspace spacing at S = T
                print(f"{name:13s} {S:5d} steps: refused ({err})", flush=True)
                continue
            start = time.perf_counter()
            x = sampler.sample(
                N, steps=S, method=name, progress=False, generator=torch.Generator().manual_seed(0)
            )
            seconds = time.perf_counter() - start
            images = fastddpm.to_uint8(x).transpose(0, 3, 1, 2)
            fd = frechet_distance(hidden_features(clf, images), heldout)
            rows.append(
                {"sampler": name, "steps": S, "evaluations": evaluations, "fd": fd, "seconds": seconds}
            )
            print(
                f"{name:13s} {S:5d} steps {evaluations:5d} evaluations  FD {fd:8.2f}  ({seconds:.1f} s)",
                flush=True,
            )
    return {
        "model": str(DEFAULT_MODEL.relative_to(Path(fastddpm.__file__).parent.parent)),
        "n": N,
        "seed": 0,
        "precision": "fp32",
        "cpu_capability": cpu_capability(),
        "real_fd": frechet_distance(hidden_features(clf, real), heldout),
        "rows": rows,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    names = list(dict.fromkeys(r["sampler"] for r in result["rows"]))
    for name in names:
        rows = [r for r in result["rows"] if r["sampler"] == name]
        ax.plot([r["evaluations"] for r in rows], [r["fd"] for r in rows], marker="o", ms=3, label=name)
    ancestral = [r["fd"] for r in result["rows"] if r["sampler"] == "ddpm" and r["steps"] == 1000]
    if ancestral:
        ax.axhline(ancestral[0], color="k", ls="--", lw=1, label="ddpm, 1000 steps")
    ax.axhline(result["real_fd"], color="grey", ls=":", lw=1, label="real vs held-out")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations")
    ax.set_ylabel("classifier Frechet distance (digits)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality/quality-steps.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/quality-vs-steps.png"))
    args = parser.parse_args()
    result = measure()
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    plot(result, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
