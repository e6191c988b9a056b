"""Sampler behaviour: seeding, batching, steps, callbacks, output range."""

import pytest
import torch

import fastddpm
from fastddpm.unet import PRESETS, UNet


@pytest.fixture(scope="module")
def sampler():
    torch.manual_seed(0)
    return fastddpm.Sampler(UNet(PRESETS["tiny"]).eval(), fastddpm.DiffusionConfig(num_timesteps=30))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_seeded_runs_repeat_and_differ(sampler):
    a = sampler.sample(2, generator=seeded(1), progress=False)
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.float32
    torch.testing.assert_close(sampler.sample(2, generator=seeded(1), progress=False), a, rtol=0, atol=0)
    assert not torch.equal(sampler.sample(2, generator=seeded(2), progress=False), a)


def test_philox_seed_noise_is_the_documented_stream(sampler):
    """seed=s draws x_T at offset b*(S+1) and step i's z at b*(S+1)+i+1: rebuild it by hand."""
    from fastddpm import ops
    from fastddpm.reference import philox_normal

    table = sampler.step_table(steps=5)
    got = sampler.sample(3, steps=5, seed=7, batch_size=2, progress=False)
    expected = []
    for b, size in enumerate([2, 1]):
        x = philox_normal(7, b * 6, (size, 3, 16, 16))
        for i in reversed(range(5)):
            eps = sampler.unet(x, table.timesteps[i].expand(size))
            z = philox_normal(7, b * 6 + i + 1, x.shape)
            x = ops.ddpm_step(x, eps, i, table, noise=z, backend="torch")
        expected.append(x)
    torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=0)
    assert not torch.equal(sampler.sample(3, steps=5, seed=8, batch_size=2, progress=False), got)


def test_philox_seed_ignores_the_global_generator(sampler):
    torch.manual_seed(0)
    a = sampler.sample(2, steps=3, seed=1, progress=False)
    torch.manual_seed(1)
    torch.testing.assert_close(sampler.sample(2, steps=3, seed=1, progress=False), a, rtol=0, atol=0)


def test_clipped_samples_lie_in_minus_one_one(sampler):
    x = sampler.sample(4, generator=seeded(0), progress=False)
    assert x.min() >= -1 and x.max() <= 1


def test_batches_concatenate(sampler):
    x_T = torch.randn(5, 3, 16, 16)
    whole = sampler.sample(5, x_T=x_T, method="ddim", steps=5, progress=False)
    batched = sampler.sample(5, x_T=x_T, method="ddim", steps=5, batch_size=2, progress=False)
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-6)


def test_respaced_runs_call_the_network_with_original_t(sampler):
    seen = []
    hook = sampler.unet.register_forward_hook(lambda m, args, out: seen.append(int(args[1][0])))
    try:
        sampler.sample(1, steps=4, progress=False, generator=seeded(0))
    finally:
        hook.remove()
    assert seen == [29, 19, 10, 0]


def test_ddim_eta0_is_deterministic_given_x_T(sampler):
    x_T = torch.randn(2, 3, 16, 16)
    a = sampler.sample(2, x_T=x_T, method="ddim", steps=10, generator=seeded(1), progress=False)
    b = sampler.sample(2, x_T=x_T, method="ddim", steps=10, generator=seeded(2), progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_callback_sees_predicted_x0_every_k_steps(sampler):
    calls = []
    out = sampler.sample(
        2,
        generator=seeded(3),
        progress=False,
        callback_every=10,
        callback=lambda i, t, x, x0: calls.append((i, t, x0.clone())),
    )
    assert [(i, t) for i, t, _ in calls] == [(20, 20), (10, 10), (0, 0)]
    assert all(x0.min() >= -1 and x0.max() <= 1 for _, _, x0 in calls)
    # At the last step the prediction is the sample: coef_x0 = 1 and coef_xt = 0 there.
    torch.testing.assert_close(calls[-1][2], out, rtol=0, atol=1e-6)


def test_progress_bar_can_be_turned_off(sampler, capsys):
    sampler.sample(1, steps=3, progress=False, generator=seeded(0))
    assert capsys.readouterr().err == ""
    sampler.sample(1, steps=3, progress=True, generator=seeded(0))
    assert "3/3" in capsys.readouterr().err


def test_bad_sample_arguments(sampler):
    with pytest.raises(ValueError, match="n must be a positive int"):
        sampler.sample(0)
    with pytest.raises(ValueError, match=r"x_T must have shape \(2, 3, 16, 16\)"):
        sampler.sample(2, x_T=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="at most one of generator= and seed="):
        sampler.sample(1, seed=1, generator=seeded(1))
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
            sampler.sample(1, seed=bad)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": 5.0}, "steps must be None"),
        ({"steps": [5]}, "steps must be None"),
        ({"steps": True}, "steps must be None"),
        ({"steps": 0}, "steps must be None"),
        ({"steps": "abc"}, "steps must be None"),
        ({"steps": "ddimx"}, "steps must be None"),
        ({"steps": "10,"}, "steps must be None"),
        ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
        ({"batch_size": True}, "batch_size must be a positive int, got True"),
        ({"batch_size": 1.5}, "batch_size must be a positive int"),
        ({"eta": float("nan"), "method": "ddim"}, "eta must be a finite number >= 0, got nan"),
        ({"eta": float("inf"), "method": "ddim"}, "eta must be a finite number >= 0, got inf"),
        ({"eta": -0.5, "method": "ddim"}, "eta must be a finite number >= 0"),
        ({"eta": "1", "method": "ddim"}, "eta must be a finite number >= 0"),
        ({"eta": 0.5}, "eta applies to method 'ddim'"),
        ({"callback_every": 0}, "callback_every must be a positive int"),
    ],
)
def test_bad_steps_eta_and_counts_are_refused(sampler, options, message):
    with pytest.raises(ValueError, match=message):
        sampler.sample(2, progress=False, **options)


@pytest.mark.parametrize("n", [True, 2.0, "2", None, -1])
def test_n_must_be_a_positive_int(sampler, n):
    with pytest.raises(ValueError, match="n must be a positive int"):
        sampler.sample(n, progress=False)


def test_a_spacing_string_of_digits_is_a_step_count(sampler):
    x_T = torch.randn(1, 3, 16, 16)
    a = sampler.sample(1, x_T=x_T, steps="4", method="ddim", progress=False)
    torch.testing.assert_close(a, sampler.sample(1, x_T=x_T, steps=4, method="ddim", progress=False))


def test_non_finite_samples_name_their_batch(sampler):
    """A NaN anywhere in batch 1 (images 2..3) is reported, naming it, never returned."""
    x_T = torch.randn(5, 3, 16, 16)
    x_T[3, 0, 0, 0] = float("nan")
    with pytest.raises(fastddpm.loop.NonFiniteSamplesError, match=r"^batch 1 \(images 2..3\) produced"):
        sampler.sample(5, x_T=x_T, steps=3, method="ddim", batch_size=2, progress=False)
    x_T[3, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"batch 1 \(images 2..3\) produced non-finite values \((NaN|Inf)\)"):
        sampler.sample(5, x_T=x_T, steps=3, method="ddim", batch_size=2, progress=False, clip_x0=False)


def test_a_nan_weight_is_caught_with_or_without_clipping():
    unet = UNet(PRESETS["tiny"]).eval()
    with torch.no_grad():
        unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    broken = fastddpm.Sampler(unet, fastddpm.DiffusionConfig(num_timesteps=10))
    for clip in (True, False):
        with pytest.raises(ValueError, match=r"batch 0 \(images 0..1\) produced non-finite values \(NaN\)"):
            broken.sample(2, steps=2, seed=0, clip_x0=clip, progress=False)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"clip_x0": "false"}, "clip_x0 must be true or false"),
        ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start 0.5 is above beta_end 0.1"),
        ({"num_timesteps": True}, "num_timesteps must be an int"),
        ({"beta_end": float("nan")}, "beta_end"),
    ],
)
def test_a_diffusion_config_built_in_python_goes_through_the_schema(setting, message):
    with pytest.raises(ValueError, match=message):
        fastddpm.DiffusionConfig(**setting)
