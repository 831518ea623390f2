"""The Doge decoder: embeddings, decoder layers with learnable residual scales, final norm, LM head.

    x1 = input_residual * x + dropout(DMA(RMSNorm(x)))
    x2 = post_attention_residual * x1 + dropout(MLP_or_CDMoE(RMSNorm(x1)))
    logits = lm_head(RMSNorm(x_L))

Parameter names equal transformers' ``DogeForCausalLM`` so checkpoints map one to one.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import DynamicMaskAttention
from .cache import KVCache
from .cdmoe import CDMoE, Routing, balance_loss
from .embedding import TokenEmbedding
from .gpu_extra import runs_gpu_kernel
from .loss import IGNORE_INDEX, chunked_token_loss_sum, token_loss_sum
from .masks import AttentionLayout
from .mlp import GatedMLP
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class DogeOutput(dict):
    """The forward's results, as attributes and, like transformers' ``ModelOutput``, as a dict:
    DeepSpeed's engine finds a model's output tensors only in tensors, tuples, lists and dicts, and
    starts its backward bookkeeping (its BF16 optimizer clears the last micro-batch's bf16 gradients
    there) when the first gradient reaches one of them."""
    logits: Optional[torch.Tensor]  # [B, T, V], None when only hidden states were asked for
    hidden_states: torch.Tensor  # [B, T, H] after the final norm
    balance_loss: Optional[torch.Tensor] = None  # MoE only
    routings: list[Routing] = field(default_factory=list)
    cache: Optional[KVCache] = None
    # with compute_logits=False and tied weights on CPU: the LM head's weight for hidden_loss_sum,
    # read through the embedding so that one kept buffer collects the tied gradient (TokenEmbedding)
    lm_head_weight: Optional[torch.Tensor] = None
    loss_sum: Optional[torch.Tensor] = None  # with labels: the sum of the token losses
    loss_tokens: Optional[torch.Tensor] = None  # with labels: how many tokens it counts

    def __post_init__(self) -> None:
        self.update(vars(self))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.dropout = config.hidden_dropout
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DynamicMaskAttention(config, layer_idx)
        self.input_residual = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CDMoE(config) if config.is_moe else GatedMLP(config)
        self.post_attention_residual = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x, rope, layout: AttentionLayout, cache: Optional[KVCache] = None):
        """Returns the new hidden states and the layer's routing (None for a dense layer)."""
        attended = self.self_attn(self.input_layernorm(x), rope, layout, cache)
        x = self.input_residual * x + F.dropout(attended, self.dropout, self.training)
        mixed = self.mlp(self.post_attention_layernorm(x))
        routing = None
        if isinstance(mixed, tuple):
            mixed, routing = mixed
        x = self.post_attention_residual * x + F.dropout(mixed, self.dropout, self.training)
        return x, routing


class DogeModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DogeForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DogeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.compiled_loss = False  # set by compile_model: the chunked loss's softmax as one compiled kernel

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        compute_logits: bool = True,
        document_ids: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> DogeOutput:
        """``input_ids`` [B, T]; ``attention_mask`` [B, past + T] with 1 for real tokens (optional).

        ``compute_logits=False`` stops at the final hidden states, for losses that project
        the vocabulary in chunks instead of materialising [B, T, V]. ``document_ids`` [B, T]
        numbers the documents packed into each row (training without a cache): attention stays
        within a document (``data.reset_attention_mask``). ``token_mask`` [B, T]: 1 for the tokens the
        MoE balance loss counts (default: ``attention_mask``'s); fine-tuning passes its right padding
        here, which causality already keeps out of the real tokens' attention. ``labels`` [B, T]
        (``shift_labels``): the loss is computed here too (``loss_sum``, ``loss_tokens``; from the
        hidden states in vocabulary chunks with ``compute_logits=False``), so that every parameter
        a training step reads is read inside the forward, as DeepSpeed's engine expects.
        """
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids mask attention between packed documents; generation with a cache takes none.")
        past = cache.length if cache is not None else 0
        T = input_ids.shape[1]
        sequence_index = torch.arange(past, past + T, device=input_ids.device)
        if position_ids is None:
            position_ids = sequence_index[None]
            rope_len = past + T
        else:
            rope_len = int(position_ids.max()) + 1
        layout = AttentionLayout(sequence_index, past + T, None if attention_mask is None else attention_mask.bool(),
                                 document_ids)
        lm_head_weight = None
        if not compute_logits and self.config.tie_word_embeddings and isinstance(self.model.embed_tokens, TokenEmbedding):
            x, lm_head_weight = self.model.embed_tokens(input_ids, with_weight_alias=True)
        else:
            x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(position_ids, rope_len)
        if past + T > self.config.keep_window_size:
            # every layer's keep window reads the mask of allowed keys: built before the layers, so that
            # compiled layers all see the same layout (layer 0 building it had a graph of its own)
            _ = layout.allowed
        routings = []
        for layer in self.model.layers:
            x, routing = layer(x, rope, layout, cache)
            if routing is not None:
                routings.append(routing)
        hidden = self.model.norm(x)
        aux = None
        if routings:
            if token_mask is None and attention_mask is not None:
                token_mask = attention_mask[:, past:]
            aux = self.compute_balance_loss(routings, token_mask)
        logits = self.lm_head(hidden) if compute_logits else None
        loss_sum = loss_tokens = None
        if labels is not None:
            loss_sum, loss_tokens = (self.loss_sum(logits, labels) if compute_logits
                                     else self.hidden_loss_sum(hidden, labels, lm_head_weight))
        return DogeOutput(logits=logits, hidden_states=hidden, balance_loss=aux, routings=routings, cache=cache,
                          lm_head_weight=lm_head_weight, loss_sum=loss_sum, loss_tokens=loss_tokens)

    def compute_balance_loss(self, routings: list[Routing], token_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return balance_loss(routings, self.config.num_experts, self.config.balance_loss, token_mask)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, token count) for ``labels`` aligned with ``logits`` (the next-token
        targets: ``shift_labels(input_ids)``); parallel forms of the model override it."""
        if self.config.loss_backend == "te" and runs_gpu_kernel(logits.device):
            return self.token_losses(logits, labels).sum(), (labels != IGNORE_INDEX).sum()
        return token_loss_sum(logits, labels)

    def hidden_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor,
                        lm_head_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``loss_sum`` from the final hidden states (``compute_logits=False``), projecting the
        vocabulary in chunks so the [tokens, vocab] fp32 logits of the batch never exist.
        ``lm_head_weight``: the forward's ``DogeOutput.lm_head_weight`` where it has one."""
        weight = self.lm_head.weight if lm_head_weight is None else lm_head_weight
        return chunked_token_loss_sum(hidden, weight, labels, compiled=self.compiled_loss)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, T] fp32 cross entropy per token (0 where ignored), e.g. for DPO's sequence log-probs;
        parallel forms of the model override it. transformer-engine's kernel (``loss_backend: te``) computes
        CUDA logits; others take the PyTorch loss."""
        if self.config.loss_backend == "te" and runs_gpu_kernel(logits.device):
            from .te_loss import te_token_losses

            return te_token_losses(logits, labels)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none").view(labels.shape)


def init_weights(model: DogeForCausalLM) -> None:
    """transformers' initialisation: normal(0, initializer_range) for linear and embedding weights,
    zero biases and padding row, ones for norms and residual scales, zero ``A``. The padding row is
    zeroed after every draw: with tied embeddings the LM head draws the embedding's tensor again."""
    std = model.config.initializer_range
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, DynamicMaskAttention):
            nn.init.zeros_(module.A)
        elif isinstance(module, DecoderLayer):
            nn.init.ones_(module.input_residual)
            nn.init.ones_(module.post_attention_residual)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def build_model(config: ModelConfig, device: Optional[torch.device] = None) -> DogeForCausalLM:
    """A freshly initialised Doge model (float32 parameters) for ``config``."""
    with torch.device(device or "cpu"):
        model = DogeForCausalLM(config)
    init_weights(model)
    return model
