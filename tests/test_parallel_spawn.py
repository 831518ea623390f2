"""The gloo spawner starts again on a new port when another process holds the one it picked (the
window between picking a free port and binding it), instead of failing or hanging the test run, and
its ranks' results outlive the rank processes."""
import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from doge_dist.parallel import spawn


def _rank(rank, world_size):
    return dist.get_rank(), dist.get_world_size()


def test_a_taken_port_is_retried_on_a_new_one(monkeypatch):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        picks = iter([blocker.getsockname()[1]])
        free_port = spawn.free_port
        monkeypatch.setattr(spawn, "free_port", lambda: next(picks, None) or free_port())
        assert spawn.run_distributed(_rank, 2) == [(0, 2), (1, 2)]
        assert next(picks, None) is None  # the taken port was tried first


def _tensor(rank, world_size):
    return {"rank": rank, "values": torch.arange(4.0) + rank}


def test_tensors_come_back_after_their_rank_has_exited():
    """A rank's result is read once the rank process may have ended (here: after it has): tensors sent
    through torch's queue as shared file descriptors were then gone (FileNotFoundError, one run in the suite)."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    rank = context.Process(target=spawn._entry, args=(0, 1, spawn.free_port(), _tensor, (), results))
    rank.start()
    rank.join()
    _, value, error = results.get()
    assert error is None and rank.exitcode == 0
    received = pickle.loads(value)
    assert received["rank"] == 0 and torch.equal(received["values"], torch.arange(4.0))


def _rank_one_dies(rank, world_size):
    if rank == 1:
        os._exit(3)  # as a segfault or the OOM killer would end it: no result, no traceback
    return rank


@pytest.mark.timeout(120)
def test_a_rank_that_dies_without_a_result_fails_the_call_instead_of_hanging_it():
    with pytest.raises(AssertionError, match="rank 1 exited with code 3"):
        spawn.run_distributed(_rank_one_dies, 2)


def _group_timeouts(rank, world_size):
    from megatron.core import parallel_state

    from doge_dist.config import ParallelConfig
    from doge_dist.parallel.state import initialize_parallel

    initialize_parallel(ParallelConfig(tensor_parallel=2))
    groups = (parallel_state.get_data_parallel_group(), parallel_state.get_tensor_model_parallel_group())
    return [group._get_backend(torch.device("cpu")).options._timeout.total_seconds() for group in groups]


def test_the_parallel_groups_take_deepspeeds_timeout(monkeypatch):
    """The training step's collectives run on megatron-core's groups, which were made with Megatron's default
    timeout of 30 minutes: a stuck rank hung the job that long, whatever DEEPSPEED_TIMEOUT (the world group's,
    default 10 minutes) said."""
    monkeypatch.setenv("DEEPSPEED_TIMEOUT", "2")
    assert spawn.run_distributed(_group_timeouts, 2) == [[120.0, 120.0]] * 2
