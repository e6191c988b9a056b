"""DistributedDataParallel training on the CPU with gloo: two real processes per run.

The ranks stay identical and draw different noise; a checkpoint resumes bit for bit with the
same number of ranks, and validly with another. Every launch has a deadline, after which its
processes are killed, so a rank that fails or hangs cannot hang the suite.
"""

import json
import os
import shutil
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from fastddpm import distributed, train
from fastddpm.schedule import DiffusionConfig

from .conftest import free_port, run_reaped
from .test_train import SMALL

DEADLINE_S = 300
CONFIG = train.TrainConfig(
    batch_size=8, steps=3, warmup=5, save_every=3, log_every=1, ema_decay=0.99, lr=1e-3
)


def ddp_worker(rank: int, size: int, port: int, out_dir: str, same_noise: bool) -> None:
    """One rank of a torchrun-like job: train CONFIG, then save this rank's weights as rank{rank}."""
    env = {"RANK": rank, "WORLD_SIZE": size, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": size}
    os.environ.update(
        {k: str(v) for k, v in env.items()} | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    world = distributed.init("cpu", timeout_s=60)
    try:
        t = train.Trainer(train.new_unet(SMALL, CONFIG.seed), DiffusionConfig(), CONFIG, out_dir, world=world)
        if same_noise:  # the control: every rank draws what rank 0 draws
            t.generator.manual_seed(CONFIG.seed)
            torch.manual_seed(CONFIG.seed)
        t.run(progress=False)
        save_file(
            {k: v.contiguous() for k, v in t.unet.state_dict().items()}, f"{out_dir}/rank{rank}.safetensors"
        )
    finally:
        distributed.finish(world)


def spawn(size: int, out_dir, same_noise: bool = False) -> list[dict[str, torch.Tensor]]:
    """Run ddp_worker on `size` spawned processes; each rank's final weights."""
    context = mp.start_processes(
        ddp_worker,
        (size, free_port(), str(out_dir), same_noise),
        nprocs=size,
        join=False,
        start_method="spawn",
    )
    deadline = time.time() + DEADLINE_S
    while not context.join(timeout=1):  # raises if a rank failed (and terminates the others)
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{size}-rank training did not finish in {DEADLINE_S} s")
    return [load_file(out_dir / f"rank{rank}.safetensors") for rank in range(size)]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ranks_stay_identical_and_draw_their_own_noise(tmp_path):
    """Two ranks with a global batch of 8 stay bit-identical. Were both to draw rank 0's noise, DDP's
    mean of two equal gradients would give exactly the one-process run with a batch of 4; with
    their own draws they must give something else."""
    ranks = spawn(2, tmp_path / "ddp")
    control = spawn(2, tmp_path / "same-noise", same_noise=True)
    assert same(ranks[0], ranks[1]) and same(control[0], control[1])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so that float sums are done in the same order
    try:
        single = train.Trainer(
            train.new_unet(SMALL, CONFIG.seed),
            DiffusionConfig(),
            train.TrainConfig(**{**CONFIG.__dict__, "batch_size": 4}),
            tmp_path / "single",
        )
        single.run(progress=False)
    finally:
        torch.set_num_threads(threads)
    one = {k: v.contiguous() for k, v in single.unet.state_dict().items()}
    start = train.new_unet(SMALL, CONFIG.seed).state_dict()
    assert not same(one, start)  # it trained
    assert same(control[0], one)
    assert not same(ranks[0], one)
    # Rank 0 kept the EMA and wrote it, with both ranks' generator states.
    saved = load_file(tmp_path / "ddp" / train.CHECKPOINT)
    assert same({k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}, ranks[0])
    assert saved["rng.generator"].shape[0] == 2
    assert not torch.equal(saved["rng.generator"][0], saved["rng.generator"][1])


def test_global_batch_must_split_evenly():
    world = distributed.World(rank=0, size=3)
    with pytest.raises(
        ValueError, match=r"batch_size 8 \(the global batch\) must be divisible by the 3 ranks"
    ):
        train.Trainer(train.new_unet(SMALL, 0), DiffusionConfig(), CONFIG, "unused", world=world)


def test_rank_seeds():
    assert train.rank_seed(7, 0, 0) == 7  # one process trains as it always has
    seeds = {train.rank_seed(7, rank, step) for rank in range(4) for step in (0, 3)}
    assert len(seeds) == 8 and all(0 <= s < 2**64 for s in seeds)


# --- the command line under torchrun -----------------------------------------------------------------


def fastddpm_train(ranks: int, out, *extra) -> None:
    """`torchrun --standalone --nproc_per_node RANKS -m fastddpm train` (plain `python -m fastddpm
    train` for one rank) on the digits preset, killed with its ranks past the deadline."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [sys.executable, *(torchrun if ranks > 1 else []), "-m", "fastddpm", "train", "--out", str(out)]
    command += ["--no-progress", *extra]
    result = run_reaped(command, {**os.environ, "OMP_NUM_THREADS": "1"}, DEADLINE_S)
    assert result.returncode == 0, result.stderr


def logged_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / train.LOG).read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_training_resumes_with_two_ranks_and_with_one(tmp_path):
    settings = ("--batch-size", "4", "--warmup", "5", "--save-every", "3", "--log-every", "1")
    whole, split = tmp_path / "whole", tmp_path / "split"
    fastddpm_train(2, whole, *settings, "--steps", "6")
    fastddpm_train(2, split, *settings, "--steps", "3")
    shutil.copytree(split, tmp_path / "split1")
    at_3 = load_file(split / train.CHECKPOINT)

    fastddpm_train(2, split, "--resume", "--steps", "6")  # same ranks: the uninterrupted run, bit for bit
    a, b = load_file(whole / train.CHECKPOINT), load_file(split / train.CHECKPOINT)
    assert same(a, b) and a["rng.generator"].shape[0] == 2
    assert not same(a, at_3)
    assert logged_steps(split) == logged_steps(whole) == [1, 2, 3, 4, 5, 6]

    fastddpm_train(1, tmp_path / "split1", "--resume", "--steps", "6")  # one rank: a valid continuation
    c = load_file(tmp_path / "split1" / train.CHECKPOINT)
    assert c.keys() == a.keys() and c["rng.generator"].shape[0] == 1
    # It trained on, from step 3's weights, with re-seeded draws: not the two-rank run's weights.
    assert not torch.equal(c["model.conv_in.weight"], at_3["model.conv_in.weight"])
    assert not torch.equal(c["model.conv_in.weight"], a["model.conv_in.weight"])
    assert logged_steps(tmp_path / "split1") == [1, 2, 3, 4, 5, 6]
