"""The gloo spawner starts again on a new port when another process holds the one it picked (the
window between picking a free port and binding it), instead of failing or hanging the test run."""
import socket

import torch.distributed as dist

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
