"""A diffusers folder samples as its pipelines do at every step count: `fastddpm.load(folder)
.sample(n, steps=S, generator=g)` against DDPMPipeline(num_inference_steps=S) and DDIMPipeline
(with its default use_clipped_model_output=False, and True) from the same seed, on a tiny random
network with T = 1000.

Bound 1e-4 in [0, 1] pixels: diffusers' float32 tables lose about that much per step at short
steps (tests/test_scheduler_step.py measures 1.8e-4 on a step's raw output), fastddpm's are cast
from float64; whole chains measured here stay within 2e-5.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import reference

from .conftest import TINY_DIFFUSERS_UNET, reference_json, require_diffusers, write_diffusers_folder

diffusers = require_diffusers()
BOUND = 1e-4
STEP_COUNTS = [10, 50, 100, 1000]


@pytest.fixture(scope="module")
def tiny_1000(tmp_path_factory):
    """(folder, diffusers model): the tiny network under google/ddpm-cifar10-32's scheduler config
    (T = 1000, fixed_large, clip on; no timestep_spacing key: diffusers' default, leading)."""
    folder = tmp_path_factory.mktemp("tiny-ddpm-1000")
    return folder, write_diffusers_folder(
        folder, TINY_DIFFUSERS_UNET, reference_json("scheduler_config.json"), seed=1
    )


def pixels(x: torch.Tensor) -> np.ndarray:
    """Samples in [-1, 1] (N, C, H, W) as the pipelines' output_type="np" gives them."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def ddpm_pipeline(folder, model, S: int, seed: int) -> np.ndarray:
    pipe = diffusers.DDPMPipeline(unet=model, scheduler=diffusers.DDPMScheduler.from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=S, output_type="np"
    ).images


def ddim_pipeline(folder, model, S: int, seed: int, eta: float, clipped: bool) -> np.ndarray:
    pipe = diffusers.DDIMPipeline(unet=model, scheduler=diffusers.DDIMScheduler.from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    options = {"eta": eta, "num_inference_steps": S, "use_clipped_model_output": clipped}
    return pipe(
        batch_size=2, generator=torch.Generator().manual_seed(seed), output_type="np", **options
    ).images


@pytest.mark.slow
@pytest.mark.parametrize("S", STEP_COUNTS)
def test_ddpm_equals_ddpm_pipeline_at_every_step_count(tiny_1000, S):
    folder, model = tiny_1000
    theirs = ddpm_pipeline(folder, model, S, seed=5)
    ours = fastddpm.load(folder).sample(
        2, steps=S, generator=torch.Generator().manual_seed(5), progress=False
    )
    assert np.abs(pixels(ours) - theirs).max() <= BOUND


@pytest.mark.slow
@pytest.mark.parametrize(
    ("S", "clipped"), [*((S, True) for S in STEP_COUNTS), (10, False)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_equals_ddim_pipeline(tiny_1000, S, eta, clipped):
    """DDIMPipeline's default keeps the network's eps in the direction term (clipped False); with
    use_clipped_model_output=True it re-derives eps from the clipped x0. Clip on, as the config.
    The default form is chaotic on this random network: diffusers against itself with x_T moved
    by 1e-6 differs by 5e-5 at 10 steps and by 0.1 or more at 50 (benchmarks/faithfulness.py),
    so whole chains are compared at 10 steps; every step at every S is compared below."""
    folder, model = tiny_1000
    theirs = ddim_pipeline(folder, model, S, 6, eta, clipped)
    sampler = fastddpm.load(folder)
    ours = sampler.sample(
        2, steps=S, method="ddim", eta=eta, use_clipped_model_output=clipped,
        generator=torch.Generator().manual_seed(6), progress=False,
    )  # fmt: skip
    assert np.abs(pixels(ours) - theirs).max() <= BOUND


@pytest.mark.slow
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("S", STEP_COUNTS)
@torch.no_grad()
def test_ddim_default_form_takes_every_step_as_the_scheduler(tiny_1000, S, eta):
    """DDIMScheduler's default step (use_clipped_model_output=False) from its own x_t, with the
    network's eps and the same z, at every step of S: fastddpm's step equals it within 1e-5."""
    folder, model = tiny_1000
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder)
    scheduler.set_timesteps(S)
    table = fastddpm.load(folder).step_table(S, "ddim", eta, model_eps=True)
    history = torch.zeros(table.num_slots, 2, 3, 16, 16)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 16, 16, generator=g)
    for k, t in enumerate(scheduler.timesteps):
        eps = model(x, t).sample
        z = torch.randn(x.shape, generator=g)
        theirs = scheduler.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        ours = reference.multistep_update(x, eps, history, S - 1 - k, table, noise=z, clip_x0=True)
        assert float((ours - theirs).abs().max()) <= 1e-5 * max(1.0, float(theirs.abs().max())), k
        x = theirs


@pytest.mark.parametrize(
    "settings",
    [{"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}, {"steps_offset": 1}],
    ids=["trailing", "linspace", "leading-offset-1"],
)
def test_other_spacings_of_a_scheduler_config_are_followed(tiny_1000, tmp_path, settings):
    """trailing and steps_offset = 1 end at t > 0, where DDPMScheduler adds (and draws) noise at
    the last step too: the same draws, in the same order."""
    source, model = tiny_1000
    folder = tmp_path / "spaced"
    shutil.copytree(source, folder)
    config = json.loads((folder / "scheduler_config.json").read_text())
    (folder / "scheduler_config.json").write_text(json.dumps(config | settings))
    theirs = ddpm_pipeline(folder, model, 10, seed=7)
    ours = fastddpm.load(folder).sample(
        2, steps=10, generator=torch.Generator().manual_seed(7), progress=False
    )
    assert np.abs(pixels(ours) - theirs).max() <= BOUND


def test_improved_ddpm_spacing_stays_available_and_visits_other_timesteps(tiny_1000):
    """spacing="improved" (Improved DDPM's rule, 999, 979, 958, ...) is not the pipeline's leading
    spacing (980, 960, ..., 0): other images at S = 50."""
    folder, model = tiny_1000
    sampler = fastddpm.load(folder)
    assert sampler.diffusion.spacing == "leading"
    improved = sampler.step_table(50, spacing="improved").timesteps
    leading = sampler.step_table(50).timesteps
    assert improved[-3:].tolist() == [958, 979, 999] and leading[-3:].tolist() == [940, 960, 980]
    ours = sampler.sample(
        2, steps=50, spacing="improved", generator=torch.Generator().manual_seed(5), progress=False
    )
    assert np.abs(pixels(ours) - ddpm_pipeline(folder, model, 50, seed=5)).max() > 1e-2
