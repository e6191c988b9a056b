"""The `fastddpm` command, run as a real subprocess."""

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import fastddpm


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastddpm", *args], capture_output=True, text=True)


def test_info_lists_the_backends():
    out = run("info")
    assert out.returncode == 0
    assert f"fastddpm {fastddpm.__version__}" in out.stdout
    assert "backend torch: available" in out.stdout
    assert "backend triton: available" in out.stdout  # through the interpreter (tests/conftest.py)


def test_sample_without_a_model_uses_the_bundled_digits(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastddpm",
            "sample",
            "-n",
            "4",
            "--steps",
            "10",
            "--no-progress",
            "--png-scale",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape == (4 * (2 * 10 + 2), 4 * (2 * 10 + 2), 3)  # 2 x 2 digits of 8 px, 2 px padding


def test_sample_writes_png_and_npz(tiny_diffusers, tmp_path):
    folder, _ = tiny_diffusers
    png, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    out = run(
        "sample",
        "--model",
        str(folder),
        "-n",
        "5",
        "--batch-size",
        "2",
        "--steps",
        "5",
        "--out",
        str(png),
        "--npz",
        str(npz),
        "--no-progress",
        "--seed",
        "3",
    )
    assert out.returncode == 0, out.stderr
    with np.load(npz) as f:
        arr = f["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    assert np.asarray(Image.open(png)).shape == (2 * 18 + 2, 3 * 18 + 2, 3)  # 5 images: 3 per row
    # The same seed through the API gives the same images.
    x = fastddpm.load(folder).sample(
        5, steps=5, batch_size=2, progress=False, generator=torch.Generator().manual_seed(3)
    )
    np.testing.assert_array_equal(arr, fastddpm.images.to_uint8(x))


def test_ddim_sampler_option(tiny_diffusers, tmp_path):
    folder, _ = tiny_diffusers
    out = run(
        "sample",
        "--model",
        str(folder),
        "-n",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "ddim5",
        "--npz",
        str(tmp_path / "s.npz"),
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr


def test_convert_between_formats(tiny_diffusers, tmp_path):
    folder, model = tiny_diffusers
    native = tmp_path / "tiny.safetensors"
    assert run("convert", str(folder), str(native), "--to", "native").returncode == 0
    back = tmp_path / "back"
    assert run("convert", str(native), str(back), "--to", "diffusers").returncode == 0
    import diffusers

    again = diffusers.UNet2DModel.from_pretrained(back).eval()
    theirs, ours = model.state_dict(), again.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([7])
    with torch.no_grad():
        assert (again(x, t).sample - model(x, t).sample).abs().max().item() <= 1e-5
    assert fastddpm.load(native).diffusion == fastddpm.load(back).diffusion


def test_errors_are_one_line_not_a_traceback(tmp_path):
    out = run("sample", "--model", str(tmp_path / "missing"), "--out", "x.png")
    assert out.returncode == 1
    assert out.stderr.startswith("fastddpm: error: no such checkpoint") and "Traceback" not in out.stderr


def test_sample_runs_an_onnx_export_with_onnxruntime(tiny_diffusers, tmp_path):
    folder, _ = tiny_diffusers
    onnx_file = tmp_path / "tiny.onnx"
    exported = run("export", "onnx", "--model", str(folder), "--out", str(onnx_file))
    assert exported.returncode == 0, exported.stderr
    args = ("-n", "2", "--steps", "4", "--seed", "1", "--no-progress")
    assert run("sample", "--model", str(onnx_file), "--npz", str(tmp_path / "ort.npz"), *args).returncode == 0
    assert run("sample", "--model", str(folder), "--npz", str(tmp_path / "torch.npz"), *args).returncode == 0
    with np.load(tmp_path / "ort.npz") as a, np.load(tmp_path / "torch.npz") as b:
        ours, theirs = a["arr_0"].astype(int), b["arr_0"].astype(int)
    assert np.abs(ours - theirs).max() <= 1  # float32 agreement to ~1e-6 can flip a rounding


def test_philox_noise_option_gives_the_seeded_sampler_images(tiny_diffusers, tmp_path):
    folder, _ = tiny_diffusers
    npz = tmp_path / "s.npz"
    common = ("sample", "--model", str(folder), "-n", "3", "--steps", "5", "--seed", "4", "--no-progress")
    out = run(*common, "--noise", "philox", "--npz", str(npz))
    assert out.returncode == 0, out.stderr
    expected = fastddpm.load(str(folder)).sample(3, steps=5, seed=4, progress=False)
    with np.load(npz) as f:
        np.testing.assert_array_equal(f["arr_0"], fastddpm.to_uint8(expected))
    out = run(*common, "--npz", str(tmp_path / "g.npz"))  # the default: a torch.Generator
    with np.load(tmp_path / "g.npz") as f:
        assert not np.array_equal(f["arr_0"], fastddpm.to_uint8(expected))
