"""The paper's U-Net: presets, parameter names, shapes."""

import pytest
import torch
import torch.nn.functional as F

from fastddpm.checkpoints import native_to_diffusers_key
from fastddpm.unet import (
    PRESETS,
    AttnBlock,
    ResnetBlock,
    UNet,
    UNetConfig,
    add_pointwise_,
    preset,
    timestep_embedding,
)

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


# --- the fused forms equal the plain formulas -------------------------------------------------------


def _formats(x: torch.Tensor) -> list[torch.Tensor]:
    return [x.contiguous(), x.contiguous(memory_format=torch.channels_last)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_add_pointwise_is_a_1x1_convolution_accumulated_in_place(channels_last):
    torch.manual_seed(0)
    acc, x = torch.randn(2, 6, 3, 5), torch.randn(2, 4, 3, 5)
    weight = torch.randn(6, 4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    expected = acc + F.conv2d(x, weight[:, :, None, None])
    for x_in in _formats(x):  # x is read in place in either layout
        out = acc.clone(memory_format=fmt)
        flat = out.view(2, 6, 15)
        assert add_pointwise_(flat, weight, x_in.flatten(2)) is flat
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=fmt)


def _resnet_formula(block: ResnetBlock, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """The block as the paper writes it: GN, SiLU, conv3, + temb, GN, SiLU, conv3, + shortcut(x)."""
    groups, eps = block.norm1.num_groups, block.norm1.eps
    h = block.conv1(F.silu(F.group_norm(x, groups, block.norm1.weight, block.norm1.bias, eps)))
    h = h + temb[:, :, None, None]
    h = block.conv2(F.silu(F.group_norm(h, groups, block.norm2.weight, block.norm2.bias, eps)))
    return (x if block.nin_shortcut is None else block.nin_shortcut(x)) + h


@pytest.mark.parametrize("c_in", [16, 24])  # an identity shortcut, a 1x1 one
def test_resnet_block_equals_its_formula(c_in):
    torch.manual_seed(0)
    block = ResnetBlock(c_in, 16, 32, PRESETS["tiny"]).eval()
    x, temb = torch.randn(2, c_in, 8, 8), torch.randn(2, 16)
    expected = _resnet_formula(block, x, temb)
    with torch.no_grad():
        for x_in in _formats(x):
            out = block(x_in, temb, "torch")
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert out.stride() == block.conv1(x_in).stride()  # x's memory format


def _attention_formula(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """x + proj_out(softmax(q^T k / sqrt(D)) v) per head, q, k, v the 1x1 convs of GN(x)."""
    N, C, H, W = x.shape
    heads, D = block.heads, C // block.heads
    h = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    q, k, v = (conv(h).reshape(N, heads, D, H * W) for conv in (block.q, block.k, block.v))
    p = torch.softmax(q.transpose(-1, -2) @ k / D**0.5, dim=-1)  # (N, heads, L, L)
    o = (v @ p.transpose(-1, -2)).reshape(N, C, H, W)
    return x + block.proj_out(o)


@pytest.mark.parametrize("head_dim", [None, 8])
def test_attention_block_equals_its_formula(head_dim):
    torch.manual_seed(0)
    cfg = UNetConfig(**{**PRESETS["tiny"].to_dict(), "attn_head_dim": head_dim})
    block = AttnBlock(32, cfg).eval()
    x = torch.randn(2, 32, 4, 6)
    expected = _attention_formula(block, x)
    with torch.no_grad():
        for x_in in _formats(x):
            out = block(x_in, "torch")
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert out.stride() == x_in.stride()


def test_time_projections_are_each_blocks_in_call_order(monkeypatch):
    """One GEMM gives every block temb_proj(SiLU(temb)) + conv1.bias (conv1's bias rides in GN2's
    add), in the order forward runs the blocks."""
    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"]).eval()
    blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock)]
    assert sorted(map(id, unet.resnet_blocks())) == sorted(map(id, blocks))
    silu_temb = torch.randn(3, 4 * unet.config.ch)
    called, run = [], ResnetBlock.run

    def spy(block, x, temb_b, *args, **kwargs):
        called.append((block, temb_b))
        return run(block, x, temb_b, *args, **kwargs)

    monkeypatch.setattr(ResnetBlock, "run", spy)
    with torch.no_grad():
        projections = unet.time_projections(silu_temb)
        unet(torch.randn(3, 3, 16, 16), 5)
    assert [m for m, _ in called] == list(unet.resnet_blocks())
    for (block, temb), projection in zip(called, projections, strict=True):
        expected = block.temb_proj(silu_temb) + block.conv1.bias
        torch.testing.assert_close(projection, expected, rtol=1e-6, atol=1e-6)
        assert temb.shape == projection.shape


def test_bf16_autocast_forward_and_backward_run_as_training_does():
    """Training runs the U-Net under bf16 autocast (on CUDA; the CPU's autocast casts the same ops):
    the in-place GEMMs take their operands in the accumulator's dtype."""
    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"]).train()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = unet(x, t)
    y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16 and all(p.grad is not None for p in unet.parameters())
    with torch.no_grad():
        ref = unet.eval()(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = unet(x, t)
    assert (low.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
