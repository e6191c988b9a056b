"""Sharded runs under torchrun with gloo on the CPU: 2 ranks give the 1-process images, and a
killed rank loses only its unfinished shard."""

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastddpm
from fastddpm import checkpoints, runs
from tests.conftest import kill_marked, run_reaped, tiny_unet

pytestmark = pytest.mark.slow

N, SHARD = 16, 2  # 8 shards: rank 0 takes 0, 2, 4, 6 and rank 1 takes 1, 3, 5, 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    sampler = fastddpm.Sampler(tiny_unet(backend="torch"), fastddpm.DiffusionConfig(num_timesteps=20))
    checkpoints.save_native(sampler, path)
    return path


def sample_args(model: Path, out: Path) -> list[str]:
    return [
        "sample", "--model", str(model), "-n", str(N), "--shard-size", str(SHARD), "--batch-size", "1",
        "--seed", "11", "--out", str(out), "--no-progress",
    ]  # fmt: skip


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")


def load(path: Path) -> np.ndarray:
    with np.load(path) as f:
        return f["arr_0"]


@pytest.fixture(scope="module")
def one_process(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    result = run_reaped([sys.executable, "-m", "fastddpm", *sample_args(model, out)], ENV, 600)
    assert result.returncode == 0, result.stderr[-3000:]
    return load(out / "samples.npz")


def test_two_ranks_equal_one_process(model, one_process, tmp_path):
    out = tmp_path / "run"
    result = run_reaped([*torchrun(2), "-m", "fastddpm", *sample_args(model, out)], ENV, 600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"wrote {out / 'samples.npz'}") == 1, "only rank 0 reports the .npz"
    got = load(out / "samples.npz")
    assert got.shape == (N, 16, 16, 3) and len({image.tobytes() for image in got}) == N
    np.testing.assert_array_equal(got, one_process)


def test_two_ranks_sample_with_a_solver_as_one_process(model, tmp_path):
    """A stochastic few-step solver under torchrun: the 1-process images (noise is Philox per shard)."""
    solver = ["--sampler", "dpmpp-2m-sde", "--steps", "5"]
    one = run_reaped(
        [sys.executable, "-m", "fastddpm", *sample_args(model, tmp_path / "one"), *solver], ENV, 600
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_reaped(
        [*torchrun(2), "-m", "fastddpm", *sample_args(model, tmp_path / "two"), *solver], ENV, 600
    )
    assert two.returncode == 0, two.stderr[-3000:]
    np.testing.assert_array_equal(
        load(tmp_path / "two" / "samples.npz"), load(tmp_path / "one" / "samples.npz")
    )


def worker_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (Linux /proc)."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == parent:
            ranks = [entry[5:] for entry in environ if entry.startswith(b"RANK=")]
            if ranks:
                workers[int(ranks[0])] = int(stat.parent.name)
    return workers


def start_and_kill_rank_1(model: Path, out: Path, log: Path) -> int:
    """Start a 2-rank run, SIGKILL rank 1 once its first shard is written, and return torchrun's
    exit status; -1 when torchrun ended before rank 1 wrote a shard (a start that failed: its
    stderr is in `log`)."""
    marker = f"kill-test-{os.getpid()}-{time.monotonic_ns()}"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*torchrun(2), "-m", "fastddpm", *sample_args(model, out)],
            env={**ENV, "FASTDDPM_REAP": marker}, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not runs.shard_path(out, 1).exists():  # rank 1's first shard
                if proc.poll() is not None:
                    return -1
                assert time.monotonic() < deadline, "rank 1 wrote no shard in 300 s"
                time.sleep(0.01)
            os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
            return proc.wait(timeout=300)
        finally:
            kill_marked(f"FASTDDPM_REAP={marker}".encode())  # whatever rank outlived torchrun
            proc.wait()


def test_killed_rank_then_one_process_completes_the_set(model, one_process, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    status = start_and_kill_rank_1(model, out, log)
    if status == -1 and not any(out.glob("shards/shard-*.npz")):
        # The job failed before any rank wrote a shard, so nothing this test is about has run yet
        # (test_two_ranks_equal_one_process checks starting). One start is retried, with the
        # failure shown as a warning, so that a gloo or rendezvous hiccup on a loaded machine is
        # reported, not hidden; a second failure fails the test.
        first = log.read_text()[-3000:]
        warnings.warn(f"torchrun failed to start; retrying once. Its stderr: {first}", stacklevel=1)
        log = tmp_path / "second.log"
        status = start_and_kill_rank_1(model, out, log)
    assert status != -1, f"torchrun ended before rank 1 wrote a shard; stderr: {log.read_text()[-3000:]}"
    assert status != 0, "torchrun reports the dead rank"
    done = {p.name for p in (out / "shards").glob("shard-*.npz")}
    assert "shard-000001.npz" in done and len(done) < N // SHARD, f"killed mid-run: {sorted(done)}"
    assert not (out / "samples.npz").exists()
    before = {name: (out / "shards" / name).stat().st_mtime_ns for name in done}

    result = run_reaped([sys.executable, "-m", "fastddpm", *sample_args(model, out)], ENV, 600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {name: (out / "shards" / name).stat().st_mtime_ns for name in done} == before
    np.testing.assert_array_equal(load(out / "samples.npz"), one_process)
