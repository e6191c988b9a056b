"""Schedules and coefficient tables against diffusers and the DDPM identities."""

import numpy as np
import pytest
import torch

from fastddpm.schedule import (
    BETA_SCHEDULES,
    COEF_X0,
    COEF_XT,
    DIRECT_EPS,
    DIRECT_XT,
    SIGMA,
    SQRT_RECIP_ABAR,
    SQRT_RECIPM1_ABAR,
    Schedule,
    beta_schedule,
    space_timesteps,
)

from .conftest import require_diffusers


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("linear", "linear"),
        ("quad", "scaled_linear"),
        ("cosine", "squaredcos_cap_v2"),
        ("sigmoid", "sigmoid"),
    ],
)
def test_betas_equal_diffusers(ours, theirs):
    betas = beta_schedule(ours)
    scheduler = require_diffusers().DDPMScheduler(beta_schedule=theirs)
    ref = scheduler.betas.double().numpy()  # diffusers works in float32
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas, ref, rtol=1e-5, atol=1e-8)


def test_linear_const_jsd_definitions():
    np.testing.assert_array_equal(beta_schedule("linear")[[0, -1]], [1e-4, 0.02])
    np.testing.assert_array_equal(beta_schedule("const", 10, beta_end=0.3), np.full(10, 0.3))
    np.testing.assert_allclose(beta_schedule("jsd", 4), [1 / 4, 1 / 3, 1 / 2, 1])


@pytest.mark.parametrize("name", [n for n in BETA_SCHEDULES if n != "jsd"])
def test_every_table_is_finite_and_float64(name):
    s = Schedule.from_name(name, 100)
    for table in (
        "abar",
        "abar_prev",
        "sqrt_recip_abar",
        "beta_tilde",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ):
        values = getattr(s, table)
        assert values.dtype == np.float64 and values.shape == (100,)
        assert np.all(np.isfinite(values)), table


def test_tables_match_their_definitions():
    s = Schedule.from_name("linear")
    abar = np.cumprod(1 - s.betas)
    np.testing.assert_allclose(s.abar, abar, rtol=1e-15)
    np.testing.assert_array_equal(s.abar_prev[0], 1.0)
    np.testing.assert_allclose(s.sqrt_recip_abar * np.sqrt(abar), 1.0, rtol=1e-14)
    np.testing.assert_allclose(s.sqrt_recipm1_abar**2, 1 / abar - 1, rtol=1e-12)
    # The posterior mean of a noise-free x_t = sqrt(abar) x0 is sqrt(abar_prev) x0.
    np.testing.assert_allclose(
        s.posterior_mean_coef1 + s.posterior_mean_coef2 * np.sqrt(abar), np.sqrt(s.abar_prev), rtol=1e-12
    )
    # beta_tilde = (1 - abar_prev) / (1 - abar) * beta, and 0 at t = 0.
    assert s.beta_tilde[0] == 0.0
    np.testing.assert_allclose(s.beta_tilde[1:], (1 - abar[:-1]) / (1 - abar[1:]) * s.betas[1:], rtol=1e-13)


def test_jsd_ends_in_pure_noise():
    s = Schedule.from_name("jsd", 10)
    assert s.betas[-1] == 1.0 and s.abar[-1] == 0.0 and np.all(s.abar[:-1] > 0)


def test_log_variances_as_the_original_code():
    s = Schedule.from_name("linear")
    large, small = s.log_variance("fixedlarge"), s.log_variance("fixedsmall")
    assert large[0] == np.log(s.beta_tilde[1])
    np.testing.assert_array_equal(large[1:], np.log(s.betas[1:]))
    assert small[0] == np.log(1e-20)
    np.testing.assert_array_equal(small[1:], np.log(s.beta_tilde[1:]))


@pytest.mark.parametrize("kind, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
def test_clipped_form_and_direct_form_agree_unclipped(kind, eta):
    s = Schedule.from_name("linear").respace(50)
    coef = s.step_coefficients(kind, "fixedlarge", eta)
    rng = np.random.default_rng(0)
    x, eps = rng.standard_normal((2, 50, 8))
    x0 = coef[:, [SQRT_RECIP_ABAR]] * x - coef[:, [SQRT_RECIPM1_ABAR]] * eps
    via_x0 = coef[:, [COEF_X0]] * x0 + coef[:, [COEF_XT]] * x
    direct = coef[:, [DIRECT_XT]] * x - coef[:, [DIRECT_EPS]] * eps
    np.testing.assert_allclose(via_x0, direct, rtol=1e-9, atol=1e-9)


def test_ddim_with_eta_one_has_the_ddpm_posterior_variance():
    s = Schedule.from_name("linear")
    sigma = s.step_coefficients("ddim", eta=1.0)[:, SIGMA]
    np.testing.assert_allclose(sigma[1:] ** 2, s.beta_tilde[1:], rtol=1e-10)


def test_no_noise_at_the_last_step():
    for kind in ("ddpm", "ddim"):
        for variance in ("fixedlarge", "fixedsmall"):
            assert Schedule.from_name().step_coefficients(kind, variance, eta=1.0)[0, SIGMA] == 0.0


def test_one_step_schedule_is_the_x0_prediction():
    """Respaced to one step, sampling returns clip(x0_hat(x_T)) with no noise, for both variances."""
    for variance in ("fixedlarge", "fixedsmall"):
        coef = Schedule.from_name().respace(1).step_coefficients("ddpm", variance)
        assert coef.shape == (1, 7) and np.isfinite(coef).all() and coef[0, SIGMA] == 0.0
        assert coef[0, COEF_X0] == pytest.approx(1.0) and coef[0, COEF_XT] == pytest.approx(0.0)


def test_step_table_is_cast_once_to_float32():
    table = Schedule.from_name().respace(10).step_table("ddpm", "fixedsmall")
    assert table.coef.dtype == torch.float32 and table.coef.shape == (10, 7)
    assert table.timesteps.dtype == torch.int64 and table.stochastic
    assert not Schedule.from_name().respace(10).step_table("ddim", eta=0.0).stochastic


def test_space_timesteps_improved_ddpm_rule():
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(20, "2,3") == [0, 9, 10, 14, 19]
    assert space_timesteps(1000, 1000) == list(range(1000))


def test_respacing_keeps_abar_and_the_original_t():
    full = Schedule.from_name("cosine")
    short = full.respace(25)
    keep = space_timesteps(1000, 25)
    np.testing.assert_array_equal(short.timesteps, keep)
    # abar'_i = prod of abar ratios: exact up to float64 rounding (largest where abar ~ 1e-9).
    np.testing.assert_allclose(short.abar, full.abar[keep], rtol=1e-10)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: beta_schedule("warmup"), "unknown beta schedule 'warmup'"),
        (lambda: Schedule.from_name().log_variance("learned"), "unknown variance 'learned'"),
        (lambda: Schedule.from_name().step_coefficients("plms"), "unknown step kind 'plms'"),
        (lambda: Schedule.from_name().respace(2000), "cannot take 2000 steps"),
        (lambda: Schedule.from_name().respace("ddim600"), "cannot make exactly 600 DDIM steps"),
        (lambda: Schedule.from_name("jsd").step_coefficients(), "abar_T = 0"),
        (lambda: Schedule.from_betas([0.1, 1.5]), r"every value in \(0, 1\]"),
    ],
)
def test_bad_schedule_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
