"""DMA through FlexAttention (the CUDA path): the per-key bias is a ``score_mod`` and causality,
padding, documents and the keep window form the block mask, so no [B, nh, T, S] tensor is built
(and blocks across documents are skipped).

A query that may attend no key (left padding) gets what the reference computes for it, where
FlexAttention would leave the row empty (output 0): every score the dtype's minimum, so a uniform
softmax over all keys (the mean of the values) whose gradient still reaches q and k (not the bias,
which the reference's masked_fill replaces). Such a row sees every key with the score
``score - score.detach()``: 0 (uniform) with derivative 1. Not the reference's huge constant: the
backward recomputes the probabilities from the row's logsumexp, in which log(S) would round away."""
from typing import Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .masks import AttentionLayout

_compiled_flex = None


def _flex_attention():
    """flex_attention is only fast compiled; compile it once per process (eager fallback on CPU)."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _compiled_flex


_compiled_create_block_mask = None


def _create_block_mask(device: torch.device):
    """Eager ``create_block_mask`` evaluates the mask on the whole [B, H, T, S] grid at once;
    compiled (CUDA) it works block by block, so the keep-window mask never exists in full."""
    global _compiled_create_block_mask
    if device.type != "cuda":
        return create_block_mask
    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask)
    return _compiled_create_block_mask


def _block_mask(
    layout: AttentionLayout,
    batch: int,
    heads: int,
    num_queries: int,
    bias: torch.Tensor,
    head_to_bias: int,
    threshold: Optional[torch.Tensor],
) -> BlockMask:
    query_positions, key_valid, documents = layout.query_positions, layout.key_valid, layout.documents
    blind = layout.blind_queries
    # which keys are visible carries no gradient (the bias reaches the loss through the score_mod);
    # compiled mask construction cannot trace a tensor that records one
    bias = bias.detach()
    threshold = None if threshold is None else threshold.detach()

    def visible(b, h, q_idx, kv_idx):
        ok = kv_idx <= query_positions[q_idx]
        if key_valid is not None:
            ok = ok & key_valid[b, kv_idx]
        if documents is not None:
            ok = ok & (documents[b, q_idx] == documents[b, kv_idx])
        if threshold is not None:
            ok = ok & (bias[b, h // head_to_bias, kv_idx] >= threshold[b, h // head_to_bias, q_idx])
        if blind is not None:  # the reference's uniform row over every key
            ok = ok | blind[b, q_idx]
        return ok

    per_batch = key_valid is not None or documents is not None or threshold is not None
    return _create_block_mask(query_positions.device)(
        visible,
        batch if per_batch else None,
        heads if threshold is not None else None,
        num_queries,
        layout.num_keys,
        device=query_positions.device,
    )


def flex_dma(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    layout: AttentionLayout,
    scale: float,
    head_to_bias: int,
    threshold: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention [B, nh, T, d] with scores + bias[b, h // head_to_bias, key] over visible keys.

    Without a keep window the block mask depends only on the layout and is shared by all layers.
    With one, a key is kept when its bias reaches the row's ``keep_window_size``-th largest (ties
    at the threshold keep every tied key; the reference's top-k picks among them arbitrarily).
    """
    B, H, T, _ = q.shape
    if threshold is None:
        if layout._block_mask is None:
            layout._block_mask = _block_mask(layout, B, H, T, bias, head_to_bias, None)
        block_mask = layout._block_mask
    else:
        block_mask = _block_mask(layout, B, H, T, bias, head_to_bias, threshold)

    blind = layout.blind_queries

    def add_bias(score, b, h, q_idx, kv_idx):
        biased = score + bias[b, h // head_to_bias, kv_idx].to(score.dtype)
        if blind is None:
            return biased
        return torch.where(blind[b, q_idx], score - score.detach(), biased)

    return _flex_attention()(q, k, v, score_mod=add_bias, block_mask=block_mask, scale=scale, enable_gqa=True)
