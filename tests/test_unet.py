"""The paper's U-Net: presets, parameter names, shapes."""

import pytest
import torch

from fastddpm.checkpoints import native_to_diffusers_key
from fastddpm.unet import PRESETS, UNet, UNetConfig, preset, timestep_embedding

from .conftest import reference_json


def test_cifar10_preset_has_the_papers_parameter_count():
    assert sum(p.numel() for p in UNet(preset("cifar10")).parameters()) == 35_746_307


def test_native_names_are_pytorch_diffusions():
    keys = UNet(preset("cifar10")).state_dict().keys()
    assert sorted(keys) == sorted(reference_json("pytorch_diffusion_state_dict_keys.json"))


def test_native_names_map_onto_every_diffusers_name():
    keys = UNet(preset("cifar10")).state_dict().keys()
    mapped = sorted(native_to_diffusers_key(k, levels=4) for k in keys)
    assert mapped == sorted(reference_json("diffusers_state_dict_keys.json"))


@pytest.mark.parametrize("name", ["lsun256", "celebahq256"])
def test_256_presets(name):
    cfg = preset(name)
    assert cfg.ch_mult == (1, 1, 2, 2, 4, 4) and cfg.resolution == 256 and cfg.attn_resolutions == (16,)
    unet = UNet(cfg)
    assert len(unet.down) == 6 and unet.mid.attn_1.q.weight.shape == (512, 512, 1, 1)
    assert len(unet.down[4].attn) == 2 and all(len(unet.down[i].attn) == 0 for i in (0, 1, 2, 3, 5))


def test_tiny_preset_forward_shape_and_t_forms():
    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"]).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = unet(x, torch.tensor([7, 7, 7]))
        assert out.shape == x.shape
        torch.testing.assert_close(unet(x, 7), out, rtol=0, atol=0)
        torch.testing.assert_close(unet(x, torch.tensor(7)), out, rtol=0, atol=0)
        # Fully convolutional: other sizes divisible by 2^(levels - 1) work too.
        assert unet(torch.randn(1, 3, 8, 24), 3).shape == (1, 3, 8, 24)


def test_timestep_embedding_is_sin_then_cos():
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.exp(-torch.arange(4) * torch.log(torch.tensor(10000.0)) / 3)
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(10 * freqs), torch.cos(10 * freqs)]))


def test_multi_head_attention_splits_channels():
    cfg = UNetConfig(**{**PRESETS["tiny"].to_dict(), "attn_head_dim": 8})
    assert UNet(cfg).mid.attn_1.heads == 64 // 8
    assert UNet(PRESETS["tiny"]).mid.attn_1.heads == 1


def test_config_round_trips_through_a_dict():
    cfg = preset("lsun256")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
