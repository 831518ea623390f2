"""Buffers kept across steps on CPU.

Written by hand: PyTorch's CPU tensors come from glibc's malloc, which serves large blocks (from
32 MiB on, such as a [32k vocabulary, 256] fp32 gradient, always) with a fresh ``mmap`` and unmaps
them when they are freed. The first touch of each page is then a page fault, every step: about
15 ms per 32 MiB on one core of a virtual machine, more than the arithmetic done in it. CUDA's
caching allocator already reuses blocks.
"""
import math

import torch

_workspaces: dict[tuple, torch.Tensor] = {}
_kept: dict[tuple, torch.Tensor] = {}


def workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch space that never leaves its caller: on CPU one buffer per name and dtype, grown as
    needed and overwritten by the next call; elsewhere a fresh tensor. The contents are undefined."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    key = (name, dtype)
    buffer = _workspaces.get(key)
    numel = math.prod(shape)
    if buffer is None or buffer.numel() < numel:
        buffer = _workspaces[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def unshared_buffer(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A view of a CPU buffer kept across calls, for a gradient handed to autograd; the buffer is
    one that no earlier view is still held of (saved for a backward, made ``.grad`` by autograd,
    waiting to be added, retained by a hook). Otherwise that buffer is left to its holder and a new
    one is kept instead. The contents are undefined."""
    key = (name, tuple(shape), dtype)
    buffer = _kept.get(key)
    # references to the storage: ``buffer`` and the temporary ``untyped_storage()`` object
    if buffer is None or torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) > 2:
        buffer = _kept[key] = torch.empty(shape, dtype=dtype)
    return buffer.view_as(buffer)
