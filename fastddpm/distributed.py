"""The one module that knows torch.distributed: joining a torchrun job and leaving it.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the
environment) `init` joins the process group; anywhere else it returns a one-process World
and initialises nothing, so the same code runs with and without torchrun.

Backends: NCCL when every rank on a node has a GPU of its own, gloo otherwise (CPU devices,
and CUDA ranks that share a GPU: NCCL refuses two ranks on one device, gloo does not).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the job: `rank` of `size` processes, `local_rank` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes shared files."""
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        """Whether a process group is up (under torchrun), so collectives may be called."""
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        """Wait for every rank; nothing to wait for in a one-process World."""
        if self.initialized:
            dist.barrier()

    def all_gather(self, obj: object) -> list:
        """Every rank's `obj` (any picklable value), in rank order; [obj] in a one-process World."""
        if not self.initialized:
            return [obj]
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (in float64); `value` itself in a one-process World."""
        if not self.initialized:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.size

    def parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` (already on self.device) in DistributedDataParallel when there are several ranks,
        so that backward averages the gradients over them; `module` itself when there is one."""
        if self.size == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)


def init(device: str | torch.device = "cpu", backend: str | None = None, timeout_s: float = 600) -> World:
    """Join the torchrun job if there is one, else return World(0, 1, 0, device).

    device: "cpu", "cuda" (each rank takes cuda:LOCAL_RANK, or cuda:LOCAL_RANK % device_count
    when there are more ranks on the node than GPUs, so that they share) or "cuda:K" (every rank
    on K). backend: None picks as the module docstring says; "nccl" or "gloo" forces one.
    timeout_s: how long a collective waits for a missing rank before raising.
    """
    device = torch.device(device)
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but torch sees no CUDA device")
    present = [name for name in TORCHRUN_ENV if name in os.environ]
    if not present:
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the NCCL backend needs a CUDA device, got {device}")
        return World(device=device)
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(
            f"incomplete torchrun environment: {', '.join(present)} set but {', '.join(missing)} missing"
        )
    rank, size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not 0 <= rank < size or local_rank < 0:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank}")
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    shared = (
        device.type == "cuda"
        and local_size > 1
        and (device.index is not None or local_size > torch.cuda.device_count())
    )
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" and not shared else "gloo"
    elif backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the NCCL backend needs a CUDA device, got {device}")
    elif backend == "nccl" and shared:
        raise ValueError(f"NCCL refuses ranks that share a GPU, and rank {rank} shares {device}: use gloo")
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def finish(world: World) -> None:
    """Leave the job: destroy the process group `init` made (nothing for a one-process World)."""
    if world.initialized:
        dist.destroy_process_group()
