"""fastddpm.distributed: the one-process World, a real one-rank gloo group, and clear errors."""

import pytest
import torch

from fastddpm import distributed

from .conftest import free_port


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in (*distributed.TORCHRUN_ENV, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_torchrun_one_process_and_nothing_initialised(no_torchrun):
    world = distributed.init("cpu")
    assert (world.rank, world.size, world.local_rank, world.device) == (0, 1, 0, torch.device("cpu"))
    assert world.is_main and not world.initialized
    world.barrier()  # nothing to wait for
    distributed.finish(world)
    assert not torch.distributed.is_initialized()


def test_under_a_one_rank_torchrun_environment_gloo_group(no_torchrun):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    for name, value in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        no_torchrun.setenv(name, value)
    world = distributed.init("cpu", timeout_s=60)
    try:
        assert world.initialized and torch.distributed.get_backend() == "gloo"
        assert (world.rank, world.size, world.is_main) == (0, 1, True)
        world.barrier()
        x = torch.tensor([3.0])
        torch.distributed.all_reduce(x)
        assert x.item() == 3.0
    finally:
        distributed.finish(world)
    assert not world.initialized


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "incomplete torchrun environment"),
        (
            {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
            "bad torchrun environment",
        ),
    ],
)
def test_bad_torchrun_environment(no_torchrun, env, message):
    for name, value in env.items():
        no_torchrun.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.init("cpu")


def test_bad_arguments(no_torchrun):
    with pytest.raises(ValueError, match="backend must be"):
        distributed.init("cpu", backend="mpi")
    with pytest.raises(ValueError, match="NCCL backend needs a CUDA device"):
        distributed.init("cpu", backend="nccl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where torch sees no GPU")
def test_cuda_without_a_gpu(no_torchrun):
    with pytest.raises(ValueError, match="no CUDA device"):
        distributed.init("cuda")
