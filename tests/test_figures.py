"""The paper's pictures (fastddpm.figures): progressive generation, interpolation, and their CLI."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastddpm
from fastddpm import checkpoints, figures
from fastddpm.cli import main
from fastddpm.images import to_rgb, to_uint8
from fastddpm.noise import randn

from .conftest import tiny_unet

T = 30  # the tiny sampler's diffusion length


@pytest.fixture(scope="module")
def sampler():
    return fastddpm.Sampler(tiny_unet(backend="torch"), fastddpm.DiffusionConfig(num_timesteps=T))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blocks(png: np.ndarray, rows: int, cols: int, size: int) -> np.ndarray:
    """A (rows*size, cols*size, 3) strip -> (rows, cols, size, size, 3) images."""
    assert png.shape == (rows * size, cols * size, 3)
    return png.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4)


# --- progressive generation ---------------------------------------------------------------------


def test_strip_steps_columns_and_timesteps():
    full = list(range(1000))
    assert figures.strip_steps(full, columns=5) == [999, 749, 500, 250, 0]
    assert figures.strip_steps(full) == [999, 856, 714, 571, 428, 285, 143, 0]  # 8 columns by default
    assert figures.strip_steps(full, columns=1000) == list(reversed(full))  # every step, none twice
    assert figures.strip_steps(full, columns=1) == [0]
    assert figures.strip_steps(full, timesteps=[0, 500, 999, 250]) == [999, 500, 250, 0]
    assert figures.strip_steps(full, timesteps=[999, 10]) == [999, 10, 0]  # the samples' column is added
    respaced = [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]  # steps=10
    assert figures.strip_steps(respaced, timesteps=[999, 555]) == [9, 5, 0]
    assert figures.strip_steps(respaced, columns=4) == [9, 6, 3, 0]


def test_strip_steps_errors():
    full = list(range(1000))
    with pytest.raises(ValueError, match="columns or its timesteps, not both"):
        figures.strip_steps(full, columns=3, timesteps=[500])
    for columns in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match=r"columns must be an int in \[1, 1000\]"):
            figures.strip_steps(full, columns=columns)
    with pytest.raises(ValueError, match=r"timesteps \[1000, 750\] are not among the 10 the sampler visits"):
        figures.strip_steps([0, 111, 222, 333, 444, 555, 666, 777, 888, 999], timesteps=[1000, 750])
    with pytest.raises(ValueError, match="timesteps must be ints"):
        figures.strip_steps(full, timesteps=[0.5])


def test_progress_strip_layout_and_last_column(sampler, tmp_path):
    """A row per sample (across batches), x0_pred at the chosen steps, the samples last; the PNG
    is rows*H x cols*W times the scale and holds exactly those images."""
    n, rows, scale = 5, 4, 3
    x0, frames, ts = figures.progress_strip(
        sampler, n, columns=4, rows=rows, batch_size=2, generator=seeded(1), progress=False
    )
    assert ts == [29, 19, 10, 0]
    assert frames.shape == (rows, 4, 3, 16, 16)
    # The samples are the sampler's own, and the last column is them, exactly.
    torch.testing.assert_close(x0, sampler.sample(n, batch_size=2, generator=seeded(1), progress=False))
    assert torch.equal(frames[:, -1], x0[:rows])
    # The other columns are the callback's x0_pred at t = 29, 19, 10, sample by sample.
    seen = {}
    sampler.sample(
        n,
        batch_size=2,
        generator=seeded(1),
        progress=False,
        callback_every=1,
        callback=lambda i, t, x, x0_pred: seen.setdefault(t, []).append(x0_pred.clone()),
    )
    for k, t in enumerate(ts[:-1]):
        assert torch.equal(frames[:, k], torch.cat(seen[t])[:rows])
    assert not torch.equal(frames[:, 0], frames[:, -1])

    path = tmp_path / "strip.png"
    figures.save_strip(path, frames, scale=scale)
    png = np.asarray(Image.open(path))
    cells = blocks(png, rows, 4, 16 * scale)[:, :, ::scale, ::scale]  # undo the scaling
    np.testing.assert_array_equal(cells[:, -1], to_rgb(to_uint8(x0[:rows])))
    for r in range(rows):
        np.testing.assert_array_equal(cells[r], to_rgb(to_uint8(frames[r])))


def test_progress_strip_options_errors(sampler):
    with pytest.raises(ValueError, match=r"rows must be an int in \[1, 2\]"):
        figures.progress_strip(sampler, 2, rows=3, progress=False)
    with pytest.raises(ValueError, match="sets the sampler's callback itself"):
        figures.progress_strip(sampler, 2, callback=print, progress=False)
    with pytest.raises(ValueError, match=r"timesteps \[8\] are not among"):
        figures.progress_strip(sampler, 2, steps=5, timesteps=[8], progress=False)
    with pytest.raises(ValueError, match=r"expected frames \(R, K, C, H, W\)"):
        figures.save_strip("unused.png", torch.zeros(2, 3, 16, 16))


# --- starting the reverse process at step t (Sampler.sample(start_step=)) --------------------------


def test_start_step_runs_the_tail_of_the_chain(sampler):
    """DDIM with eta = 0 is deterministic: restarting at step k from the full run's x_k gives the
    full run's sample; with start_step = S-1 it is the whole chain."""
    x_T = torch.randn(2, 3, 16, 16, generator=seeded(0))
    kept = {}
    full = sampler.sample(
        2,
        x_T=x_T,
        method="ddim",
        steps=10,
        progress=False,
        callback_every=1,
        callback=lambda i, t, x, x0_pred: kept.setdefault(i, x.clone()),
    )
    tail = sampler.sample(2, x_T=kept[4], start_step=4, method="ddim", steps=10, progress=False)
    torch.testing.assert_close(tail, full, rtol=0, atol=0)
    whole = sampler.sample(2, x_T=x_T, start_step=9, method="ddim", steps=10, progress=False)
    torch.testing.assert_close(whole, full, rtol=0, atol=0)
    assert not torch.equal(kept[4], full)


def test_start_step_errors(sampler):
    with pytest.raises(ValueError, match="start_step needs x_T"):
        sampler.sample(1, start_step=3, progress=False)
    for bad in (T, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"start_step must be an int in \[0, {T - 1}\]"):
            sampler.sample(1, x_T=torch.zeros(1, 3, 16, 16), start_step=bad, progress=False)


# --- interpolation ------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 500, 999])
def test_encode_has_the_moments_of_q_xt_given_x0(t):
    """x_t ~ N(sqrt(abar_t) x0, (1 - abar_t) I): sample means and standard deviations over
    N draws, per pixel, within 6 standard errors."""
    schedule = fastddpm.DiffusionConfig().schedule()
    abar = float(schedule.abar[t])
    x0 = torch.rand(1, 3, 4, 4, generator=seeded(0)) * 2 - 1
    N = 20000
    x_t = figures.encode(x0, t, torch.randn(N, 3, 4, 4, generator=seeded(1)), schedule)
    sd = math.sqrt(1 - abar)
    assert (x_t.mean(0) - math.sqrt(abar) * x0[0]).abs().max() < 6 * sd / math.sqrt(N)
    assert (x_t.std(0) - sd).abs().max() < 6 * sd / math.sqrt(2 * N)
    with pytest.raises(ValueError, match=r"t must be in \[0, 999\]"):
        figures.encode(x0, 1000, x0, schedule)


def test_interpolation_endpoints_decode_x_t_and_x_t_prime(sampler):
    """lambda = 0 and 1 are the reverse process from x_t and x_t' themselves, with the noise that
    follows eps on the seeded generator; a middle lambda decodes the mix with the same noise."""
    x0a = torch.rand(3, 16, 16, generator=seeded(2)) * 2 - 1
    x0b = torch.rand(3, 16, 16, generator=seeded(3)) * 2 - 1
    t, k = 20, 20  # all T steps: step index = t
    out = figures.interpolate(sampler, x0a, x0b, t=t, lambdas=[0.0, 0.5, 1.0], seed=4)
    assert out.shape == (3, 3, 16, 16)

    def direct(mix: float) -> torch.Tensor:
        g = seeded(4)
        eps = randn((1, 3, 16, 16), g, torch.device("cpu"))
        abar = float(sampler.diffusion.schedule().abar[t])
        x_t = (1 - mix) * (math.sqrt(abar) * x0a + math.sqrt(1 - abar) * eps)
        x_t = x_t + mix * (math.sqrt(abar) * x0b + math.sqrt(1 - abar) * eps)
        return sampler.sample(1, x_T=x_t, start_step=k, generator=g, progress=False)[0]

    torch.testing.assert_close(out[0], direct(0.0), rtol=0, atol=0)
    torch.testing.assert_close(out[2], direct(1.0), rtol=0, atol=0)
    torch.testing.assert_close(out[1], direct(0.5), rtol=0, atol=0)
    assert not torch.allclose(out[0], out[2], atol=1e-2)


def test_interpolation_strip_rows_and_sources(sampler):
    x0a, x0b = torch.zeros(3, 16, 16), torch.ones(3, 16, 16) * 0.5
    frames = figures.interpolation_strip(sampler, x0a, x0b, [10, 29], lambdas=4, steps=10, seed=1)
    assert frames.shape == (2, 6, 3, 16, 16)
    assert torch.equal(frames[:, 0], x0a.expand(2, 3, 16, 16))
    assert torch.equal(frames[:, -1], x0b.expand(2, 3, 16, 16))
    row = figures.interpolate(sampler, x0a, x0b, t=29, lambdas=4, steps=10, seed=1)
    assert torch.equal(frames[1, 1:-1], row)
    bare = figures.interpolation_strip(sampler, x0a, x0b, [10], lambdas=4, steps=10, sources=False)
    assert bare.shape == (1, 4, 3, 16, 16)


def test_interpolation_errors(sampler):
    x = torch.zeros(3, 16, 16)
    with pytest.raises(ValueError, match=r"x0_prime must have the model's image shape \(3, 16, 16\)"):
        figures.interpolate(sampler, x, torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match=r"t = 15 is not among the 10 timesteps the sampler visits"):
        figures.interpolate(sampler, x, x, t=15, steps=10)
    with pytest.raises(ValueError, match="the number of lambdas must be at least 2"):
        figures.interpolate(sampler, x, x, t=10, lambdas=1)
    with pytest.raises(ValueError, match=r"lambdas must be values in \[0, 1\]"):
        figures.interpolate(sampler, x, x, t=10, lambdas=[0.0, 1.5])
    assert figures.lambdas_from(11) == pytest.approx([k / 10 for k in range(11)])
    with pytest.raises(ValueError, match="give at least one t"):
        figures.interpolation_strip(sampler, x, x, [])


def test_read_image_round_trips_and_checks_the_size(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    x = figures.read_image(tmp_path / "grey.png", 1, 8)
    assert x.shape == (1, 8, 8) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x[None])[0, :, :, 0], pixels)
    rgb = figures.read_image(tmp_path / "grey.png", 3, 8)  # grey -> RGB: three equal channels
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[0], rgb[2])
    with pytest.raises(ValueError, match=r"grey.png is 8x8; the model takes 16x16 images: resize it first"):
        figures.read_image(tmp_path / "grey.png", 1, 16)
    with pytest.raises(ValueError, match="1 or 3 channels, not 4"):
        figures.read_image(tmp_path / "grey.png", 4, 8)


# --- the command line, with the bundled digits model ----------------------------------------------


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastddpm", *args, "--no-progress"], capture_output=True, text=True, cwd=cwd
    )


@pytest.fixture(scope="module")
def digits():
    return fastddpm.load(str(checkpoints.DEFAULT_MODEL))


def test_cli_progress_strip(digits, tmp_path):
    out = run(
        "sample",
        "-n",
        "3",
        "--steps",
        "10",
        "--seed",
        "5",
        "--progress-strip",
        "strip.png",
        "--strip-steps",
        "999,555",
        "--png-scale",
        "2",
        "--precision",
        "fp32",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "predicted x0 at t = 999, 555, then the samples" in out.stdout
    assert not (tmp_path / "samples.png").exists()  # only the strip was asked for
    cells = blocks(np.asarray(Image.open(tmp_path / "strip.png")), 3, 3, 16)[:, :, ::2, ::2]
    x = digits.sample(3, steps=10, generator=seeded(5), progress=False)
    np.testing.assert_array_equal(cells[:, -1], to_rgb(to_uint8(x)))


def test_cli_interpolate_from_seeds_and_from_images(digits, tmp_path):
    out = run(
        "interpolate",
        "--seeds",
        "2,5",
        "--steps",
        "10",
        "--t",
        "555",
        "--lambdas",
        "3",
        "--png-scale",
        "2",
        "--out",
        str(tmp_path / "seeds.png"),
    )
    assert out.returncode == 0, out.stderr
    cells = blocks(np.asarray(Image.open(tmp_path / "seeds.png")), 1, 5, 16)[0, :, ::2, ::2]
    sources = [digits.sample(1, steps=10, generator=seeded(s), progress=False) for s in (2, 5)]
    np.testing.assert_array_equal(cells[0], to_rgb(to_uint8(sources[0]))[0])
    np.testing.assert_array_equal(cells[-1], to_rgb(to_uint8(sources[1]))[0])

    for name, image in zip(("a.png", "b.png"), cells[[0, -1]], strict=True):
        Image.fromarray(image).save(tmp_path / name)  # RGB files, read back as grey
    out = run(
        "interpolate",
        str(tmp_path / "a.png"),
        str(tmp_path / "b.png"),
        "--steps",
        "10",
        "--t",
        "111,999",
        "--lambdas",
        "0,1",
        "--no-sources",
        "--out",
        str(tmp_path / "files.png"),
    )
    assert out.returncode == 0, out.stderr
    assert np.asarray(Image.open(tmp_path / "files.png")).shape == (2 * 8, 2 * 8, 3)
    a, b = (figures.read_image(tmp_path / n, 1, 8) for n in ("a.png", "b.png"))
    expected = figures.interpolation_strip(digits, a, b, [111, 999], lambdas=[0, 1], steps=10, sources=False)
    cells = blocks(np.asarray(Image.open(tmp_path / "files.png")), 2, 2, 8)
    np.testing.assert_array_equal(cells, to_rgb(to_uint8(expected.flatten(0, 1))).reshape(2, 2, 8, 8, 3))


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--strip-columns", "4"], "--strip-columns needs --progress-strip FILE.png"),
        (
            ["sample", "--steps", "10", "--progress-strip", "s.png", "--strip-steps", "500"],
            "timesteps [500] are not among the 10 the sampler visits",
        ),
        (
            ["sample", "-n", "2", "--progress-strip", "s.png", "--strip-rows", "3"],
            "rows must be an int in [1, 2]",
        ),
        (["interpolate", "one.png"], "interpolate takes two images, or --seeds A,B"),
        (["interpolate", "--seeds", "1,2,3"], "--seeds takes two seeds A,B, got 3"),
        (["interpolate", "--steps", "10", "--t", "500"], "t = 500 is not among the 10 timesteps"),
        (["interpolate", "--t", "1000"], "t = 1000 is not among the 1000 timesteps"),
        (["interpolate", "--lambdas", "1"], "the number of lambdas must be at least 2"),
        (["interpolate", "--png-scale", "0"], "argument --png-scale: expected a positive int, got '0'"),
    ],
)
def test_cli_errors(args, message, tmp_path, monkeypatch, capsys):
    """Bad options end the command (in this process: fastddpm.cli.main) with one line and status 1."""
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_interpolate_rejects_an_image_of_another_size(tmp_path, capsys):
    Image.new("L", (16, 16)).save(tmp_path / "big.png")
    assert main(["interpolate", str(tmp_path / "big.png"), str(tmp_path / "big.png")]) == 1
    assert "big.png is 16x16; the model takes 8x8 images: resize it first" in capsys.readouterr().err
