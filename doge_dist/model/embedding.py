"""The token embedding, whose CPU weight gradient is written into buffers kept across steps.

Written by hand: ``nn.Embedding``'s backward allocates a fresh zero-filled [vocab, hidden] fp32
gradient every step, and with tied weights the LM head's fp32 gradient, which autograd adds it to,
is a second fresh block of that size. On CPU each such block costs a page fault per 4 KB page
(``buffers``), 2-3% of a doge-20m step each. Here the embedding's rows go into a kept buffer, and
with ``with_weight_alias`` the LM head can read the weight through an alias whose gradient comes
back to this backward, which adds it into that same buffer and hands it on: the tied weight's
gradient is then a view of a kept buffer, and no [vocab, hidden] gradient block is allocated.
The values are the same bits as ``nn.Embedding`` plus autograd's sum: rows are added in token
order into zeros, as ``nn.Embedding``'s CPU backward adds them, and then the LM head's gradient.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .buffers import unshared_buffer


class _EmbeddingKeptGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, input_ids: torch.Tensor, padding_idx: Optional[int], with_weight_alias: bool):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input_ids)
        ctx.weight_shape, ctx.padding_idx = weight.shape, padding_idx
        return F.embedding(input_ids, weight, padding_idx), weight.view_as(weight) if with_weight_alias else None

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Optional[torch.Tensor], grad_weight_alias: Optional[torch.Tensor]):
        (input_ids,) = ctx.saved_tensors
        grad_weight = unshared_buffer("embedding", ctx.weight_shape, torch.float32).zero_()
        if grad_output is not None:
            grad_weight.index_add_(0, input_ids.reshape(-1), grad_output.reshape(-1, grad_output.shape[-1]))
            if ctx.padding_idx is not None:
                grad_weight[ctx.padding_idx] = 0  # nn.Embedding's padding row gets no gradient
        if grad_weight_alias is not None:
            grad_weight.add_(grad_weight_alias)  # what autograd's sum of the two would give, bit for bit
        return grad_weight, None, None, None


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding`` (same parameters and state dict) whose fp32 weight gradient on CPU goes
    into kept buffers; other devices, dtypes and options take ``nn.Embedding``'s own path."""

    def forward(self, input_ids: torch.Tensor, with_weight_alias: bool = False):
        """The embeddings; with ``with_weight_alias``, (embeddings, the weight to project the
        vocabulary with, or None where the plain path runs and the LM head should read its own)."""
        weight = self.weight
        plain = self.max_norm is not None or self.scale_grad_by_freq or self.sparse
        if plain or weight.device.type != "cpu" or weight.dtype != torch.float32 or not (
            torch.is_grad_enabled() and weight.requires_grad
        ):
            embedded = super().forward(input_ids)
            return (embedded, None) if with_weight_alias else embedded
        embedded, alias = _EmbeddingKeptGradient.apply(weight, input_ids, self.padding_idx, with_weight_alias)
        return (embedded, alias) if with_weight_alias else embedded
