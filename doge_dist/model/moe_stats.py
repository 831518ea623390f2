"""CDMoE routing statistics for monitoring: expert load balance over a recent window and router entropy.

Counts are kept per layer (each layer has its own experts) over the last ``window`` steps, so a
rarely used expert shows up as unused only if no token reached it for that long.
"""
from collections import deque
from typing import Optional

import torch
import torch.nn.functional as F

from .cdmoe import Routing


def router_entropy(routing: Routing) -> torch.Tensor:
    """Mean entropy (nats) of each token's distribution over all E experts. The product-key softmax
    factorises into softmax(x) x softmax(y), so the entropy is H(x half) + H(y half)."""

    def entropy(logits: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    return (entropy(routing.logits_x) + entropy(routing.logits_y)).mean()


class MoEStats:
    def __init__(self, num_experts: int, window: int = 100) -> None:
        self.num_experts = num_experts
        self.window: deque = deque(maxlen=window)
        self.entropies: list[float] = []
        self.step_counts: Optional[torch.Tensor] = None  # [layers, E] for the step in progress

    def update(self, routings: list[Routing]) -> None:
        """Record one step's routing (call once per micro-batch; counts are summed per step by ``end_step``)."""
        counts = torch.stack(
            [torch.bincount(r.expert_ids.reshape(-1), minlength=self.num_experts).float() for r in routings]
        )
        self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        self.entropies.append(sum(router_entropy(r).item() for r in routings) / len(routings))

    def end_step(self, reduce_group: Optional[object] = None) -> None:
        """Close the step; counts are summed over ``reduce_group`` (data-parallel ranks) when given."""
        if self.step_counts is None:
            return
        counts, self.step_counts = self.step_counts, None
        if reduce_group is not None:
            import torch.distributed as dist

            dist.all_reduce(counts, group=reduce_group)
        self.window.append(counts)

    def summary(self) -> dict[str, float]:
        """``moe/expert_load_max_over_mean``, ``moe/unused_expert_fraction``, ``moe/router_entropy``."""
        if not self.window:
            return {}
        counts = torch.stack(list(self.window)).sum(0)  # [layers, E]
        mean = counts.mean(-1).clamp(min=1e-9)
        stats = {
            "moe/expert_load_max_over_mean": (counts.max(-1).values / mean).mean().item(),
            "moe/unused_expert_fraction": (counts == 0).float().mean().item(),
            "moe/router_entropy": sum(self.entropies) / max(len(self.entropies), 1),
        }
        self.entropies = []
        return stats
