"""The token embedding, with its weight gradient written into a buffer kept across steps on CPU.

Written by hand: ``nn.Embedding``'s backward allocates a fresh zero-filled [vocab, hidden] fp32
gradient every step (32 MiB for a 32k vocabulary at hidden 256). glibc serves a block that large
with a fresh ``mmap``, and the first touch of each page is a page fault: about 15 ms per step on
one core of a virtual machine, 2-3% of a doge-20m step. With tied weights that gradient is only
ever added into the LM head's, so here it is written into a kept buffer instead. The values are
the same bits: rows are added in token order, as ``nn.Embedding``'s CPU backward adds them.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

_kept_buffers: dict[tuple, torch.Tensor] = {}


def _gradient_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A [vocab, hidden] buffer that nothing outside this module refers to any more. The gradient
    handed to autograd is a view of it, so a gradient still held somewhere (waiting in autograd's
    input buffer, kept as ``.grad`` because no other gradient was added to it, retained by a hook)
    counts as a reference; such a buffer is left to its holder and a new one is kept instead."""
    key = (tuple(shape), dtype)
    buffer = _kept_buffers.get(key)
    # references to the storage: ``buffer`` and the temporary ``untyped_storage()`` object
    if buffer is None or torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) > 2:
        buffer = _kept_buffers[key] = torch.empty(shape, dtype=dtype)
    return buffer


class _EmbeddingKeptGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, input_ids: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
        ctx.save_for_backward(input_ids)
        ctx.weight_shape, ctx.padding_idx = weight.shape, padding_idx
        return F.embedding(input_ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (input_ids,) = ctx.saved_tensors
        grad_weight = _gradient_buffer(ctx.weight_shape, grad_output.dtype).zero_()
        grad_weight.index_add_(0, input_ids.reshape(-1), grad_output.reshape(-1, grad_output.shape[-1]))
        if ctx.padding_idx is not None:
            grad_weight[ctx.padding_idx] = 0  # nn.Embedding's padding row gets no gradient
        return grad_weight.view_as(grad_weight), None, None


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding`` (same parameters and state dict) whose fp32 weight gradient on CPU goes
    into a kept buffer; other devices, dtypes and options take ``nn.Embedding``'s own path."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        plain = self.max_norm is not None or self.scale_grad_by_freq or self.sparse
        if plain or weight.device.type != "cpu" or weight.dtype != torch.float32 or not (
            torch.is_grad_enabled() and weight.requires_grad
        ):
            return super().forward(input_ids)
        return _EmbeddingKeptGradient.apply(weight, input_ids, self.padding_idx)
