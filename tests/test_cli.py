"""The `fastddpm` command, run as a real subprocess."""

import subprocess
import sys

import numpy as np
import pytest
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
        "--precision",
        "fp32",  # the API's numbers (the CLI's default is auto)
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
    torch_run = ("sample", "--model", str(folder), "--npz", str(tmp_path / "torch.npz"))
    torch_run += ("--precision", "fp32")  # the export's
    assert run(*torch_run, *args).returncode == 0
    with np.load(tmp_path / "ort.npz") as a, np.load(tmp_path / "torch.npz") as b:
        ours, theirs = a["arr_0"].astype(int), b["arr_0"].astype(int)
    assert np.abs(ours - theirs).max() <= 1  # float32 agreement to ~1e-6 can flip a rounding


def test_philox_noise_option_gives_the_seeded_sampler_images(tiny_diffusers, tmp_path):
    folder, _ = tiny_diffusers
    npz = tmp_path / "s.npz"
    common = ("sample", "--model", str(folder), "-n", "3", "--steps", "5", "--seed", "4", "--no-progress")
    common += ("--precision", "fp32")
    out = run(*common, "--noise", "philox", "--npz", str(npz))
    assert out.returncode == 0, out.stderr
    expected = fastddpm.load(str(folder)).sample(3, steps=5, seed=4, progress=False)
    with np.load(npz) as f:
        np.testing.assert_array_equal(f["arr_0"], fastddpm.to_uint8(expected))
    out = run(*common, "--npz", str(tmp_path / "g.npz"))  # the default: a torch.Generator
    with np.load(tmp_path / "g.npz") as f:
        assert not np.array_equal(f["arr_0"], fastddpm.to_uint8(expected))


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    return out.stderr


def test_usage_errors_are_one_line_and_exit_1():
    """argparse's usage errors too: one line naming the option, status 1 like every other error."""
    err = one_line_error(run("sample", "--steps", "abc"))
    assert "argument --steps: expected a number of steps or a spacing like 10,20 or ddim50, got 'abc'" in err
    assert "argument --seed: a seed must be in [0, 2**63)" in one_line_error(
        run("sample", "--seed", str(2**70))
    )
    assert "argument --batch-size: expected a positive int, got '0'" in one_line_error(
        run("sample", "--batch-size", "0")
    )
    assert "argument --eta: expected a finite number >= 0, got 'nan'" in one_line_error(
        run("sample", "--sampler", "ddim", "--eta", "nan")
    )


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """fastddpm.cli.main(args), as run() returns it, without a new Python."""
    from fastddpm.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_sample_refuses_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = {
        ("--eta", "0.5"): "--eta applies to --sampler ddim, not --sampler ddpm",
        (
            "--out",
            "x.npz",
        ): "--out takes a FILE.png grid or a run directory; for an .npz of the samples use --npz",
        ("--out", "x.jpg"): "--out takes a FILE.png grid or a run directory",
        ("--out", ""): "--out is empty",
        ("--out", str(tmp_path / "file" / "x.png")): "is not a directory",
        ("--out", str(tmp_path / "file")): "is a file, not a run directory",
        ("--shard-size", "4"): "--shard-size applies to a run directory",
        ("--png-scale", "1000000"): "the PNG would be 42000000x42000000 pixels",
        ("--device", "meta"): "--device 'meta': fastddpm runs on cpu, cuda, mps, not meta",
    }
    for args, message in cases.items():
        assert message in one_line_error(in_process(capsys, "sample", "--steps", "2", *args)), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_grid_samples_in_batches_of_at_most_256(tmp_path):
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[0]) if isinstance(m, fastddpm.UNet) else None
    )
    try:
        from fastddpm.cli import main

        assert (
            main(["sample", "-n", "300", "--steps", "1", "--no-progress", "--out", str(tmp_path / "g.png")])
            == 0
        )
    finally:
        hook.remove()
    assert calls == [256, 44]


def test_interpolate_refuses_directories_and_broken_images(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    cases = {
        (
            str(tmp_path),
            str(tmp_path / "ok.png"),
        ): f"{tmp_path} is a directory: interpolate takes two image files",
        (str(tmp_path / "broken.png"), str(tmp_path / "ok.png")): "broken.png is not a readable image",
        (str(tmp_path / "ok.png"), str(tmp_path / "none.png")): "none.png is missing",
    }
    for images, message in cases.items():
        out = in_process(
            capsys, "interpolate", *images, "--steps", "2", "--t", "0", "--out", str(tmp_path / "i.png")
        )
        assert message in one_line_error(out), images
    ok_png = str(tmp_path / "ok.png")
    ok = in_process(capsys, "interpolate", ok_png, ok_png, "--steps", "2", "--t", "0",
                    "--out", str(tmp_path / "i.png"), "--no-progress")  # fmt: skip
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("chosen", ["bf16", "fp32"])
def test_sample_defaults_to_the_precision_auto_chooses(tiny_diffusers, tmp_path, capsys, monkeypatch, chosen):
    """No --precision: the mode precision.auto_mode picks for the device (here made to pick
    `chosen`), and the images are the API's in that mode."""
    from fastddpm import precision

    monkeypatch.setattr(precision, "auto_mode", lambda device, channels_last=False: chosen)
    folder, _ = tiny_diffusers
    npz = tmp_path / "auto.npz"
    args = ("sample", "--model", str(folder), "-n", "2", "--steps", "3", "--seed", "2", "--no-progress")
    assert in_process(capsys, *args, "--npz", str(npz)).returncode == 0
    loaded = fastddpm.load(folder)
    sampler = fastddpm.Sampler(loaded.unet, loaded.diffusion, precision=chosen)
    expected = sampler.sample(2, steps=3, progress=False, generator=torch.Generator().manual_seed(2))
    with np.load(npz) as f:
        np.testing.assert_array_equal(f["arr_0"], fastddpm.to_uint8(expected))
