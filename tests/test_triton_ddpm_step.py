"""The Triton ddpm_step's own paths: its in-kernel noise in each layout the launcher can be forced
to (4 elements per Philox call, one per element, channels_last) equals the reference's Philox, the
noise kernel alone is standard normal, and the step and the noise launch under the inputs' device.
The op itself on every backend: tests/ops/test_ddpm_step.py.

Runs where tests/triton_device.py says: the interpreter on the CPU, compiled on a GPU.
"""

import math
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastddpm.kernels.ddpm_step import CHANNELS_LAST, FLAT, GROUPED, philox_normal  # noqa: E402
from fastddpm.kernels.ddpm_step import launch_ddpm_step as launch  # noqa: E402

from fastddpm import ops, reference  # noqa: E402
from fastddpm.cases import tolerance  # noqa: E402

from .ops.tables import identity_noise_table, table  # noqa: E402
from .ops.tolerance import assert_equals_reference  # noqa: E402
from .test_triton_attention import NEEDS_TWO_GPUS, assert_launched_under, guarded_launches  # noqa: E402
from .triton_device import DEVICE, RUNNABLE  # noqa: E402

pytestmark = RUNNABLE
NOISE_BOUND = tolerance(
    "ddpm_step", torch.float32
)  # math-library rounding: float32 here, float64 in the reference


# --- in-kernel noise -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, layout",
    [((3, 4, 6, 5), GROUPED), ((3, 5, 3, 3), FLAT), ((2, 4, 6, 5), FLAT), ((2, 5, 3, 7), CHANNELS_LAST)],
    ids=["grouped", "flat-ragged", "flat-forced", "channels-last"],
)
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**64 - 1, 2**32 + 9), (12345, 2**63)])
def test_in_kernel_noise_is_the_reference_layout(shape, layout, seed, offset):
    """z from the step kernel equals reference.philox_normal element for element, per (n, c, h, w),
    whatever the layout (a channels_last tensor gets the same z as a contiguous one)."""
    x = torch.zeros(shape, device=DEVICE)
    if layout == CHANNELS_LAST:
        x = x.contiguous(memory_format=torch.channels_last)
    table = identity_noise_table(DEVICE)
    z = launch(x, x, 0, table.coef, table.stochastic, seed=seed, offset=offset, clip_x0=False, layout=layout)
    ref = reference.philox_normal(seed, offset, shape)
    assert (z.cpu() - ref).abs().max().item() <= NOISE_BOUND


def test_in_kernel_noise_is_standard_normal():
    """2^18 draws: mean and variance within 5 standard errors, and the Kolmogorov-Smirnov statistic
    against the normal CDF below its critical value at significance 0.001 (asymptotic
    c(alpha) = sqrt(-ln(alpha / 2) / 2) = 1.949, D_crit = c / sqrt(n)). The draws are a fixed
    function of (seed, offset), so this is deterministic; a bad generator fails it."""
    n = 2**18
    z = philox_normal(2024, 3, (n,), DEVICE, block=4096).cpu().double()
    assert torch.equal(z[:4096], philox_normal(2024, 3, (4096,), DEVICE).cpu().double())  # other blocks
    assert (z - reference.philox_normal(2024, 3, (n,)).double()).abs().max().item() <= NOISE_BOUND
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / (n - 1))
    zs, _ = z.sort()
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < math.sqrt(-math.log(0.001 / 2) / 2) / math.sqrt(n), ks
    # Neighbouring lanes and Box-Muller partners are uncorrelated.
    for lag in (1, 2, 4):
        assert abs(torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()) < 5 / math.sqrt(n)


def test_launches_under_the_inputs_device(monkeypatch):
    """The step and the noise alone are launched inside the device guard of their tensors' device."""
    x = eps = torch.randn(2, 3, 4, 4, device=DEVICE)
    module = sys.modules[launch.__module__]
    run = lambda: ops.ddpm_step(x, eps, 5, table("fixedlarge", x.device), seed=1, backend="triton")  # noqa: E731
    assert_launched_under(guarded_launches(monkeypatch, module, run), x.device, {"_ddpm_step_kernel"})
    run = lambda: philox_normal(1, 2, (2, 3), DEVICE)  # noqa: E731
    assert_launched_under(guarded_launches(monkeypatch, module, run), x.device, {"_philox_normal_kernel"})


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels need a CUDA device")
@NEEDS_TWO_GPUS
def test_runs_on_a_gpu_that_is_not_current():
    tab = table("fixedlarge", torch.device("cuda:1"))
    x, eps, noise = (torch.randn(4, 3, 32, 32, device="cuda:1") for _ in range(3))
    i = torch.tensor([999, 500, 1, 0], device="cuda:1")
    with torch.cuda.device(0):
        with_noise = ops.ddpm_step(x, eps, i, tab, noise=noise, backend="triton")
        seeded = ops.ddpm_step(x, eps, 500, tab, seed=3, offset=2, backend="triton")
        z = philox_normal(3, 2, x.shape, "cuda:1")
    assert_equals_reference("ddpm_step", with_noise, x, eps, i, tab, noise=noise)
    assert_equals_reference("ddpm_step", seeded, x, eps, 500, tab, seed=3, offset=2)
    torch.testing.assert_close(z.cpu(), reference.philox_normal(3, 2, x.shape), rtol=0, atol=NOISE_BOUND)
