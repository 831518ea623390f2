"""CPU threads per rank: ranks started on one machine without OMP_NUM_THREADS (the deepspeed launcher
sets none; torchrun sets 1) ran torch's default of one thread per core each, so two ranks on two cores
ran four threads, and each rank measured the whole machine's matmul peak as its own (MFU read half)."""
import os

import pytest
import torch

from doge_dist.train import distributed


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("variables, cores, expected", [
    ({"LOCAL_SIZE": "2"}, 2, 1),  # the deepspeed launcher
    ({"LOCAL_WORLD_SIZE": "2"}, 8, 4),  # torchrun with OMP_NUM_THREADS removed
    ({"LOCAL_SIZE": "3"}, 2, 1),  # more ranks than cores: one thread each
])
def test_ranks_share_the_cores_when_no_thread_count_is_given(monkeypatch, threads, variables, cores, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert distributed.share_cpu_threads() == expected
    assert torch.get_num_threads() == expected


def test_a_given_thread_count_or_a_single_rank_is_left_alone(monkeypatch, threads):
    torch.set_num_threads(2)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert distributed.share_cpu_threads() is None and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    assert distributed.share_cpu_threads() is None and torch.get_num_threads() == 2
