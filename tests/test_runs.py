"""Resumable sharded runs (fastddpm.runs, `fastddpm sample --out DIR`): same images, nothing redone."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import checkpoints, images, runs
from fastddpm.loop import NonFiniteSamplesError
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
    assert sorted(p.name for p in (part / "shards").iterdir()) == [
        f"shard-00000{k}.{ext}" for k in range(3) for ext in ("json", "npz")
    ]
    np.testing.assert_array_equal(resumed, whole)


@pytest.mark.parametrize(
    ("method", "extra"), [("dpmpp-2m-sde", {}), ("unipc", {}), ("ddim", {"use_clipped_model_output": True})]
)
def test_a_run_samples_with_any_sampler_and_records_it(sampler, tmp_path, method, extra):
    """A solver's (or DDIM's) run: each shard equals Sampler.sample with its seed, and run.json
    records the sampler and its options, so a resume under another sampler is refused."""
    spec = runs.RunSpec(n=4, shard_size=2, batch_size=2, seed=3, steps=5, method=method, **extra)
    got = load(runs.run(sampler, tmp_path, spec, progress=False))
    for k in range(2):
        x = sampler.sample(2, steps=5, method=method, seed=runs.shard_seed(3, k), progress=False, **extra)
        np.testing.assert_array_equal(got[2 * k : 2 * k + 2], images.to_rgb(images.to_uint8(x)))
    recorded = json.loads((tmp_path / "run.json").read_text())["spec"]
    assert recorded["method"] == method and recorded["use_clipped_model_output"] == bool(extra)
    with pytest.raises(ValueError, match="holds a run with other settings: method="):
        runs.run(
            sampler, tmp_path, runs.RunSpec(n=4, shard_size=2, batch_size=2, seed=3, steps=5), progress=False
        )


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
    with pytest.raises(ValueError, match="precision 'fp32' \\(now 'tf32'\\)"):
        runs.run(tf32, tmp_path, SPEC, progress=False)


def test_a_default_run_resumes_under_precision_fp32(sampler, tmp_path):
    """The default float32 network and --precision fp32 are the same run, not other settings."""
    first = runs.run(sampler, tmp_path, SPEC, progress=False)
    fp32 = fastddpm.Sampler(tiny_unet(backend="torch"), sampler.diffusion, precision="fp32")
    assert runs.run(fp32, tmp_path, SPEC, progress=False) == first


@pytest.fixture(scope="module")
def clean_run(sampler, tmp_path_factory):
    """A finished run of SPEC: its directory and its samples."""
    out = tmp_path_factory.mktemp("clean")
    return out, load(runs.run(sampler, out, SPEC, progress=False))


def copy_run(clean, dest):
    shutil.copytree(clean, dest, symlinks=True)
    return dest


def flip_byte(path, offset=400):  # inside arr_0.npy's data
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def foreign_shard(sampler, tmp_path, k):
    """Shard k (and its identity file) of the same run with another seed."""
    other = tmp_path / "foreign"
    runs.run(sampler, other, runs.RunSpec(n=7, shard_size=3, batch_size=2, seed=6, steps=4), progress=False)
    return runs.shard_path(other, k)


DAMAGES = {
    "not an npz": lambda d, s, t: runs.shard_path(d, 2).write_bytes(b"not an npz"),
    "zero bytes": lambda d, s, t: runs.shard_path(d, 2).write_bytes(b""),
    "truncated": lambda d, s, t: runs.shard_path(d, 2).write_bytes(runs.shard_path(d, 2).read_bytes()[:300]),
    "bad CRC": lambda d, s, t: flip_byte(runs.shard_path(d, 2)),
    "rewritten with zeros": lambda d, s, t: images.save_npz(
        runs.shard_path(d, 2), np.zeros((1, 16, 16, 3), np.uint8)
    ),
    "identity file deleted": lambda d, s, t: runs.identity_path(d, 2).unlink(),
    "identity file a FIFO": lambda d, s, t: (
        runs.identity_path(d, 2).unlink(),
        os.mkfifo(runs.identity_path(d, 2)),
    ),
    "shard a FIFO": lambda d, s, t: (runs.shard_path(d, 2).unlink(), os.mkfifo(runs.shard_path(d, 2))),
    "swapped": lambda d, s, t: (
        os.rename(runs.shard_path(d, 0), d / "x"),
        os.rename(runs.shard_path(d, 1), runs.shard_path(d, 0)),
        os.rename(d / "x", runs.shard_path(d, 1)),
    ),
    "foreign shard and identity": lambda d, s, t: [
        shutil.copy(path(foreign_shard(s, t, 2).parent.parent, 2), path(d, 2))
        for path in (runs.shard_path, runs.identity_path)
    ],
    "symlink to a foreign shard": lambda d, s, t: (
        runs.shard_path(d, 2).unlink(),
        runs.shard_path(d, 2).symlink_to(foreign_shard(s, t, 2)),
    ),
}
DAMAGED_SHARDS = {"swapped": [0, 1]}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_or_foreign_shard_is_sampled_again(sampler, clean_run, tmp_path, damage):
    """Whatever is wrong with a shard, the run ends with the clean run's images, saying which it redid."""
    clean, expected = clean_run
    out = copy_run(clean, tmp_path / "run")
    (out / "samples.npz").unlink()
    DAMAGES[damage](out, sampler, tmp_path)
    foreign = sorted((tmp_path / "foreign" / "shards").glob("*")) if (tmp_path / "foreign").exists() else []
    before = {p: p.read_bytes() for p in foreign}
    notices = []
    signal.alarm(60)  # a FIFO opened for reading would block forever
    try:
        got = load(runs.run(sampler, out, SPEC, progress=False, log=notices.append))
    finally:
        signal.alarm(0)
    np.testing.assert_array_equal(got, expected)
    redone = DAMAGED_SHARDS.get(damage, [2])
    assert [int(line.split("shard-")[1][:6]) for line in notices] == redone, notices
    assert all(line.endswith(": sampling it again") for line in notices)
    assert {p: p.read_bytes() for p in foreign} == before, "a foreign shard must never be written"
    assert not runs.shard_path(out, 2).is_symlink() and runs.shard_path(out, 2).is_file()
    # The next run adopts everything: nothing is sampled, nothing said.
    (out / "samples.npz").unlink()
    again = []
    np.testing.assert_array_equal(
        load(runs.run(sampler, out, SPEC, progress=False, log=again.append)), expected
    )
    assert again == []


def test_a_directory_in_a_shards_place_is_named(sampler, clean_run, tmp_path):
    out = copy_run(clean_run[0], tmp_path / "run")
    (out / "samples.npz").unlink()
    runs.shard_path(out, 1).unlink()
    runs.shard_path(out, 1).mkdir()
    with pytest.raises(ValueError, match=r"shard-000001\.npz is a directory, not a shard: remove it"):
        runs.run(sampler, out, SPEC, progress=False)


SAMPLES_DAMAGES = {
    "an unrelated file": lambda path: path.write_bytes(b"PK\x03\x04 unrelated"),
    "a truncated copy": lambda path: path.write_bytes(path.read_bytes()[:500]),
    "zeros of the right shape": lambda path: images.save_npz(path, np.zeros((7, 16, 16, 3), np.uint8)),
    "a flipped byte": lambda path: flip_byte(path),
    "a FIFO": lambda path: (path.unlink(), os.mkfifo(path)),
}


@pytest.mark.parametrize("damage", list(SAMPLES_DAMAGES))
def test_an_existing_samples_npz_is_verified_not_trusted(sampler, clean_run, tmp_path, damage):
    clean, expected = clean_run
    out = copy_run(clean, tmp_path / "run")
    SAMPLES_DAMAGES[damage](out / "samples.npz")
    notices = []
    signal.alarm(60)
    try:
        got = load(runs.run(sampler, out, SPEC, progress=False, log=notices.append))
    finally:
        signal.alarm(0)
    np.testing.assert_array_equal(got, expected)
    assert len(notices) == 1 and notices[0].startswith(f"{out / 'samples.npz'} ")
    assert notices[0].endswith(": writing it again from the shards")


def test_a_verified_samples_npz_is_kept_without_sampling(sampler, clean_run, tmp_path):
    out = copy_run(clean_run[0], tmp_path / "run")
    shutil.rmtree(out / "shards")  # kept files may be deleted once samples.npz is written
    mtime = (out / "samples.npz").stat().st_mtime_ns
    calls = []
    hook = sampler.unet.register_forward_hook(lambda m, args, o: calls.append(1))
    try:
        runs.run(sampler, out, SPEC, progress=False, log=calls.append)
    finally:
        hook.remove()
    assert calls == [] and (out / "samples.npz").stat().st_mtime_ns == mtime
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["samples_sha256"] == hashlib.sha256(clean_run[1].tobytes()).hexdigest()


def test_after_run_json_is_deleted_another_seed_adopts_no_shard(sampler, clean_run, tmp_path):
    out = copy_run(clean_run[0], tmp_path / "run")
    (out / "run.json").unlink()
    other = runs.RunSpec(n=7, shard_size=3, batch_size=2, seed=6, steps=4)
    notices = []
    got = load(runs.run(sampler, out, other, progress=False, log=notices.append))
    np.testing.assert_array_equal(got, load(runs.run(sampler, tmp_path / "fresh", other, progress=False)))
    assert not np.array_equal(got, clean_run[1])
    assert len(notices) == 4, notices  # the old samples.npz, then shards 0, 1, 2
    assert all("belongs to another run or shard" in line for line in notices[1:])
    assert json.loads((out / "run.json").read_text())["spec"]["seed"] == 6


def test_stale_temporaries_are_removed_under_the_lock(sampler, tmp_path):
    stale = [tmp_path / ".run.json.ab12cd34.tmp", tmp_path / ".samples.npz.x1y2z3w4.tmp",
             tmp_path / "shards" / ".shard-000001.json.q1w2e3r4.tmp"]  # fmt: skip
    (tmp_path / "shards").mkdir()
    for path in stale:
        path.write_bytes(b"left by a killed writer")
    runs.run(sampler, tmp_path, SPEC, progress=False)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "run.json", "samples.npz", "shards"]


def test_a_second_process_is_refused_and_touches_nothing(sampler, tmp_path):
    """While a process holds DIR, another is refused at once, naming it, and deletes none of its
    temporaries; once the holder dies (SIGKILL: no cleanup), the lock is free."""
    code = (
        "import sys, time; from pathlib import Path; from fastddpm import runs\n"
        "with runs.locked(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        live = tmp_path / "shards" / ".shard-000000.npz.live1234.tmp"
        live.parent.mkdir()
        live.write_bytes(b"being written")
        with pytest.raises(
            ValueError, match=rf"{tmp_path} is in use by another fastddpm process \(pid {holder.pid}\)"
        ):
            runs.run(sampler, tmp_path, SPEC, progress=False)
        assert live.exists() and not (tmp_path / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    runs.run(sampler, tmp_path, SPEC, progress=False)
    assert not live.exists()


@pytest.mark.slow
def test_two_cli_runs_on_one_directory_do_not_mix(sampler, tmp_path):
    """A second `fastddpm sample --out DIR` (another seed) while the first runs: refused at once
    (exit 1, one line, nothing written); the first ends with its own seed's shards throughout."""
    model = tmp_path / "tiny.safetensors"
    checkpoints.save_native(sampler, model)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # 96 images in 48 shards: long enough to outlast the second process's start-up on a fast CPU.
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    first = subprocess.Popen(cli(model, out, n=96), env=env, **quiet)
    try:
        deadline = time.monotonic() + 300
        while not runs.shard_path(out, 0).exists():  # the first holds the lock from before run.json
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard written in 300 s"
            time.sleep(0.01)
        second = subprocess.run(cli(model, out, "--seed", "4"), env=env, capture_output=True, text=True)
        assert first.poll() is None, "the first run must still be running for this test to mean anything"
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
        assert f"{out} is in use by another fastddpm process (pid {first.pid})" in second.stderr
        assert first.wait(timeout=600) == 0
    finally:
        first.kill()
        first.wait()
    assert json.loads((out / "run.json").read_text())["spec"]["seed"] == 3
    for k in range(48):
        assert json.loads(runs.identity_path(out, k).read_text())["seed"] == runs.shard_seed(3, k)


def test_non_finite_samples_are_never_written(tmp_path):
    unet = tiny_unet(backend="torch")
    with torch.no_grad():
        next(unet.parameters()).view(-1)[0] = float("nan")
    broken = fastddpm.Sampler(unet, fastddpm.DiffusionConfig(num_timesteps=20))
    with pytest.raises(
        NonFiniteSamplesError,
        match=r"shard 0 \(run images 0..2\), batch 0 \(images 0..1\) produced non-finite values \(NaN\)",
    ):
        runs.run(broken, tmp_path, SPEC, progress=False)
    assert not list((tmp_path / "shards").glob("shard-*"))


def test_bad_specs():
    with pytest.raises(ValueError, match="n must be a positive int"):
        runs.RunSpec(n=0, shard_size=1, batch_size=1)
    with pytest.raises(ValueError, match="shard_size must be a positive int"):
        runs.RunSpec(n=1, shard_size=1.5, batch_size=1)
    with pytest.raises(ValueError, match="unknown sampling method"):
        runs.RunSpec(n=1, shard_size=1, batch_size=1, method="heun")
    with pytest.raises(ValueError, match="the euler solver needs steps, an int"):
        runs.RunSpec(n=1, shard_size=1, batch_size=1, method="euler", steps="ddim10")
    with pytest.raises(ValueError, match="eta applies to method 'ddim'"):
        runs.RunSpec(n=1, shard_size=1, batch_size=1, eta=0.5)
    for eta in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            runs.RunSpec(n=1, shard_size=1, batch_size=1, method="ddim", eta=eta)
    for steps in (5.0, [5], True, 0, "abc"):
        with pytest.raises(ValueError, match="steps must be None"):
            runs.RunSpec(n=1, shard_size=1, batch_size=1, steps=steps)


def test_streamed_npz_checks_its_chunks(tmp_path):
    with pytest.raises(ValueError, match="the chunks hold 2 images, but the .npz was declared with 3"):
        images.save_npz_chunks(tmp_path / "x.npz", (3, 2, 2, 3), [np.zeros((2, 2, 2, 3), np.uint8)])
    assert not (tmp_path / "x.npz").exists()


def cli(model, out, *extra, n=24):
    return [
        sys.executable, "-m", "fastddpm", "sample", "--model", str(model), "-n", str(n),
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


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_exits_130(sampler, tmp_path):
    """SIGINT (Ctrl-C) mid-run: one line saying how to resume, exit 130, no traceback; the same
    command then finishes the run, keeping what was done."""
    model = tmp_path / "tiny.safetensors"
    checkpoints.save_native(sampler, model)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cli(model, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not runs.shard_path(out, 0).exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no shard written in 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    resume = "run the same command again to resume"
    assert err == f"fastddpm: interrupted; the finished shards in {out} are kept: {resume}\n"
    assert not list(out.rglob("*.tmp"))
    result = subprocess.run(cli(model, out), env=env, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert load(out / "samples.npz").shape == (24, 16, 16, 3)


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
