"""Checks that rank 0 makes for every rank.

What each rank would find the same (a checkpoint's files, the data's indexes, a run directory's lock)
is read once, by rank 0, and every rank raises the error it found with its message: a job of many
ranks neither reads it many times nor leaves the other ranks waiting in the next collective while
rank 0 alone fails. Without a process group the check just runs. Written by hand: torch.distributed
has the broadcast, not the pattern.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def raise_on_every_rank(rank0_error: Optional[str], error_type: type[Exception]) -> None:
    """``error_type(rank0_error)`` on every rank when rank 0 found one (what the other ranks pass is ignored)."""
    shared = [rank0_error]
    if _distributed():
        dist.broadcast_object_list(shared, src=0)
    if shared[0]:
        raise error_type(shared[0])


def check_on_rank0(check: Callable[[], None], error_type: type[Exception]) -> None:
    """Run ``check`` on rank 0 only; the ``error_type`` it raises is raised on every rank."""
    error = None
    if not _distributed() or dist.get_rank() == 0:
        try:
            check()
        except error_type as found:
            error = str(found)
    raise_on_every_rank(error, error_type)
