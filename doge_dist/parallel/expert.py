"""Expert-parallel CDMoE: the expert tables ``down_embed``/``up_embed`` (E x H each) sharded by rows
over megatron-core's expert-model-parallel group; the router stays global (replicated).

The exchange, chosen for Doge's many tiny experts: every rank all-gathers the group's tokens, adds
the contributions of the experts it owns, and one reduce-scatter returns each rank the sum for its
own tokens. Per step and layer that moves (EP - 1) x N x H values each way, the same as an
all-to-all dispatch once a token's k experts span every rank (k = 16..64 >> EP here), without
the all-to-all's variable split sizes; routing weights and int32 ids add about 6% at doge-1.4b-moe.
``launch/bench.py --comm`` prints the per-step volumes of both designs at EP 2, 4 and 8.
"""
import re
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig
from ..model.cdmoe import CDMoE
from ..model.doge import DogeForCausalLM
from .comm import gather, gather_for_replicated_use, reduce_scatter

EXPERT_PARAM = re.compile(r"mlp\.(down|up)_embed\.weight$")


def is_expert_param(name: str) -> bool:
    return bool(EXPERT_PARAM.search(name))


def expert_rows(table: torch.Tensor, rank: int, ep: int) -> torch.Tensor:
    return table.chunk(ep, dim=0)[rank].clone()


def shard_experts(state: dict, rank: int, ep: int) -> dict:
    """Expert-parallel rank ``rank``'s rows of every expert table in ``state``."""
    return {n: expert_rows(t, rank, ep) if is_expert_param(n) else t for n, t in state.items()}


def merge_experts(shards: list[dict]) -> dict:
    """Inverse of ``shard_experts``."""
    return {n: torch.cat([s[n] for s in shards]) if is_expert_param(n) else t for n, t in shards[0].items()}


def expert_universal_info() -> dict:
    """How DeepSpeed's ``ds_to_universal`` merges expert-parallel shards (DeepSpeed's model-parallel
    ranks under ``ExpertParallelMPU``): expert tables along dim 0, everything else replicated."""
    from deepspeed.checkpoint import constants as uc

    return {"universal_checkpoint_version": 0.2,
            uc.TP_REPLICATED_PARAMETER_PATTERNS: [r"^(?!.*mlp\.(down|up)_embed\.weight$).*$"]}


class ExpertParallelCDMoE(CDMoE):
    """CDMoE whose expert rows [offset, offset + E/EP) live on this rank."""

    ep_group: dist.ProcessGroup
    expert_offset: int

    def forward(self, x: torch.Tensor):
        B, T, H = x.shape
        scores, expert_ids, routing = self.route(x)
        weights = F.softmax(scores, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # ranks may hold different token counts (padded fine-tuning batches): pad to the largest, with
        # expert id -1 (no expert) on the padding rows
        N = B * T
        rows = torch.tensor([N], device=x.device)
        dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=self.ep_group)
        pad = int(rows) - N
        tokens = gather(F.pad(x.reshape(N, H), (0, 0, 0, pad)), 0, self.ep_group)
        gates = gather(F.pad(weights, (0, 0, 0, pad)), 0, self.ep_group)
        ids = F.pad(expert_ids.int(), (0, 0, 0, pad), value=-1)  # int32 halves the exchange
        ids = gather_for_replicated_use(ids, self.ep_group).long()
        partial = self.local_experts(tokens, ids, gates)
        experts_out = reduce_scatter(partial, 0, self.ep_group)[:N]
        return self.shared_expert(x) + experts_out.view(B, T, H), routing

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        return super(CDMoE, self).forward(x)

    def local_experts(self, tokens: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Sum over (token, slot) pairs routed to an expert of this rank; zero for the others."""
        local = (ids >= self.expert_offset) & (ids < self.expert_offset + self.down_embed.num_embeddings)
        token, slot = local.nonzero(as_tuple=True)
        expert = ids[token, slot] - self.expert_offset
        activation = (self.down_embed(expert) * tokens[token]).sum(-1)
        contribution = (F.silu(activation) * gates[token, slot]).to(tokens.dtype)[:, None] * self.up_embed(expert)
        return torch.zeros_like(tokens).index_add(0, token, contribution)


def check_expert_parallel(config: ModelConfig, ep: int) -> None:
    if not config.is_moe:
        raise ConfigError("parallel.expert_parallel > 1 needs a MoE model (model.is_moe: true, e.g. preset doge-20m-moe).")
    if config.num_experts % ep:
        raise ConfigError(f"model.num_experts ({config.num_experts}) is not divisible by parallel.expert_parallel ({ep}).")


def parallelize_experts(model: DogeForCausalLM, group: dist.ProcessGroup) -> DogeForCausalLM:
    """Keep only this rank's expert rows, in place; every rank passes the same weights."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    config = model.config
    check_expert_parallel(config, ep)
    local = config.num_experts // ep
    for layer in model.model.layers:
        moe = layer.mlp
        if not isinstance(moe, CDMoE):
            continue
        for table in (moe.down_embed, moe.up_embed):
            # the same Parameter keeps its rows only, so hooks added earlier (sequence parallel) stay
            table.weight.data = expert_rows(table.weight.data, rank, ep)
            table.num_embeddings = local
            table.weight.expert_parallel = True  # reduced over the expert-data-parallel group only
        moe.__class__ = ExpertParallelCDMoE
        moe.ep_group, moe.expert_offset = group, rank * local
    return model


def prepare_expert_gradients(model: DogeForCausalLM, group: dist.ProcessGroup, tp_group: Optional[dist.ProcessGroup] = None) -> None:
    """Gradient bookkeeping for training under ``ExpertParallelMPU``, where DeepSpeed averages over
    the expert-data-parallel group only (1/EP of the data-parallel ranks):
    - a dense parameter's gradient is summed over the expert-parallel group and divided by EP here,
      so with DeepSpeed's average it is the mean over all data-parallel ranks;
    - an expert shard's gradient already sums every expert-parallel rank's tokens (the exchange's
      backward), so it is only divided by EP.
    DeepSpeed's gradient norm sums, over its model-parallel group (tp x ep), every tensor marked
    model-parallel plus the others from that group's rank 0. Expert shards are marked model-parallel;
    a tensor that another rank of the group holds too (a tensor-parallel slice on expert-parallel
    ranks > 0, an expert shard on tensor-parallel ranks > 0) gets DeepSpeed's ``ds_pipe_replicated``,
    the flag that keeps a replicated tensor out of the norm, so every tensor counts exactly once."""
    ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0

    def mean_over_expert_group(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad / ep

    for name, param in model.named_parameters():
        if is_expert_param(name):
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, 1
            param.ds_pipe_replicated = tp_rank > 0
            param.register_hook(lambda grad: grad / ep)
        else:
            param.ds_pipe_replicated = bool(getattr(param, "tensor_model_parallel", False)) and ep_rank > 0
            param.register_hook(mean_over_expert_group)
