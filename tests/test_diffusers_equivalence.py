"""fastddpm's U-Net and sampler against diffusers, installed for real."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastddpm
from fastddpm.checkpoints import save_diffusers

from .conftest import REFERENCE, require_diffusers, write_diffusers_folder

diffusers = require_diffusers()

TIMESTEPS = [0, 1, 250, 999]


def max_eps_error(model, sampler, t: int, seed: int = 0) -> float:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    tt = torch.tensor([t, t])
    with torch.no_grad():
        return (model(x, tt).sample - sampler.unet(x, tt)).abs().max().item()


@pytest.mark.parametrize("t", TIMESTEPS)
def test_cifar10_eps_equals_diffusers(cifar10_diffusers, t):
    folder, model = cifar10_diffusers
    sampler = fastddpm.load(folder)
    assert sampler.unet.config.attn_head_dim == 8  # diffusers' default for this config
    assert sampler.diffusion.variance == "fixedlarge" and sampler.diffusion.clip_x0
    assert max_eps_error(model, sampler, t) <= 1e-4


def test_per_sample_t_equals_diffusers(cifar10_diffusers):
    folder, model = cifar10_diffusers
    sampler = fastddpm.load(folder)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([3, 777])
    with torch.no_grad():
        assert (model(x, t).sample - sampler.unet(x, t)).abs().max().item() <= 1e-4


def test_legacy_attention_key_names_load(cifar10_diffusers, tmp_path):
    """Files users download still name attention weights query/key/value/proj_attn."""
    folder, model = cifar10_diffusers
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in legacy.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    assert any(".query." in k for k in state)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    for name in ("config.json", "scheduler_config.json"):
        (tmp_path / name).write_text((folder / name).read_text())
    assert max_eps_error(model, fastddpm.load(tmp_path), 500) <= 1e-4


def test_single_head_paper_attention_equals_diffusers_single_head(tmp_path):
    """attention_head_dim = null makes diffusers run the paper's one-head attention."""
    unet_cfg = json.loads((REFERENCE / "unet_config.json").read_text())
    unet_cfg["attention_head_dim"] = None
    sched_cfg = json.loads((REFERENCE / "scheduler_config.json").read_text())
    model = write_diffusers_folder(tmp_path, unet_cfg, sched_cfg, seed=3)
    sampler = fastddpm.load(tmp_path)
    assert sampler.unet.config.attn_head_dim is None and sampler.unet.mid.attn_1.heads == 1
    for t in (0, 999):
        assert max_eps_error(model, sampler, t) <= 1e-4


def test_paper_attention_option_forces_one_head(cifar10_diffusers):
    folder, model = cifar10_diffusers
    paper = fastddpm.load_diffusers(folder, paper_attention=True)
    assert paper.unet.mid.attn_1.heads == 1
    assert max_eps_error(model, paper, 500) > 1e-3  # a different function than diffusers' 32 heads


def test_save_diffusers_round_trips_through_diffusers(cifar10_diffusers, tmp_path):
    folder, model = cifar10_diffusers
    save_diffusers(fastddpm.load(folder), tmp_path)
    again = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    sched = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert sched.config.variance_type == "fixed_large" and sched.config.clip_sample
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 10])
    theirs, ours = model.state_dict(), again.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    with torch.no_grad():
        assert (again(x, t).sample - model(x, t).sample).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip", [True, False])
def test_whole_sampling_run_equals_ddpm_pipeline(tiny_diffusers, variance, clip):
    """Same seed, same weights: the same images as diffusers' DDPMPipeline (T = 20)."""
    folder, model = tiny_diffusers
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder, variance_type=variance, clip_sample=clip)
    pipe = diffusers.DDPMPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=20, output_type="np"
    ).images
    sampler = fastddpm.load(folder)
    ours = sampler.sample(
        3,
        generator=torch.Generator().manual_seed(5),
        progress=False,
        variance=variance.replace("_", ""),
        clip_x0=clip,
    )
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
