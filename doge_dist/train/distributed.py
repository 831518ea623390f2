"""Process-group setup for the three ways a run starts: the deepspeed launcher, torchrun, plain python.

The launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; plain python has
none, so a one-process group is described here before ``deepspeed.init_distributed`` reads them.
CUDA runs use NCCL with one device per local rank, everything else gloo on the CPU.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from ..cpus import usable_cpus


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


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun and deepspeed export


class LaunchEnvironmentError(ConfigError):
    """The environment describes a launch only in part; every process says so (which is rank 0 is unknown)."""


def check_launch_environment() -> None:
    """Plain python (neither RANK nor WORLD_SIZE set) or a whole launch: all of LAUNCH_VARIABLES, with a
    rank below the world size. A WORLD_SIZE left in the shell would otherwise size the batch for ranks
    that never come (DeepSpeed's batch assertion once the model is built), and a RANK alone sends
    DeepSpeed looking for MPI."""
    given = [name for name in LAUNCH_VARIABLES if name in os.environ]
    if "RANK" not in given and "WORLD_SIZE" not in given:
        return
    way_out = ("Start several processes with torchrun or the deepspeed launcher (which set them all), or unset "
               f"{' '.join(given)} to run one process with plain python.")
    missing = [name for name in LAUNCH_VARIABLES if name not in given]
    if missing:
        raise LaunchEnvironmentError(f"{', '.join(n for n in given if n in ('RANK', 'WORLD_SIZE'))} is set but not "
                                     f"{', '.join(missing)}: this environment describes a launch only in part. {way_out}")
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            numbers[name] = int(os.environ[name])
        except ValueError:
            raise LaunchEnvironmentError(f"{name}={os.environ[name]!r} is not a whole number. {way_out}") from None
    if not 0 <= numbers["RANK"] < numbers["WORLD_SIZE"]:
        raise LaunchEnvironmentError(f"RANK={numbers['RANK']} is not below WORLD_SIZE={numbers['WORLD_SIZE']} (or is "
                                     f"negative). {way_out}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and numbers["LOCAL_RANK"] >= gpus:  # the deepspeed launcher takes --num_gpus without looking
        raise LaunchEnvironmentError(
            f"LOCAL_RANK={numbers['LOCAL_RANK']}, but this machine shows {gpus} CUDA device(s): each rank trains on "
            f"its own GPU, so start at most {gpus} per node (deepspeed --num_gpus {gpus}, torchrun --nproc-per-node "
            f"{gpus}) or make more visible (CUDA_VISIBLE_DEVICES)."
        )


def launcher_world_size() -> int:
    """The world size the launcher asked for (1 under plain python), before any group exists; an
    environment that describes a launch only in part is refused here, before any work."""
    check_launch_environment()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_launcher_main() -> bool:
    """Whether this process is rank 0 of the launch (true under plain python), before any group exists."""
    return os.environ.get("RANK", "0") == "0"


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
        check_op_build_lock(SHM_OP)
        share_cpu_threads()
    try:
        deepspeed.init_distributed(dist_backend=backend)
    except torch.distributed.DistNetworkError as error:
        if "EADDRINUSE" not in str(error):
            raise
        raise ConfigError(
            f"The rendezvous port {os.environ.get('MASTER_PORT')} (MASTER_PORT) is taken, most likely by another run on "
            "this machine: give this run another one (deepspeed --master_port N, torchrun --master-port N)."
        ) from None
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if device.type == "cpu":
        unlink_shared_memory_buffers(rank, world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def share_cpu_threads() -> Optional[int]:
    """Give each of this machine's ranks its share of the cores (the count set, or None) when the launcher
    gave no OMP_NUM_THREADS: the deepspeed launcher sets none (torchrun sets 1), and torch's default of one
    thread per core in every rank oversubscribes the cores (two ranks on two cores ran four threads) and
    made each rank measure the whole machine's matmul peak as its own, so MFU read half."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if "OMP_NUM_THREADS" in os.environ or ranks <= 1:
        return None
    threads = max(1, usable_cpus() // ranks)
    torch.set_num_threads(threads)
    return threads


SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed builds at its first CPU start (about 90 s), for its all-reduce
STALE_BUILD_LOCK_SECONDS = 600


def check_op_build_lock(op: str) -> None:
    """torch builds a DeepSpeed op under a lock file in the op's build directory and waits, silently and
    for ever, while that file exists; a build killed midway (Ctrl-C at a first start) leaves it behind.
    A lock older than any build takes is refused with the way out; a recent one is another process's
    build, which is said to be awaited. (torch's FileBaton has no notion of a dead owner.)"""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(op, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_BUILD_LOCK_SECONDS:
        raise ConfigError(
            f"{lock} is {age / 60:.0f} minutes old: a build of DeepSpeed's {op} op was interrupted and left its lock, "
            f"on which every start would wait for ever. If no other run on this machine is building it, delete the "
            f"file (rm {lock}) and start again."
        )
    print(f"[doge-dist] another process is building (or checking) DeepSpeed's {op} op: waiting for its lock {lock}", flush=True)


def shared_memory_buffer(rank: int) -> Path:
    """The /dev/shm file of DeepSpeed's CPU all-reduce buffer for ``rank`` of this run (shm.cpp's name)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    return Path("/dev/shm") / name


def unlink_shared_memory_buffers(rank: int, world_size: int) -> None:
    """Remove the names of DeepSpeed's CPU shared-memory all-reduce buffers once every rank has mapped them.

    Written by hand for a DeepSpeed leak: when all ranks run on one machine under the deepspeed
    launcher (LOCAL_SIZE = world size), each rank creates a 66 MB file in /dev/shm at
    ``init_distributed`` and no one ever removes it, so every CPU run left 66 MB per rank of
    memory-backed files behind until /dev/shm filled the machine's memory. Each rank maps every
    rank's buffer inside ``init_distributed``; after a barrier each rank unlinks its own name, the
    mappings stay valid until the process exits, and nothing is left behind, crash or not.
    """
    if os.environ.get("LOCAL_SIZE") != str(world_size):  # the condition under which DeepSpeed creates them
        return
    torch.distributed.barrier()
    shared_memory_buffer(rank).unlink(missing_ok=True)


def all_reduce_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sum a few scalars over ``group`` (default: all ranks) in one float64 collective."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, group=group)
    return tensor.tolist()
