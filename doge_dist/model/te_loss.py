"""transformer-engine's fused cross entropy (``pip install --no-build-isolation -e '.[gpu]'``, ``model.loss_backend: te``).

Where whole logits exist, the loss is TE's ``parallel_cross_entropy``: a Triton kernel reads the
[B, T, V] logits (bf16 or fp32) with an online softmax and returns the fp32 loss per token, so no
fp32 copy or log-softmax of the logits is materialised, and its backward writes the gradient into
the logits' own memory. It is exact cross entropy, so it is correct for Doge as it is: nothing
about DMA enters the loss. Whole logits exist under ZeRO-3 and for DPO's token log-probs; the
default ZeRO 0-2 path already chunks the loss over the vocabulary (``loss.chunked_token_loss_sum``)
and keeps doing so. Under tensor parallelism the loss stays megatron-core's vocab-parallel cross
entropy: TE's kernel refuses a vocabulary split over ranks (``world_size > 1`` asserts).

Two properties of TE's kernel shape the glue: it overwrites the logits (ignored rows with zeros in
the forward, every row with its gradient in the backward), so the logits must not be read after the
loss; and the gradient it writes for an ignored row is not zero, so the losses are multiplied by the
token mask, which zeroes their incoming gradient.

TE's fused RMSNorm is not used: Doge's RMSNorm rounds the normalised activations to the input dtype
before the weight multiplies them, TE's rounds once after, so it is not the reference's arithmetic;
``train.compile`` fuses the norm into its neighbours instead.
"""
import inspect

import torch

from ..config import ConfigError
from .gpu_extra import require_gpu_package
from .loss import IGNORE_INDEX


def check_te_available() -> None:
    """A clear error before any work when ``model.loss_backend: te`` cannot run here."""
    require_gpu_package("transformer_engine", "model.loss_backend = 'te'", "transformer-engine",
                        "set model.loss_backend=torch")
    from transformer_engine.pytorch.cross_entropy import CrossEntropyFunction

    if "ignore_idx" not in inspect.signature(CrossEntropyFunction.forward).parameters:
        raise ConfigError("model.loss_backend = 'te' needs a transformer-engine whose parallel_cross_entropy takes "
                          "ignore_idx (2.1 or newer): upgrade it, or set model.loss_backend=torch.")


def te_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] fp32 cross entropy per token (0 where ``labels`` is IGNORE_INDEX) from logits [B, T, V].
    The logits must not be read afterwards: TE writes into them."""
    from transformer_engine.pytorch.cross_entropy import CrossEntropyFunction

    # positional: autograd Functions take no keywords (input, target, label_smoothing, reduce_loss,
    # dist_process_group, ignore_idx)
    losses = CrossEntropyFunction.apply(logits.contiguous(), labels.contiguous(), 0.0, False, None, IGNORE_INDEX)
    return losses * (labels != IGNORE_INDEX)
