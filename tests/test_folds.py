"""The U-Net's folded forward (pending biases, stacked weights, the transposed-convolution
Upsample) equals its unfolded formula, and the kept folded tensors (fastddpm.folds) follow the
weights: on entering a run, on an in-place write, on a conversion."""

import pytest
import torch
import torch.nn.functional as F

import fastddpm
from fastddpm.unet import PRESETS, Act, UNet, upsample_conv_kernel


def _unet(seed: int = 0) -> UNet:
    """The tiny preset with every bias non-zero (a zero bias would hide a bias folded wrongly)."""
    torch.manual_seed(seed)
    unet = UNet(PRESETS["tiny"], backend="torch").eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return unet


def test_upsample_kernel_is_nearest_upsampling_then_the_convolution():
    torch.manual_seed(0)
    weight, x = torch.randn(5, 3, 3, 3), torch.randn(2, 3, 4, 6)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, padding=1)
    got = F.conv_transpose2d(x, upsample_conv_kernel(weight), stride=2, padding=1)
    assert got.shape == expected.shape == (2, 5, 8, 12)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_act_value_adds_the_pending_bias():
    a, p = torch.randn(2, 3, 4, 4), torch.randn(3)
    torch.testing.assert_close(Act(a, p).value(), a + p[:, None, None])
    assert Act(a).value() is a and Act(a).add() is None
    assert Act(a, p).add().shape == (2, 3) and Act(a, p).add().stride() == (0, 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_kept_folds_give_the_forward_that_computes_them_and_the_training_one(channels_last):
    """Inside frozen() (kept folds, attention in place), outside (computed each forward) and with
    gradients (training's path): one function of x and t, in either layout."""
    unet = _unet()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([3, 500, 999])
    x_in = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.enable_grad():
        trained = unet(x_in, t)
    with torch.no_grad():
        plain = unet(x_in, t)
        with unet._folds.frozen(unet):
            first, second = unet(x_in, t), unet(x_in, t)
        assert len(unet._folds) > 0
    torch.testing.assert_close(x_in, x)  # the input is not overwritten
    for out in (plain, first, second):
        torch.testing.assert_close(out, trained.detach(), rtol=1e-5, atol=1e-5)


def test_the_folded_forward_equals_diffusers_unet(tmp_path):
    """The same weights in diffusers' UNet2DModel (its own convolutions, biases and
    concatenations) give the same eps, inside a sampling run's frozen() scope."""
    diffusers = pytest.importorskip("diffusers")
    from fastddpm.checkpoints import native_to_diffusers_key, unet_config_to_diffusers

    unet = _unet(1)
    config = unet_config_to_diffusers(unet.config)
    ref = diffusers.UNet2DModel.from_config(config).eval()
    levels = len(unet.config.ch_mult)
    state = {native_to_diffusers_key(k, levels=levels): v for k, v in unet.state_dict().items()}
    ref.load_state_dict({k: v.reshape(ref.state_dict()[k].shape) for k, v in state.items()})
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad(), unet._folds.frozen(unet):
        unet(x, t)
        got = unet(x, t)
        expected = ref(x, t).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_weights_changed_between_runs_by_any_means_are_seen():
    """Entering frozen() recomputes the kept tensors, so a write through .data (which no version
    counter sees) between two runs changes the next run's output; in place: same addresses."""
    unet, other = _unet(0), _unet(1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    with torch.no_grad():
        expected = other(x, t)
        with unet._folds.frozen(unet):
            unet(x, t)
        addresses = [value.data_ptr() for _, value in unet._folds._kept.values()]
        for p, q in zip(unet.parameters(), other.parameters(), strict=True):
            p.data.copy_(q.data)
        with unet._folds.frozen(unet):
            got = unet(x, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [value.data_ptr() for _, value in unet._folds._kept.values()] == addresses


def test_an_in_place_write_within_a_run_and_a_conversion_are_seen():
    unet, other = _unet(0), _unet(1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    with torch.no_grad(), unet._folds.frozen(unet):
        unet(x, t)
        unet.load_state_dict(other.state_dict())  # param.copy_: the version counters move
        torch.testing.assert_close(unet(x, t), other(x, t), rtol=1e-5, atol=1e-5)
        generation = unet._folds.generation
        unet.to(memory_format=torch.channels_last)  # new parameter tensors: kept ones dropped
        got = unet(x, t)
        assert unet._folds.generation == generation + 1 and len(unet._folds) > 0
        torch.testing.assert_close(got, other(x, t), rtol=1e-5, atol=1e-5)


def test_kept_tensors_hold_no_activations():
    """What a run keeps depends on the weights only: the same tensors, of the same sizes, at
    batch 1 and batch 4 (a kept closure holding an activation would keep it alive)."""
    unet = _unet()
    sizes = {}
    for batch in (1, 4):
        unet._folds = type(unet._folds)()
        with torch.no_grad(), unet._folds.frozen(unet):
            unet(torch.randn(batch, 3, 16, 16), torch.full((batch,), 3))
        sizes[batch] = sorted(value.numel() for _, value in unet._folds._kept.values())
    assert sizes[1] == sizes[4] and max(sizes[1]) <= max(p.numel() for p in unet.parameters()) * 16 / 9


def test_the_sampler_runs_inside_frozen_and_a_direct_call_does_not_keep():
    unet = _unet()
    sampler = fastddpm.Sampler(unet, cuda_graph=False)
    with torch.no_grad():
        unet(torch.randn(1, 3, 16, 16), 4)
    assert len(unet._folds) == 0  # outside a run: computed at every forward
    sampler.sample(1, steps=2, seed=0, progress=False)
    assert len(unet._folds) > 0
