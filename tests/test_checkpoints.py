"""Checkpoint formats: pytorch_diffusion by key name, native safetensors, pickles only on request."""

import torch
from safetensors.torch import save_file

import fastddpm
from fastddpm.checkpoints import load_native, load_pytorch_diffusion, save_native
from fastddpm.unet import PRESETS, UNet


def random_unet(name: str, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(fastddpm.preset(name)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return unet


def same_output(a: UNet, b: UNet) -> bool:
    cfg = a.config
    x = torch.randn(2, cfg.in_channels, cfg.resolution, cfg.resolution)
    with torch.no_grad():
        return torch.equal(a(x, torch.tensor([3, 400])), b(x, torch.tensor([3, 400])))


def test_pytorch_diffusion_pickle_loads_with_weights_only(tmp_path):
    unet = random_unet("cifar10")
    path = tmp_path / "ema_cifar10.ckpt"
    torch.save(unet.state_dict(), path)  # how pytorch_diffusion's files are stored
    sampler = load_pytorch_diffusion(path, "cifar10", allow_pickle=True)
    assert sampler.diffusion.variance == "fixedlarge"
    assert same_output(unet, sampler.unet)


def test_pytorch_diffusion_safetensors_and_256_variance(tmp_path):
    unet = UNet(fastddpm.preset("lsun256"))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "church.safetensors")
    sampler = fastddpm.load(tmp_path / "church.safetensors", preset_name="lsun256")
    assert sampler.diffusion.variance == "fixedsmall"
    ours, theirs = unet.state_dict(), sampler.unet.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_native_round_trip_keeps_weights_and_configs(tmp_path):
    unet = UNet(PRESETS["tiny"]).eval()
    diffusion = fastddpm.DiffusionConfig(
        beta_schedule="cosine", num_timesteps=200, variance="fixedsmall", clip_x0=False
    )
    save_native(fastddpm.Sampler(unet, diffusion), tmp_path / "tiny.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]  # no temporary left behind
    again = load_native(tmp_path / "tiny.safetensors")
    assert again.unet.config == unet.config and again.diffusion == diffusion
    assert same_output(unet, again.unet)
    assert fastddpm.load(tmp_path / "tiny.safetensors").diffusion == diffusion


def test_diffusers_folder_in_pipeline_layout(tiny_diffusers, tmp_path):
    """DDPMPipeline.save_pretrained writes unet/ and scheduler/ subfolders."""
    import diffusers

    folder, model = tiny_diffusers
    pipe = diffusers.DDPMPipeline(unet=model, scheduler=diffusers.DDPMScheduler.from_pretrained(folder))
    pipe.save_pretrained(tmp_path)
    sampler = fastddpm.load(tmp_path)
    assert sampler.diffusion.num_timesteps == 20
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([4])
    with torch.no_grad():
        assert (sampler.unet(x, t) - model(x, t).sample).abs().max().item() <= 1e-5
