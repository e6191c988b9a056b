"""Resumable sharded runs (fastddpm.runs, `fastddpm sample --out DIR`): same images, nothing redone."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastddpm
from fastddpm import checkpoints, images, runs
from tests.conftest import tiny_unet


@pytest.fixture(scope="module")
def sampler():
    return fastddpm.Sampler(tiny_unet(backend="torch"), fastddpm.DiffusionConfig(num_timesteps=20))


SPEC = runs.RunSpec(n=7, shard_size=3, batch_size=2, seed=5, steps=4)


def load(path):
    with np.load(path) as f:
        return f["arr_0"]


def test_run_writes_every_shard_and_the_npz_in_order(sampler, tmp_path):
    path = runs.run(sampler, tmp_path, SPEC, progress=False)
    got = load(path)
    assert path == tmp_path / "samples.npz" and got.shape == (7, 16, 16, 3) and got.dtype == np.uint8
    assert len({image.tobytes() for image in got}) == 7, "images must be distinct"
    for k, start in enumerate(range(0, 7, 3)):
        size = min(3, 7 - start)
        x = sampler.sample(size, steps=4, batch_size=2, seed=runs.shard_seed(5, k), progress=False)
        expected = images.to_rgb(images.to_uint8(x))
        np.testing.assert_array_equal(load(runs.shard_path(tmp_path, k)), expected)
        np.testing.assert_array_equal(got[start : start + size], expected)
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["spec"]["n"] == 7 and manifest["model"] == runs.model_fingerprint(sampler)


def test_resume_samples_only_missing_shards(sampler, tmp_path):
    whole = load(runs.run(sampler, tmp_path / "a", SPEC, progress=False))
    part = tmp_path / "b"
    runs.run(sampler, part, SPEC, progress=False)
    (part / "samples.npz").unlink()
    runs.shard_path(part, 1).unlink()
    kept = {k: runs.shard_path(part, k).stat().st_mtime_ns for k in (0, 2)}
    (part / "shards" / ".shard-000001.npz.x1y2.tmp").write_bytes(b"torn")  # a killed writer's leftover
    calls = []
    hook = sampler.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        resumed = load(runs.run(sampler, part, SPEC, progress=False))
    finally:
        hook.remove()
    assert calls == [2, 2, 2, 2, 1, 1, 1, 1], "only shard 1 (3 images: batches of 2 and 1) is sampled"
    assert {k: runs.shard_path(part, k).stat().st_mtime_ns for k in (0, 2)} == kept
    assert not list((part / "shards").glob(".*.tmp"))
    np.testing.assert_array_equal(resumed, whole)


def test_shard_seeds_are_distinct_and_stable():
    seeds = {runs.shard_seed(s, k) for s in range(3) for k in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**64 for s in seeds)
    assert runs.shard_seed(0, 1) == runs.shard_seed(0, 1)


def test_rerun_with_other_settings_is_refused(sampler, tmp_path):
    runs.run(sampler, tmp_path, SPEC, progress=False)
    other = runs.RunSpec(n=7, shard_size=3, batch_size=1, seed=5, steps=4)
    with pytest.raises(ValueError, match=r"other settings: batch_size=2 \(now 1\)"):
        runs.run(sampler, tmp_path, other, progress=False)
    different = fastddpm.Sampler(tiny_unet(backend="torch", seed=1), sampler.diffusion)
    with pytest.raises(ValueError, match="a different model"):
        runs.run(different, tmp_path, SPEC, progress=False)
    tf32 = fastddpm.Sampler(tiny_unet(backend="torch"), sampler.diffusion, precision="tf32")
    with pytest.raises(ValueError, match="precision 'float32' \\(now 'tf32'\\)"):
        runs.run(tf32, tmp_path, SPEC, progress=False)


def test_a_damaged_shard_is_named(sampler, tmp_path):
    runs.run(sampler, tmp_path, SPEC, progress=False)
    (tmp_path / "samples.npz").unlink()
    runs.shard_path(tmp_path, 2).write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=r"shard-000002\.npz is not a readable shard"):
        runs.run(sampler, tmp_path, SPEC, progress=False)
    images.save_npz(runs.shard_path(tmp_path, 2), np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"shard-000002\.npz holds uint8 \(2, 16, 16, 3\), expected"):
        runs.run(sampler, tmp_path, SPEC, progress=False)


def test_bad_specs():
    with pytest.raises(ValueError, match="n must be a positive int"):
        runs.RunSpec(n=0, shard_size=1, batch_size=1)
    with pytest.raises(ValueError, match="shard_size must be a positive int"):
        runs.RunSpec(n=1, shard_size=1.5, batch_size=1)
    with pytest.raises(ValueError, match="unknown sampling method"):
        runs.RunSpec(n=1, shard_size=1, batch_size=1, method="euler")


def test_streamed_npz_checks_its_chunks(tmp_path):
    with pytest.raises(ValueError, match="the chunks hold 2 images, but the .npz was declared with 3"):
        images.save_npz_chunks(tmp_path / "x.npz", (3, 2, 2, 3), [np.zeros((2, 2, 2, 3), np.uint8)])
    assert not (tmp_path / "x.npz").exists()


def cli(model, out, *extra):
    return [
        sys.executable, "-m", "fastddpm", "sample", "--model", str(model), "-n", "24",
        "--shard-size", "2", "--batch-size", "2", "--seed", "3",
        "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_uninterrupted_result(sampler, tmp_path):
    """SIGKILL `fastddpm sample --out DIR` after its third shard, run it again: same 24 images."""
    model = tmp_path / "tiny.safetensors"
    checkpoints.save_native(sampler, model)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cli(model, tmp_path / "whole"), check=True, env=env, timeout=600, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(model, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not runs.shard_path(out, 2).exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard written in 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "shards").glob("shard-*.npz"))
    assert 3 <= len(done) < 12 and not (out / "samples.npz").exists(), f"killed mid-run: {done}"
    before = {name: (out / "shards" / name).stat().st_mtime_ns for name in done}

    result = subprocess.run(cli(model, out), env=env, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "24 images under arr_0, from 12 shards" in result.stdout
    assert {name: (out / "shards" / name).stat().st_mtime_ns for name in done} == before
    got = load(out / "samples.npz")
    np.testing.assert_array_equal(got, load(tmp_path / "whole" / "samples.npz"))
    assert got.shape == (24, 16, 16, 3) and len({image.tobytes() for image in got}) == 24


def test_cli_run_directory_errors(sampler, tmp_path, capsys, monkeypatch):
    from fastddpm.cli import main

    model = tmp_path / "tiny.safetensors"
    checkpoints.save_native(sampler, model)
    assert main(["sample", "--model", str(model), "--out", str(tmp_path / "r"), "--npz", "x.npz"]) == 1
    assert "a run directory gets its .npz at" in capsys.readouterr().err
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert main(["sample", "--model", str(model), "--out", str(tmp_path / "grid.png")]) == 1
    assert "under torchrun, fastddpm sample needs --out DIR" in capsys.readouterr().err
