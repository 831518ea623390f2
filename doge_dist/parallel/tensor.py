"""Tensor (and Megatron-style sequence) parallel Doge, applied from outside to the single-device model.

What is split, over the tensor-parallel group of size tp (``TP_SPLIT_DIMS``):
- q/k/v: column-parallel by heads (megatron-core ``ColumnParallelLinear``), o_proj row-parallel.
- ``A`` and the q/k norms go with their heads: ``A`` is sliced, the [head_dim] norms are shared by
  all heads, so their gradients are summed over the group.
- ``dt_proj`` mixes the values of all key/value heads into one bias per head. Its parallel form
  (``HeadLocalDtProj``, written here because megatron has no such layer): each rank multiplies its
  local heads' values by its slice of the weight's input columns, one all-reduce of the small
  [B, S, nb] partial sums gives the full product (exact: a sum split over ranks), and each rank keeps
  its own heads' columns. The backward all-reduces the [B, S, nb] gradient so every rank's weight
  slice sees all heads' gradients.
- MLP and CDMoE shared expert: gate/up column-parallel, down row-parallel. The router and the
  expert tables stay replicated (expert parallel shards the tables).
- Embedding (``VocabParallelEmbedding``) and the LM head by vocabulary, padded to a multiple of tp;
  the padded logits are masked, the loss is megatron's ``vocab_parallel_cross_entropy`` and full
  logits are never gathered.
Key/value heads are never replicated: nkv must be divisible by tp (a clear error otherwise).

Dropout: masks of split activations (attention probabilities of local heads; with sequence parallelism,
a layer's hidden states) are drawn per rank, those of replicated ones alike on every rank (``rng``).

Sequence parallel: between the tensor-parallel regions each rank holds T/tp tokens; column layers
all-gather the sequence and row layers reduce-scatter it, as in Megatron-LM (with our unfused q/k/v
and gate/up projections that is one gather per projection). Parameters that then see only a shard of the
tokens (norms, residual scales, router, expert tables) get their gradients summed over the group.
"""
import math
import re
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch import nn

from ..config import ConfigError, ModelConfig
from ..model.cdmoe import CDMoE, Routing, balance_loss
from ..model.doge import DogeForCausalLM
from ..model.loss import IGNORE_INDEX
from .comm import all_reduce, gather, gather_for_replicated_use, reduce_scatter, sum_gradients_over_group
from .rng import draw_per_rank

# (parameter name pattern, dimension split over the tensor-parallel group)
TP_SPLIT_DIMS = [
    (r"self_attn\.[qkv]_proj\.(weight|bias)$", 0),
    (r"self_attn\.o_proj\.weight$", 1),
    (r"self_attn\.dt_proj\.weight$", 1),
    (r"self_attn\.A$", 0),
    (r"mlp\.(gate|up)_proj\.(weight|bias)$", 0),
    (r"mlp\.down_proj\.weight$", 1),
    (r"embed_tokens\.weight$", 0),
    (r"lm_head\.weight$", 0),
]
VOCAB_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")


def tp_split_dim(name: str) -> Optional[int]:
    for pattern, dim in TP_SPLIT_DIMS:
        if re.search(pattern, name):
            return dim
    return None


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of tp (Megatron's make-vocab-size-divisible-by)."""
    return math.ceil(vocab_size / tp) * tp


def check_tensor_parallel(config: ModelConfig, tp: int, sequence_parallel: bool = False) -> None:
    """Refuse shapes that do not split evenly, naming the key to change."""
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, key) % tp:
            advice = (". Key/value heads are not replicated across tensor-parallel ranks: choose a tensor_parallel "
                      f"size that divides num_key_value_heads ({config.num_key_value_heads})."
                      if key == "num_key_value_heads" else
                      f": each rank holds 1/{tp} of it. Choose a tensor_parallel size that divides it.")
            raise ConfigError(f"model.{key} = {getattr(config, key)} is not divisible by parallel.tensor_parallel = {tp}{advice}")
    if sequence_parallel and config.is_moe and config.router_layout == "hf_compat":
        raise ConfigError("router_layout 'hf_compat' mixes tokens across the batch and cannot run sequence parallel.")


def shard_state_dict(state: dict, config: ModelConfig, rank: int, tp: int) -> dict:
    """The slice of a full (single-device) state dict that tensor-parallel rank ``rank`` holds."""
    shards = {}
    for name, tensor in state.items():
        dim = tp_split_dim(name)
        if name in VOCAB_PARAMS:
            tensor = F.pad(tensor, (0, 0, 0, padded_vocab_size(config.vocab_size, tp) - tensor.shape[0]))
        shards[name] = tensor if dim is None else tensor.chunk(tp, dim=dim)[rank].clone()
    return shards


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The single-device model's parameter names and shapes (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in DogeForCausalLM(config).named_parameters()}


def _every_layer(name: str) -> str:
    """An exact-name pattern that matches this parameter in every decoder layer."""
    return re.sub(r"layers\\\.\d+\\\.", lambda _: r"layers\.\d+\.", "^" + re.escape(name) + "$")


def universal_checkpoint_info(config: ModelConfig) -> dict:
    """How DeepSpeed's ``ds_to_universal`` merges our tensor-parallel shards (and how a load at another
    tp size re-splits them): row-parallel weights along dim 1, vocabulary tensors without padding, and
    every parameter ``shard_state_dict`` does not split (not in ``TP_SPLIT_DIMS``) as replicated, since
    each rank holds a whole copy of it: norms, residual scales, the router and expert tables, and the
    biases added after a row-parallel reduction (o_proj, down_proj, dt_proj). The lists
    come from this config's parameters, the same table that splits them: a hand-kept list missed the
    biases (ds_to_universal then concatenated their copies), and a pattern that matches no parameter
    makes ds_to_universal fail."""
    from deepspeed.checkpoint import constants as uc

    replicated, row_parallel, vocabulary = [], [], []
    for name in parameter_shapes(config):
        dim = tp_split_dim(name)
        if name in VOCAB_PARAMS:
            vocabulary.append(_every_layer(name))
        elif dim is None:
            replicated.append(_every_layer(name))
        elif dim == 1:
            row_parallel.append(_every_layer(name))
    return {
        "universal_checkpoint_version": 0.2,
        uc.TP_REPLICATED_PARAMETER_PATTERNS: list(dict.fromkeys(replicated)),
        uc.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: list(dict.fromkeys(row_parallel)),
        uc.VOCABULARY_PARAMETER_PATTERNS: vocabulary,
        uc.ORIGINAL_VOCAB_SIZE: config.vocab_size,
    }


def merge_state_dicts(shards: list[dict], config: ModelConfig) -> dict:
    """Inverse of ``shard_state_dict``: one full state dict, vocabulary padding dropped."""
    merged = {}
    for name, tensor in shards[0].items():
        dim = tp_split_dim(name)
        full = tensor if dim is None else torch.cat([shard[name] for shard in shards], dim=dim)
        merged[name] = full[: config.vocab_size] if name in VOCAB_PARAMS else full
    return merged


class _NoExtraState:
    """megatron-core layers add an ``_extra_state`` entry (None, for Transformer Engine) to the state
    dict; ours must hold tensors only, like the single-device model's (DeepSpeed's universal
    checkpoint converter saves every entry as a tensor). Loading still accepts the entry."""

    get_extra_state = nn.Module.get_extra_state


class ColumnParallel(_NoExtraState, ColumnParallelLinear):
    """megatron-core's column-parallel linear on [B, T, H], returning only the output.

    With sequence parallelism the input is this rank's T/tp tokens: it is gathered here and the
    input gradient reduce-scattered, so megatron's own input-gradient all-reduce is disabled.
    """

    def __init__(self, *args, sequence_parallel: bool = False, **kwargs):
        super().__init__(*args, disable_grad_reduce=sequence_parallel, **kwargs)
        self.gather_input = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather_input:
            x = gather(x, 1, self.tp_group)
        return super().forward(x)[0]


class RowParallel(_NoExtraState, RowParallelLinear):
    """megatron-core's row-parallel linear (input already split) on [B, T, H/tp]; with sequence
    parallelism its partial sums are reduce-scattered over the sequence instead of all-reduced."""

    def __init__(self, *args, sequence_parallel: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.scatter_output = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scatter_output:
            return super().forward(x)[0]
        out = reduce_scatter(F.linear(x, self.weight), 1, self.tp_group)
        return out if self.bias is None else out + self.bias


class HeadLocalDtProj(nn.Module):
    """``dt_proj`` over local heads' values: partial product, one all-reduce, keep local heads."""

    def __init__(self, in_local: int, bias_heads: int, has_bias: bool, rank: int, tp: int, group) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(bias_heads, in_local))
        self.bias = nn.Parameter(torch.empty(bias_heads)) if has_bias else None
        local = bias_heads // tp
        self.local_heads = slice(rank * local, (rank + 1) * local)
        self.group = group

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        dt = all_reduce(F.linear(values, self.weight), self.group)
        if self.bias is not None:
            dt = dt + self.bias
        return copy_to_tensor_model_parallel_region(dt, self.group)[..., self.local_heads]


class VocabShardEmbedding(_NoExtraState, VocabParallelEmbedding):
    """megatron-core's vocab-parallel embedding with the reference's ``padding_idx``: the padding
    row gets no gradient from lookups (it still does from a tied LM head), and [B, T, H] layout."""

    def __init__(self, *args, padding_idx: Optional[int] = None, sequence_parallel: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.padding_idx = padding_idx
        self.sequence_parallel = sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local_ids = (ids - self.vocab_start_index).masked_fill(outside, 0)
        weight = self.weight
        if self.padding_idx is not None:
            pad_local = self.padding_idx - self.vocab_start_index
            if 0 <= pad_local < weight.shape[0]:
                keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
                keep[pad_local] = 0
                weight = weight * keep + weight.detach() * (1 - keep)
        out = F.embedding(local_ids, weight).masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter(out, 1, self.tp_group)
        return reduce_from_tensor_model_parallel_region(out, self.tp_group)


class VocabParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice [B, T, V_padded/tp]; padded columns masked."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, rank: int, group, sequence_parallel: bool) -> None:
        super().__init__()
        self.weight = weight
        self.group = group
        self.sequence_parallel = sequence_parallel
        start = rank * weight.shape[0]
        self.register_buffer("padded", torch.arange(start, start + weight.shape[0]) >= vocab_size, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            hidden = gather(hidden, 1, self.group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, self.group)
        logits = F.linear(hidden, self.weight)
        return logits.masked_fill(self.padded, torch.finfo(logits.dtype).min)


def vocab_parallel_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] token losses (0 where ignored) from vocabulary-sharded logits, never gathering them."""
    valid = labels != IGNORE_INDEX
    # megatron's kernel works in place on its input: give it a float32 copy, never the caller's logits
    return vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), labels.masked_fill(~valid, 0)) * valid


class TensorParallelDoge(DogeForCausalLM):
    """The Doge model after ``parallelize_tensor``: the loss reads sharded logits, and with
    sequence parallelism the balance loss sees every rank's tokens."""

    tp_group: dist.ProcessGroup
    sequence_parallel: bool

    def forward(self, input_ids: torch.Tensor, *args, **kwargs):
        tp = dist.get_world_size(self.tp_group)
        if self.sequence_parallel and input_ids.shape[1] % tp:  # each rank would hold a different number of tokens
            raise ValueError(f"{input_ids.shape[1]} tokens per sequence do not split over parallel.tensor_parallel = {tp} "
                             f"ranks with sequence parallelism: pad them to a multiple of {tp}.")
        if kwargs.get("cache") is not None:  # its logits are this rank's vocabulary shard: tokens drawn from them are wrong
            raise ValueError("A tensor-parallel model does not decode: generate with the single-device model "
                             "(launch/export_hf.py or doge_dist.train.export.load_checkpoint_model merge the shards).")
        return super().forward(input_ids, *args, **kwargs)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_losses(logits, labels).sum(), (labels != IGNORE_INDEX).sum()

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_token_losses(logits, labels)

    def hidden_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor,
                        lm_head_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_sum(self.lm_head(hidden), labels)  # a vocabulary shard's logits are already small

    def compute_balance_loss(self, routings: list[Routing], token_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.sequence_parallel:
            return super().compute_balance_loss(routings, token_mask)
        tp = dist.get_world_size(self.tp_group)
        gathered = [
            Routing(gather_for_replicated_use(r.logits_x, self.tp_group), gather_for_replicated_use(r.logits_y, self.tp_group),
                    gather_for_replicated_use(r.expert_ids, self.tp_group))
            for r in routings
        ]
        if token_mask is not None:  # rank-major token order, as gathered
            token_mask = torch.cat([chunk.reshape(-1) for chunk in token_mask.chunk(tp, dim=1)])
        return balance_loss(gathered, self.config.num_experts, self.config.balance_loss, token_mask)


def mark_split_parameters(model: nn.Module) -> None:
    """Megatron's tensor-parallel attributes on every split parameter (megatron sets them only when it
    initialises weights itself); DeepSpeed's gradient norm counts a parameter without them once,
    from tensor-parallel rank 0, as replicated."""
    for name, param in model.named_parameters():
        dim = tp_split_dim(name)
        if dim is not None:
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1


def parallelize_tensor(model: DogeForCausalLM, group: dist.ProcessGroup, sequence_parallel: bool = False) -> TensorParallelDoge:
    """Turn a single-device model into this rank's tensor-parallel shard, in place, keeping its weights.

    Every rank must pass a model with the same weights (same seed or same checkpoint).
    """
    config = model.config
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    check_tensor_parallel(config, tp, sequence_parallel)
    full_state = model.state_dict()
    mp_config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=next(model.parameters()).dtype,
        gradient_accumulation_fusion=False,
    )
    layers = dict(config=mp_config, init_method=nn.init.zeros_, tp_group=group)

    def column(linear: nn.Linear) -> ColumnParallel:
        return ColumnParallel(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              gather_output=False, sequence_parallel=sequence_parallel, **layers)

    def row(linear: nn.Linear) -> RowParallel:
        return RowParallel(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           input_is_parallel=True, skip_bias_add=False, sequence_parallel=sequence_parallel, **layers)

    replicated_partial_grads = []
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.q_proj, attn.k_proj, attn.v_proj = column(attn.q_proj), column(attn.k_proj), column(attn.v_proj)
        attn.o_proj = row(attn.o_proj)
        attn.dt_proj = HeadLocalDtProj(attn.dt_proj.in_features // tp, attn.dt_proj.out_features,
                                       attn.dt_proj.bias is not None, rank, tp, group)
        attn.A = nn.Parameter(torch.empty(attn.A.shape[0] // tp))
        attn.num_heads //= tp
        attn.num_kv_heads //= tp
        if attn.q_norm is not None:
            replicated_partial_grads += [attn.q_norm.weight, attn.k_norm.weight]
        mlp = layer.mlp
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = column(mlp.gate_proj), column(mlp.up_proj), row(mlp.down_proj)
        if sequence_parallel:  # weights applied to this rank's T/tp tokens only, row-parallel biases included
            replicated_partial_grads += [layer.input_residual, layer.post_attention_residual,
                                         layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            replicated_partial_grads += [bias for bias in (attn.o_proj.bias, mlp.down_proj.bias) if bias is not None]
            if isinstance(mlp, CDMoE):
                replicated_partial_grads += [mlp.router_gate.weight, mlp.down_embed.weight, mlp.up_embed.weight]

    vocab = padded_vocab_size(config.vocab_size, tp)
    embed = VocabShardEmbedding(vocab, config.hidden_size, padding_idx=config.pad_token_id,
                                sequence_parallel=sequence_parallel, **layers)
    model.model.embed_tokens = embed
    if config.tie_word_embeddings:
        head_weight = embed.weight
    else:
        head_weight = nn.Parameter(torch.empty(vocab // tp, config.hidden_size))
    model.lm_head = VocabParallelLMHead(head_weight, config.vocab_size, rank, group, sequence_parallel)
    if sequence_parallel:
        replicated_partial_grads.append(model.model.norm.weight)

    model.__class__ = TensorParallelDoge  # the same object, with the sharded-loss methods (as FSDP2 does)
    model.tp_group, model.sequence_parallel = group, sequence_parallel
    model.load_state_dict(shard_state_dict(full_state, config, rank, tp))
    mark_split_parameters(model)
    for param in replicated_partial_grads:
        sum_gradients_over_group(param, group)
    draw_sharded_dropout_per_rank(model, rank, sequence_parallel)
    return model


def draw_sharded_dropout_per_rank(model: TensorParallelDoge, rank: int, sequence_parallel: bool) -> None:
    """Dropout masks of this rank's own: attention dropout acts on this rank's heads, and with
    sequence parallelism a whole decoder layer's dropouts on this rank's tokens (``rng``)."""
    config = model.config
    if not (config.attention_dropout or (sequence_parallel and config.hidden_dropout)):
        return
    for layer in model.model.layers:
        draw_per_rank(layer if sequence_parallel else layer.self_attn, rank)
