"""The figures the faithfulness tests bound, printed: how far fastddpm's images and steps are from
diffusers' pipelines and schedulers, on the test suite's tiny random network and configs.

    python -m benchmarks.faithfulness [--ddim-1000]

Prints, in [0, 1] pixels: DDPMPipeline and DDIMPipeline (both forms of use_clipped_model_output)
at 10, 50, 100 and 1000 steps (tests/test_pipelines_at_step_counts.py's fixture); DDIM's default
form's sensitivity (diffusers against itself with x_T moved by 1e-6); each solver against its
scheduler's loop on the network (tests/test_solver_pipelines.py); each solver's steps against the
scheduler's on exact model outputs, relative to the sample's size (tests/test_solvers.py).
--ddim-1000 adds the digits model's Frechet distance for DDIM's three forms at 1000 steps.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import fastddpm
from fastddpm.solvers import SOLVERS
from tests import test_solvers
from tests.conftest import TINY_DIFFUSERS_UNET, reference_json, require_diffusers, write_diffusers_folder
from tests.test_pipelines_at_step_counts import ddim_pipeline, ddpm_pipeline, pixels
from tests.test_solver_pipelines import diffusers_loop

STEP_COUNTS = (10, 50, 100, 1000)


def pipelines(folder: Path, model) -> None:
    sampler = fastddpm.load(folder)
    print("| pipeline | " + " | ".join(map(str, STEP_COUNTS)) + " |")
    rows = {"DDPMPipeline": []}
    for S in STEP_COUNTS:
        ours = sampler.sample(2, steps=S, generator=torch.Generator().manual_seed(5), progress=False)
        rows["DDPMPipeline"].append(np.abs(pixels(ours) - ddpm_pipeline(folder, model, S, seed=5)).max())
        for clipped in (True, False):
            for eta in (0.0, 0.5):
                theirs = ddim_pipeline(folder, model, S, 6, eta, clipped)
                ours = sampler.sample(
                    2, steps=S, method="ddim", eta=eta, use_clipped_model_output=clipped,
                    generator=torch.Generator().manual_seed(6), progress=False,
                )  # fmt: skip
                name = f"DDIMPipeline {'clipped' if clipped else 'default'} eta {eta}"
                rows.setdefault(name, []).append(np.abs(pixels(ours) - theirs).max())
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.1e}" for v in values) + " |")


def ddim_sensitivity(folder: Path, model) -> None:
    diffusers = require_diffusers()
    for S in (10, 50):
        outs = []
        for delta in (0.0, 1e-6):
            scheduler = diffusers.DDIMScheduler.from_pretrained(folder)
            scheduler.set_timesteps(S)
            x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)) + delta
            with torch.no_grad():
                for t in scheduler.timesteps:
                    x = scheduler.step(model(x, t).sample, t, x).prev_sample
            outs.append(x)
        moved = float((outs[0] - outs[1]).abs().max()) / 2  # in [0, 1] pixels
        print(f"DDIMPipeline's default step, x_T + 1e-6, S = {S}: {moved:.1e}")


def solver_pipelines(folder: Path, model) -> None:
    sampler = fastddpm.load(folder)
    print("| solver | S=10 | S=25 |")
    for name in SOLVERS:
        cells = []
        for S in (10, 25):
            theirs = diffusers_loop(folder, model, name, S, seed=7)
            ours = sampler.sample(
                2, steps=S, method=name, generator=torch.Generator().manual_seed(7), progress=False
            )
            cells.append(
                "diffusers NaN" if np.isnan(theirs).any() else f"{np.abs(pixels(ours) - theirs).max():.1e}"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")


def solver_steps() -> None:
    print("| solver | S=5 | 10 | 25 | 50 |")
    for name in SOLVERS:
        cells = []
        for S in (5, 10, 25, 50):
            worst = 0.0
            for spacing in ("leading", "trailing", "linspace"):
                worst = max(worst, _worst_step(name, spacing, S))
            cells.append(f"{worst:.1e}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def _worst_step(name: str, spacing: str, S: int) -> float:
    """The largest step difference relative to the sample's size, as test_solvers checks it."""
    steps = test_solvers.steps_side_by_side(name, spacing, S)
    return max(test_solvers.relative(y, expected) for _, _, _, y, expected in steps)


def ddim_1000() -> None:
    from fastddpm import data
    from fastddpm.checkpoints import DEFAULT_MODEL
    from tests.test_quality import N, classifier, frechet_distance, hidden_features

    clf = classifier()
    heldout = hidden_features(clf, data.digits("heldout"))
    sampler = fastddpm.load(DEFAULT_MODEL)
    for options in ({}, {"use_clipped_model_output": True}, {"clip_x0": False}):
        x = sampler.sample(
            N,
            steps=1000,
            method="ddim",
            progress=False,
            generator=torch.Generator().manual_seed(0),
            **options,
        )
        fd = frechet_distance(hidden_features(clf, fastddpm.to_uint8(x).transpose(0, 3, 1, 2)), heldout)
        print(f"digits, DDIM 1000 steps {options or 'default'}: FD {fd:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ddim-1000", action="store_true", help="also DDIM's three forms on the digits model"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_diffusers_folder(
            folder, TINY_DIFFUSERS_UNET, reference_json("scheduler_config.json"), seed=1
        )
        pipelines(folder, model)
        ddim_sensitivity(folder, model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_diffusers_folder(
            folder, TINY_DIFFUSERS_UNET, reference_json("scheduler_config.json"), seed=2
        )
        solver_pipelines(folder, model)
    solver_steps()
    if args.ddim_1000:
        ddim_1000()


if __name__ == "__main__":
    main()
