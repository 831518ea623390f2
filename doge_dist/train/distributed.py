"""Process-group setup for the three ways a run starts: the deepspeed launcher, torchrun, plain python.

The launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; plain python has
none, so a one-process group is described here before ``deepspeed.init_distributed`` reads them.
CUDA runs use NCCL with one device per local rank, everything else gloo on the CPU.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_world_size() -> int:
    """The world size the launcher asked for (1 under plain python), before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> DistEnv:
    """Create the default process group (gloo on CPU, NCCL on CUDA) and pick this rank's device."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return DistEnv(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )


def all_reduce_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sum a few scalars over ``group`` (default: all ranks) in one float64 collective."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, group=group)
    return tensor.tolist()
