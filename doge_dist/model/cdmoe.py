"""Cross Domain Mixture of Experts (CDMoE).

The dense MLP stays as a shared expert; on top, each token retrieves ``k`` of ``E`` tiny experts
(one row of ``down_embed`` and one of ``up_embed`` each) through product keys: the router splits
its logits into an x half and a y half of ``nk = sqrt(E)`` keys; expert (i, j) scores x_i + y_j.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .mlp import GatedMLP


@dataclass
class Routing:
    """What one CDMoE layer decided, kept for the balance loss and MoE statistics."""

    logits_x: torch.Tensor  # [N, nk]
    logits_y: torch.Tensor  # [N, nk]
    expert_ids: torch.Tensor  # [N, k]


class CDMoE(GatedMLP):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.num_experts = config.num_experts
        self.num_keys = config.num_keys
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router_layout = config.router_layout
        self.router_gate = nn.Linear(config.hidden_size, 2 * self.num_keys, bias=False)
        self.down_embed = nn.Embedding(self.num_experts, config.hidden_size)
        self.up_embed = nn.Embedding(self.num_experts, config.hidden_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """Top-k experts per token: (scores [N, k], expert ids [N, k], routing record)."""
        logits = self.router_gate(x)  # [B, T, 2nk]
        N = logits.shape[0] * logits.shape[1]
        if self.router_layout == "split":
            logits_x, logits_y = logits.reshape(N, 2 * self.num_keys).chunk(2, dim=-1)
        else:  # hf_compat: the reference's reshape, which mixes different tokens' logits (defect 2)
            logits_x, logits_y = logits.view(2, N, self.num_keys)
        # The exact top-k of x_i + y_j lies within the top-k of x crossed with the top-k of y.
        candidates = min(self.top_k, self.num_keys)
        score_x, key_x = logits_x.topk(candidates, dim=-1)
        score_y, key_y = logits_y.topk(candidates, dim=-1)
        pair_scores = (score_x[:, :, None] + score_y[:, None, :]).reshape(N, -1)
        pair_ids = (key_x[:, :, None] * self.num_keys + key_y[:, None, :]).reshape(N, -1)
        scores, position = pair_scores.topk(self.top_k, dim=-1)
        expert_ids = pair_ids.gather(-1, position)
        return scores, expert_ids, Routing(logits_x, logits_y, expert_ids)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        B, T, H = x.shape
        scores, expert_ids, routing = self.route(x)
        weights = F.softmax(scores, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        tokens = x.reshape(B * T, H)
        activation = torch.einsum("nkh,nh->nk", self.down_embed(expert_ids), tokens)
        gates = F.silu(activation) * weights
        experts_out = F.embedding_bag(expert_ids, self.up_embed.weight, per_sample_weights=gates.to(x.dtype), mode="sum")
        return super().forward(x) + experts_out.view(B, T, H), routing


def balance_loss(routings: list[Routing], num_experts: int, formula: str, token_mask: Optional[torch.Tensor] = None):
    """Switch-Transformer load balance: E * sum_e f_e * P_e (1.0 when perfectly balanced).

    f_e is the fraction of (token, slot) assignments that went to expert e and P_e the mean
    router probability of expert e, both over non-padding tokens. The product-key softmax over
    all E experts factorises, softmax(x_i + y_j) = softmax(x)_i * softmax(y)_j, so P is an
    nk x nk matrix product instead of an [N, E] tensor.

    ``per_expert``: computed per layer (each layer has its own experts) and averaged.
    ``hf_compat``: transformers' ``load_balancing_loss_func``, which pools all layers' routing into
    one histogram as if the layers shared their experts.
    """
    if formula == "hf_compat":
        routings = [
            Routing(
                torch.cat([r.logits_x for r in routings]),
                torch.cat([r.logits_y for r in routings]),
                torch.cat([r.expert_ids for r in routings]),
            )
        ]
        if token_mask is not None:
            token_mask = token_mask.reshape(1, -1).expand(len(routings[0].expert_ids) // token_mask.numel(), -1)
    losses = [_switch_loss(r, num_experts, token_mask) for r in routings]
    return torch.stack(losses).mean()


def _switch_loss(routing: Routing, num_experts: int, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    N, k = routing.expert_ids.shape
    valid = torch.ones(N, device=routing.expert_ids.device) if token_mask is None else token_mask.reshape(-1).float()
    valid_count = valid.sum().clamp(min=1)
    counts = torch.zeros(num_experts, device=valid.device).scatter_add_(
        0, routing.expert_ids.reshape(-1), valid[:, None].expand(N, k).reshape(-1)
    )
    fraction = counts / (valid_count * k)
    prob_x = F.softmax(routing.logits_x.float(), dim=-1) * valid[:, None]
    prob_y = F.softmax(routing.logits_y.float(), dim=-1)
    mean_prob = (prob_x.T @ prob_y).reshape(-1) / valid_count  # expert id = i * nk + j
    return num_experts * (fraction * mean_prob).sum()
