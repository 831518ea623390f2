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

COMPILED_DEVICE_TYPES = {"cuda"}  # where both run compiled (eager elsewhere; tests add "cpu")
_compiled: dict = {}


def _run_compiled(function, device: torch.device, /, *args, **kwargs):
    """``function`` (flex_attention or create_block_mask) compiled once per process on CUDA, where
    flex_attention is only fast compiled and eager create_block_mask evaluates the mask on the whole
    [B, H, T, S] grid at once (compiled, block by block). Elsewhere, and inside a compiled decoder
    layer (``train.compile``, whose graph takes the call in), the function itself.

    ``dynamic=None``: a size is specialised until it changes, then dynamic. Pretraining (one length)
    gets kernels for its length; fine-tuning, whose micro-batches are padded to their longest sample,
    compiles again at its second length only. ``fullgraph=True``: past dynamo's recompile limit (or
    at a graph break) dynamo would run the function uncompiled, which materialises [B, H, T, S] (an
    OOM or a many-fold slowdown, behind one warning); with it, an error that says why."""
    if device.type not in COMPILED_DEVICE_TYPES or torch.compiler.is_compiling():
        return function(*args, **kwargs)
    if function not in _compiled:
        _compiled[function] = torch.compile(function, dynamic=None, fullgraph=True)
    try:
        return _compiled[function](*args, **kwargs)
    except torch._dynamo.exc.FailOnRecompileLimitHit as error:
        limit = torch._dynamo.config.recompile_limit
        raise RuntimeError(
            f"{function.__name__} was compiled {limit} times in this process (torch._dynamo.config.recompile_limit): "
            "uncompiled it would materialise [B, H, T, S] attention scores or masks, so doge-dist stops instead. Its "
            "inputs kept changing in what dynamo specialises (dtype, gradient mode, masks with and without "
            "padding, documents or a keep window); the reasons are logged with TORCH_LOGS=recompiles. Raise "
            "torch._dynamo.config.recompile_limit, or use model.attn_backend=sdpa."
        ) from error


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
    return _run_compiled(
        create_block_mask,
        query_positions.device,
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

    return _run_compiled(flex_attention, q.device, q, k, v, score_mod=add_bias, block_mask=block_mask, scale=scale,
                         enable_gqa=True)
