"""Next-token cross entropy as (sum over tokens, number of tokens), so that gradient accumulation
and data parallelism can divide by the token count of the whole global batch exactly."""
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .buffers import unshared_buffer, workspace
from .precision import compute_dtype

IGNORE_INDEX = -100
CPU_WEIGHT_GRAD_BYTES = 2**27  # see weight_grad_group_tokens


def shift_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for next-token prediction: position t predicts token t+1; the last and padded ones are ignored."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of fp32 token losses, number of counted tokens); ``labels`` already aligned with ``logits``."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (labels != IGNORE_INDEX).sum()


def default_chunk_tokens(vocab_size: int, device_type: str) -> int:
    """Rows of logits ``chunked_token_loss_sum`` projects at a time: about 2**24 logits on CPU, 2**28 on GPU."""
    return max(1, (2**24 if device_type == "cpu" else 2**28) // vocab_size)


def weight_grad_group_tokens(chunk_tokens: int, vocab_size: int, dtype: torch.dtype, device_type: str) -> int:
    """Rows whose logit gradients ``chunked_token_loss_sum`` keeps for one product with the hidden
    states, the LM head's weight gradient. On CPU whole chunks up to ``CPU_WEIGHT_GRAD_BYTES`` of
    logits in ``dtype``, so that a micro-batch of a few thousand tokens needs one product and one
    rounding, as ``nn.Linear``'s backward does, instead of one per chunk plus fp32 adds (2-3% of a
    doge-20m step here); elsewhere one chunk, whose logits are already about 2**28."""
    if device_type != "cpu":
        return chunk_tokens
    chunk_bytes = chunk_tokens * vocab_size * dtype.itemsize
    return chunk_tokens * max(1, CPU_WEIGHT_GRAD_BYTES // chunk_bytes)


def chunked_token_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: Optional[int] = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_loss_sum(hidden @ weight.T, labels)`` without the [tokens, vocab] logits of the batch.

    ``hidden`` [B, T, H] are the final hidden states (``compute_logits=False``), ``weight`` [V, H]
    the LM head. With a 32k vocabulary the fp32 logits, their log-softmax and their gradient are
    the largest tensors of a small model's step; here they are projected ``chunk_tokens`` rows at
    a time (default: about 64 MiB of fp32 logits on CPU, 1 GiB on GPU), and on CPU the logit
    gradients of a group of chunks (``weight_grad_group_tokens``, up to 128 MiB) are kept for one
    weight-gradient product. The gradients of ``hidden`` and ``weight`` are computed in the
    forward, while the logits are at hand, and only scaled in the backward; ignored tokens are
    dropped before any work. Under autocast the projection runs in the autocast dtype, as
    ``nn.Linear`` would, and the softmax in fp32, as ``token_loss_sum`` does. ``compiled=True``
    runs that softmax as ``torch.compile``d kernels (``train.compile``): passes over the logits in
    their own dtype instead of several over an fp32 copy.
    """
    labels = labels.reshape(-1)
    counted = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0], hidden.device.type)
    loss = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels, counted, chunk_tokens,
                                     compiled)
    return loss, torch.as_tensor(len(counted), device=labels.device)


def _add_weight_grad(total: Optional[torch.Tensor], partial: torch.Tensor) -> torch.Tensor:
    """``total + partial`` in fp32; ``partial`` is a workspace, so the first one is copied out (on
    CPU into a kept buffer: the LM head's weight gradient is 32 MiB at a 32k vocabulary, ``buffers``)."""
    if total is None:
        if partial.device.type != "cpu":
            return partial.to(torch.float32, copy=True)
        return unshared_buffer("lm_head", partial.shape, torch.float32).copy_(partial)
    if partial.dtype != torch.float32:  # a same-dtype add is several times faster than a mixed one
        partial = workspace("grad_weight_fp32", partial.shape, torch.float32, partial.device).copy_(partial)
    return total.add_(partial)


def _fp32_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    log_probs = workspace("log_probs", logits.shape, torch.float32, logits.device)
    return torch.log_softmax(log_probs.copy_(logits), dim=-1, out=log_probs)


def _cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the fp32 cross entropy of ``logits`` [n, V] against ``target`` [n]."""
    return -_fp32_log_softmax(logits).gather(1, target[:, None]).sum()


def _cross_entropy_grad_(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``_cross_entropy_sum``, and ``logits`` overwritten by its gradient softmax - one_hot(target)
    (computed in fp32, stored in the logits' dtype), as autograd computes it through ``token_loss_sum``."""
    log_probs = _fp32_log_softmax(logits)
    picked = (torch.arange(len(target), device=logits.device), target)
    loss = -log_probs[picked].sum()
    probs = log_probs.exp_()
    probs[picked] -= 1
    logits.copy_(probs)
    return loss


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` overwritten by their fp32 softmax (stored in their dtype); returns the rows'
    log-sum-exp. Written for ``torch.compile``, which makes it a reduction pass and an element-wise
    pass over ``logits``; eager PyTorch would allocate every step."""
    x = logits.float()
    log_sum_exp = torch.logsumexp(x, dim=-1, keepdim=True)
    logits.copy_(torch.exp(x - log_sum_exp))
    return log_sum_exp.squeeze(1)


def _softmax_one_exp_(logits: torch.Tensor) -> torch.Tensor:
    """``_softmax_`` as ``exp(x - max) / sum``: one exp per logit instead of two (the same values up
    to fp32 rounding). Inductor keeps the exponentials as an fp32 buffer, so on CPU it is called on
    a few rows at a time (``CPU_SOFTMAX_ROWS``), whose exponentials stay in cache."""
    x = logits.float()
    row_max = x.amax(dim=-1, keepdim=True)
    exps = torch.exp(x - row_max)
    row_sum = exps.sum(dim=-1, keepdim=True)
    logits.copy_(exps / row_sum)
    return (row_max + torch.log(row_sum)).squeeze(1)


CPU_SOFTMAX_ROWS = 32  # 4 MiB of fp32 exponentials of a 32k vocabulary
_compile = functools.cache(torch.compile)


def _compiled_softmax_(logits: torch.Tensor) -> torch.Tensor:
    if logits.device.type != "cpu":
        return _compile(_softmax_)(logits)
    softmax = _compile(_softmax_one_exp_)
    rows = CPU_SOFTMAX_ROWS
    return torch.cat([softmax(logits[start : start + rows]) for start in range(0, len(logits), rows)])


def _compiled_cross_entropy_grad_(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``_cross_entropy_grad_`` with the softmax as compiled kernels. The target column, one
    element per row, is read before and written after it: inside the kernel, a one-hot compare
    over every logit took about a tenth of the kernel's time (doge-20m on CPU). The values are
    the same bits as the one-hot form's."""
    picked = (torch.arange(len(target), device=logits.device), target)
    target_logits = logits[picked].float()
    log_sum_exp = _compiled_softmax_(logits)
    logits[picked] = (torch.exp(target_logits - log_sum_exp) - 1).to(logits.dtype)
    return (log_sum_exp - target_logits).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, counted, chunk_tokens: int, compiled: bool):
        device, device_type = hidden.device, hidden.device.type
        dtype = compute_dtype(hidden)
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vocab = weight.shape[0]
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            grad_hidden = torch.zeros_like(hidden) if want_hidden_grad else None
            grad_weight = None
            total = torch.zeros((), dtype=torch.float32, device=device)
            group_tokens = chunk_tokens
            if want_weight_grad:
                group_tokens = weight_grad_group_tokens(chunk_tokens, vocab, dtype, device_type)
            for group_start in range(0, len(counted), group_tokens):
                group = counted[group_start : group_start + group_tokens]
                h_group = hidden.index_select(0, group).to(dtype)
                target_group = labels.index_select(0, group)
                group_logits = workspace("logits", (len(group), vocab), dtype, device)
                for start in range(0, len(group), chunk_tokens):
                    chunk = slice(start, start + chunk_tokens)
                    logits, target = torch.mm(h_group[chunk], w.T, out=group_logits[chunk]), target_group[chunk]
                    if not (want_hidden_grad or want_weight_grad):
                        total += _cross_entropy_sum(logits, target)
                        continue
                    # the logits become their gradient in place
                    total += (_compiled_cross_entropy_grad_ if compiled else _cross_entropy_grad_)(logits, target)
                    if want_hidden_grad:
                        grad_hidden.index_copy_(0, group[chunk], (logits @ w).to(hidden.dtype))
                if want_weight_grad:
                    partial = torch.mm(group_logits.T, h_group, out=workspace("grad_weight", w.shape, dtype, device))
                    grad_weight = _add_weight_grad(grad_weight, partial)
            if want_weight_grad and grad_weight is None:  # no counted token
                grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if getattr(ctx, "used", False):
            raise RuntimeError("chunked_token_loss_sum allows one backward per forward (gradients are scaled in place)")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float()
        grad_hidden = None if grad_hidden is None else grad_hidden.mul_(scale)
        grad_weight = None if grad_weight is None else grad_weight.mul_(scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None
