"""Memory per GPU before a run starts: model states by ZeRO stage, activations per sequence, and the
largest micro-batch that fits; plus the accumulation that keeps a recipe's global batch on N GPUs.

Why a model and not a try-and-see: a 24 GB card and a Slurm queue both punish an out-of-memory
crash late, and the single-4090 YAML recipes cite these numbers for their micro-batch choice.

Model states follow DeepSpeed 0.19 with bf16 (its default gradient accumulation dtype is the model
dtype, so gradients are bf16; ``data_types.grad_accum_dtype: fp32`` at ZeRO-1 switches to its
BF16_Optimizer, which keeps fp32 gradients beside the bf16 ones). Per rank, with parameters in the
optimizer's flat order, and dp DeepSpeed's data-parallel size (under expert parallelism the ranks
holding the same expert shard, data-parallel size / EP, for every parameter:
``parallel.state.ExpertParallelMPU``):
  parameters  2 B each; ZeRO-3 keeps 1/dp of each flat group plus whole copies of tensors below
              ``stage3_param_persistence_threshold``.
  gradients   ZeRO 0/1: every parameter's gradient lives between micro-batches of an accumulation.
              ZeRO-2: the rank keeps the *whole* gradient of every tensor that overlaps its partition
              (measured: a tied 32k x H embedding straddling a boundary is held in full on both sides).
              ZeRO-3: its flat partition.
  optimizer   fp32 master + Adam m and v = 12 B per parameter, over dp for ZeRO >= 1.
  buffers     gradient-reduction buckets, ``reduce_bucket_size`` elements (x2 with overlap_comm) at
              ZeRO 1/2 during backward; ZeRO-3 holds its reduce bucket always and gathers up to
              ``stage3_prefetch_bucket_size`` parameters ahead.
Activations count what autograd keeps per token, in bytes, read off the Doge layer (bf16 tensors 2 B,
RMSNorm's fp32 upcast 4 B), for the CUDA FlexAttention path, which never builds a [heads, T, T] tensor:
  per layer  32 h + 12 kv + 8 I  (+ 2 k h + 4 nk^2 for CDMoE, 8 k h + 4 nk^2 under expert parallelism)
             h hidden, kv = n_kv x head_dim
  loss       the trainer's path. Below ZeRO-3 on one TP rank the loss is chunked over tokens
             (``chunked_token_loss_sum``): 2 h per token for the hidden-state gradient it computes
             ahead, plus a workspace once per micro-batch of up to one chunk of rows x 6 V (bf16
             logits, fp32 log-probs) and 6 V h (bf16 head copy, fp32 head gradient). Under ZeRO-3
             or TP the whole (vocab-parallel) logits exist: 14 V / tp per token at the backward's
             peak (bf16 logits, their fp32 upcast, fp32 log-softmax, its fp32 gradient). On an H100
             both paths' predictions were within 6% of the measured peak.
Activation checkpointing keeps each layer's bf16 input (2 h) and recomputes one layer at a time.
Tensor parallelism divides the projections' activations (and, with sequence parallelism, the rest).
DPO (``task="dpo"``): a sample is a pair, two sequences through the policy, whose loss reads the whole
logits; with ``finetune.reference: model`` every rank also holds the frozen reference in bf16 (2 B per
parameter; its forward, without gradients, peaks below the policy's backward).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .config import Config, ConfigError, ModelConfig
from .model.flops import parameter_count
from .model.loss import default_chunk_tokens
from .parallel.state import ParallelLayout
from .train.ds_config import bf16_enabled, data_type, zero_stage
from .train.preflight import check_settings
from .train.preflight import check_layout as check_trainer_layout

GB = 1e9
BUCKET_DEFAULT = int(5e8)  # DeepSpeed's reduce_bucket_size default (elements)
PREFETCH_DEFAULT = int(5e7)
PERSISTENCE_DEFAULT = int(1e5)


def check_layout(config: Config, gpus: int) -> ParallelLayout:
    """The parallel layout on ``gpus`` GPUs, by the trainer's own check (doge_dist.train.preflight.check_layout:
    the process grid, and a model and seq_length that split over it); only the GPU count is worded for --gpus."""
    if gpus < 1:
        raise ConfigError(f"The GPU count must be at least 1, got {gpus}.")
    tp = config.parallel.tensor_parallel
    if tp > 1 and gpus % tp:  # the trainer's own message speaks of launched processes, not of --gpus
        raise ConfigError(f"--gpus {gpus} is not a multiple of parallel.tensor_parallel ({tp}): pass a multiple of {tp} "
                          f"as --gpus, or set parallel.tensor_parallel to a divisor of {gpus}.")
    return check_trainer_layout(config, gpus)


def check_run(config: Config, ds_user: dict[str, Any], gpus: int, where: str) -> tuple[ParallelLayout, dict[str, Any]]:
    """The checks the trainer's preflight makes of a run's settings on ``gpus`` GPUs (the layout and every value
    check, ``check_settings``; not the files, installed kernels or this host): the layout and the resolved
    DeepSpeed config."""
    layout = check_layout(config, gpus)
    return layout, check_settings(config, ds_user, layout, where)


def recipe_global_batch(recipe: Config) -> int:
    """Sequences per optimizer step of a single-GPU recipe: micro x accumulation (dp = 1)."""
    return recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps


def accumulation_steps(global_batch: int, micro_batch: int, dp: int) -> int:
    """The accumulation that keeps ``global_batch`` = micro x accumulation x dp exactly."""
    if global_batch < 1:
        raise ConfigError(f"The global batch must be at least 1 sequence, got {global_batch}.")
    if micro_batch < 1:
        raise ConfigError(f"train.micro_batch_size must be at least 1, got {micro_batch}.")
    per_step = micro_batch * dp
    if global_batch % per_step:
        fits = [d for d in range(1, global_batch + 1) if global_batch % (micro_batch * d) == 0]
        way_out = (f"Use a GPU count whose data-parallel size is one of {fits[:12]}, change" if fits else
                   "No data-parallel size keeps it with this micro-batch: change")
        raise ConfigError(
            f"The global batch of {global_batch} sequences is not divisible by train.micro_batch_size {micro_batch} x "
            f"data-parallel size {dp} = {per_step}, so no whole train.gradient_accumulation_steps keeps it. {way_out} "
            f"train.micro_batch_size, or set the global batch (--global-batch; GLOBAL_BATCH for slurm/launch.sh) to a "
            f"multiple of {per_step}."
        )
    return global_batch // per_step


# ----------------------------------------------------------------------------------------------
# Model states
# ----------------------------------------------------------------------------------------------


def parameter_groups_numel(config: Config) -> list[list[int]]:
    """Element counts of the trainer's AdamW groups, in DeepSpeed's flattening order (built on meta)."""
    groups = _groups(json.dumps(config.model.to_dict(), sort_keys=True), config.train.decay_groups)
    assert sum(map(sum, groups)) == parameter_count(config.model)  # the count MFU uses is the count we plan with
    return [list(g) for g in groups]


@functools.lru_cache(maxsize=8)
def _groups(model_json: str, decay_groups: str) -> tuple[tuple[int, ...], ...]:
    from .config import TrainConfig
    from .model import build_model
    from .train.optim import parameter_groups

    with torch.device("meta"):
        model = build_model(ModelConfig(**json.loads(model_json)))
    groups = parameter_groups(model, TrainConfig(decay_groups=decay_groups))
    return tuple(tuple(p.numel() for p in group["params"]) for group in groups)


def straddling_numel(sizes: list[int], dp: int, rank: int) -> int:
    """Elements of the whole tensors of one flat group that overlap ``rank``'s 1/dp partition."""
    partition = math.ceil(sum(sizes) / dp)
    lo, hi, start, held = rank * partition, (rank + 1) * partition, 0, 0
    for size in sizes:
        if start < hi and start + size > lo:
            held += size
        start += size
    return held


@dataclass(frozen=True)
class States:
    params: float
    grads: float
    optimizer: float
    buffers: float
    reference: float = 0.0  # DPO's frozen reference model

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers + self.reference


def _tp_local(config: Config, groups: list[list[int]], tp: int, ep: int) -> tuple[list[list[int]], int]:
    """Per-rank tensor sizes: matrices split over TP, CDMoE expert tables over EP (1-D tensors whole)."""
    m = config.model
    expert_table = m.num_experts * m.hidden_size if m.is_moe else -1
    local = [[size // ep if size == expert_table else size // tp if size > m.hidden_size else size for size in g]
             for g in groups]
    return local, sum(map(sum, local))


def model_states(config: Config, ds: dict[str, Any], layout: ParallelLayout, rank: Optional[int] = None) -> States:
    """Bytes of parameters, gradients, optimizer states and buffers on ``rank`` of DeepSpeed's
    data-parallel group (default: the worst)."""
    zero = ds.get("zero_optimization", {})
    stage = zero_stage(ds)
    bf16 = bf16_enabled(ds) if config.train.bf16 is None else config.train.bf16
    weight = 2 if bf16 else 4
    master = 4 if bf16 else 0
    fp32_grads = stage == 1 and bf16 and data_type(ds, "grad_accum_dtype") == torch.float32
    groups, local = _tp_local(config, parameter_groups_numel(config), layout.tensor_parallel, layout.expert_parallel)
    dp = layout.dp_size // layout.expert_parallel  # what ZeRO partitions over (see the module docstring)
    shard = sum(math.ceil(sum(g) / dp) for g in groups) if stage >= 1 else local

    params = weight * local
    if stage == 3:
        threshold = int(zero.get("stage3_param_persistence_threshold", PERSISTENCE_DEFAULT))
        params = weight * (shard + sum(size for g in groups for size in g if size < threshold))
    if stage <= 1:  # BF16_Optimizer keeps the bf16 gradients (zeroed, not freed) beside its fp32 ones
        grads = (4 + weight if fp32_grads else weight) * local
    elif stage == 2:
        ranks = range(dp) if rank is None else [rank]
        grads = weight * max(sum(straddling_numel(g, dp, r) for g in groups) for r in ranks)
    else:
        grads = weight * shard
    optimizer = (master + 8) * shard

    bucket = int(zero.get("reduce_bucket_size", BUCKET_DEFAULT))
    if stage in (1, 2) and zero.get("contiguous_gradients", True):
        buffers = weight * bucket * (2 if zero.get("overlap_comm", False) else 1)
    elif stage == 3:
        buffers = weight * (bucket + int(zero.get("stage3_prefetch_bucket_size", PREFETCH_DEFAULT)))
    else:
        buffers = 0
    return States(float(params), float(grads), float(optimizer), float(buffers))


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


def layer_bytes_per_token(m: ModelConfig, tp: int, sequence_parallel: bool, ep: int = 1) -> tuple[float, float]:
    """(bytes inside the TP-split projections, bytes outside them) one decoder layer keeps per token."""
    h, kv, inter = m.hidden_size, m.num_key_value_heads * m.head_dim, m.intermediate_size
    q = m.num_attention_heads * m.head_dim
    # residual scale inputs 2+2, two RMSNorms 6+6, the norms' outputs read by the projections 2+2
    outside = 20 * h
    # q/k norms 6q + 6kv, q,k,v after RoPE 2q + 4kv, dt_proj input 2kv, attention out 2q, o_proj input 2q, MLP 8I
    inside = 12 * q + 12 * kv + 8 * inter
    if m.is_moe:
        # the router and expert tables are replicated over tensor-parallel ranks: outside the split.
        # Gathered rows per (token, slot): one device keeps the down_embed rows (up_embed goes through
        # embedding_bag); the expert-parallel exchange (parallel.expert.local_experts) keeps the down and
        # up rows, the token copies and their product
        rows = 8 if ep > 1 else 2
        outside += rows * m.num_experts_per_tok * h + 4 * m.num_keys**2
    outside_split = tp if sequence_parallel else 1
    return inside / tp, outside / outside_split


def full_logits(layout: ParallelLayout, stage: int) -> bool:
    """Whether the trainer's loss builds the whole [tokens, V / tp] logits (ZeRO-3 gathers the LM head
    only inside its forward; TP's vocab-parallel loss works on a shard) instead of chunking them."""
    return stage == 3 or layout.tensor_parallel > 1


def activation_bytes_per_sequence(config: Config, layout: ParallelLayout, checkpointing: bool,
                                  whole_logits: bool = False) -> float:
    """Peak activation bytes one sequence of ``data.seq_length`` tokens adds to a rank."""
    m, seq = config.model, config.data.seq_length
    inside, outside = layer_bytes_per_token(m, layout.tensor_parallel, config.parallel.sequence_parallel,
                                            layout.expert_parallel)
    layer = inside + outside
    head = 8 * m.hidden_size  # final norm and LM-head input
    loss = 14 * m.vocab_size / layout.tensor_parallel if whole_logits else 2 * m.hidden_size
    if checkpointing:
        per_token = m.num_hidden_layers * 2 * m.hidden_size + layer + head + loss
    else:
        per_token = m.num_hidden_layers * layer + head + loss
    return per_token * seq


def loss_workspace_bytes(config: Config, tokens: Optional[int], whole_logits: bool) -> float:
    """Bytes the chunked loss holds once per micro-batch of ``tokens`` tokens (None: a micro-batch of
    at least one full chunk, the most it holds); 0 for whole logits."""
    if whole_logits:
        return 0.0
    vocab, hidden = config.model.vocab_size, config.model.hidden_size
    chunk = default_chunk_tokens(vocab, "cuda")
    rows = chunk if tokens is None else min(tokens, chunk)
    return float(6 * rows * vocab + 6 * vocab * hidden)


def largest_micro_batch(free_bytes: float, per_sequence: float) -> int:
    return max(0, int(free_bytes // per_sequence))


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    layout: ParallelLayout
    stage: int
    states: States
    per_sequence: float
    per_sequence_checkpointed: float
    loss_workspace: float  # at micro_batch
    loss_workspace_max: float  # at a full chunk: what any larger micro-batch needs
    gpu_bytes: float
    reserve_bytes: float
    micro_batch: int
    checkpointing: bool
    global_batch: int
    accumulation: int
    pairs: bool = False  # DPO: per_sequence* are per pair (chosen and rejected)

    @property
    def free_for_activations(self) -> float:
        """What is left for per-sequence activations at any micro-batch size."""
        return self.gpu_bytes - self.reserve_bytes - self.states.total - self.loss_workspace_max

    @property
    def activations(self) -> float:
        return self.micro_batch * (self.per_sequence_checkpointed if self.checkpointing else self.per_sequence)

    @property
    def total(self) -> float:
        return self.states.total + self.activations + self.loss_workspace + self.reserve_bytes


TASKS = ("pretrain", "sft", "dpo")


def make_plan(recipe: Config, config: Config, ds_user: dict[str, Any], gpus: int, gpu_mem_gb: float,
              reserve_gb: float, global_batch: Optional[int] = None, task: str = "pretrain",
              where: str = "the DeepSpeed config") -> Plan:
    """``recipe`` is the YAML alone (its global batch); ``config`` the YAML with overrides (what runs);
    ``ds_user`` the DeepSpeed JSON ``where`` names, checked as the trainer checks it; ``task`` the trainer
    (SFT's memory is pretraining's at data.seq_length; a DPO sample is a pair)."""
    if task not in TASKS:
        raise ConfigError(f"task {task!r}: plan one of {', '.join(TASKS)}.")
    if not (math.isfinite(gpu_mem_gb) and gpu_mem_gb > 0):  # nan and inf reached int() as a ValueError traceback
        raise ConfigError(f"--gpu-mem-gb must be a finite number more than 0, got {gpu_mem_gb}.")
    if not (math.isfinite(reserve_gb) and reserve_gb >= 0):
        raise ConfigError(f"--reserve-gb must be a finite number, 0 or more (memory the model cannot use), got {reserve_gb}.")
    layout, ds = check_run(config, ds_user, gpus, where)
    global_batch = recipe_global_batch(recipe) if global_batch is None else global_batch
    stage = zero_stage(ds)
    dpo = task == "dpo"
    whole = full_logits(layout, stage) or dpo
    sequences = 2 if dpo else 1
    tokens = config.train.micro_batch_size * config.data.seq_length
    states = model_states(config, ds, layout)
    if dpo and config.finetune.reference == "model":
        states = dataclasses.replace(states, reference=2.0 * parameter_count(config.model))
    return Plan(
        layout=layout,
        stage=stage,
        states=states,
        per_sequence=sequences * activation_bytes_per_sequence(config, layout, False, whole),
        per_sequence_checkpointed=sequences * activation_bytes_per_sequence(config, layout, True, whole),
        loss_workspace=loss_workspace_bytes(config, tokens, whole),
        loss_workspace_max=loss_workspace_bytes(config, None, whole),
        gpu_bytes=gpu_mem_gb * GB,
        reserve_bytes=reserve_gb * GB,
        micro_batch=config.train.micro_batch_size,
        checkpointing=config.train.activation_checkpointing,
        global_batch=global_batch,
        accumulation=accumulation_steps(global_batch, config.train.micro_batch_size, layout.dp_size),
        pairs=dpo,
    )


def _gb(value: float) -> str:
    return f"{value / GB:.2f} GB"


def format_plan(plan: Plan, name: str, params: int) -> list[str]:
    """The lines launch/plan.py prints (and the YAML comments quote)."""
    s, l = plan.states, plan.layout
    fit = largest_micro_batch(plan.free_for_activations, plan.per_sequence)
    fit_ckpt = largest_micro_batch(plan.free_for_activations, plan.per_sequence_checkpointed)
    verdict = "fits" if plan.total <= plan.gpu_bytes else "does NOT fit"
    return [
        f"{name}: {params / 1e6:.1f}M params, {l.world_size} GPU(s) = tp {l.tensor_parallel} x dp {l.dp_size} "
        f"(ep {l.expert_parallel}), ZeRO-{plan.stage}, per GPU:",
        f"  parameters {_gb(s.params)} + gradients {_gb(s.grads)} + optimizer {_gb(s.optimizer)} + buffers {_gb(s.buffers)}"
        f"{f' + reference model {_gb(s.reference)}' if s.reference else ''} = {_gb(s.total)}",
        f"  activations per {'pair' if plan.pairs else 'sequence'}: {_gb(plan.per_sequence)}, with activation checkpointing {_gb(plan.per_sequence_checkpointed)}",
        f"  micro {plan.micro_batch}{' (checkpointed)' if plan.checkpointing else ''}: {_gb(s.total)} + {_gb(plan.activations)} "
        f"+ loss workspace {_gb(plan.loss_workspace)} + reserve {_gb(plan.reserve_bytes)} = {_gb(plan.total)} of "
        f"{_gb(plan.gpu_bytes)}: {verdict}",
        f"  largest micro-batch: {fit} without, {fit_ckpt} with activation checkpointing",
        f"  global batch {plan.global_batch} = micro {plan.micro_batch} x accumulation {plan.accumulation} x dp {l.dp_size}",
    ]
