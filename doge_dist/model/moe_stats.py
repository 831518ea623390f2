"""CDMoE routing statistics for monitoring: expert load balance over a recent window and router entropy.

Counts are kept per layer (each layer has its own experts) over the last ``window`` optimizer steps,
so a rarely used expert shows up as unused only if no token reached it for that long. A window entry
is one step's counts (``end_step``), not one micro-batch's: summed over the ranks, entry i is then
the same global step at every data-parallel size and accumulation, so the logged values and a
checkpointed window (``global_state``) do not depend on the layout.
"""
import warnings
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cdmoe import Routing


def token_entropies(routing: Routing) -> torch.Tensor:
    """[N] entropy (nats) of each token's distribution over all E experts. The product-key softmax
    factorises into softmax(x) x softmax(y), so the entropy is H(x half) + H(y half)."""

    def entropy(logits: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    return entropy(routing.logits_x) + entropy(routing.logits_y)


def router_entropy(routing: Routing) -> torch.Tensor:
    """Mean entropy (nats) of the tokens' distributions over all E experts."""
    return token_entropies(routing).mean()


WINDOW_OF = "window_of"  # in a checkpointed state: "steps" (older checkpoints' windows held micro-batches)


class MoEStats:
    def __init__(self, num_experts: int, window: int = 100) -> None:
        self.num_experts = num_experts
        self.window: deque = deque(maxlen=window)  # [layers, E] expert counts per optimizer step
        self.step_counts: Optional[torch.Tensor] = None  # [layers, E] this rank's counts of the step under way
        self.entropy = torch.zeros(2, dtype=torch.float64)  # since the last summary: sum over real tokens, their count

    @torch.no_grad()
    def update(self, routings: list[Routing], token_mask: Optional[torch.Tensor] = None) -> None:
        """Record one micro-batch's routing into the step under way (``end_step`` closes it); ``token_mask``
        (the routed tokens' order): only its 1s count, in the expert loads and in the entropy (a mean
        over every real token, averaged over layers). Everything stays on the routing's device: reading
        a value back to the host would wait for the GPU at every micro-batch and layer; ``summary``
        reads the sums at log time."""
        ids = routings[0].expert_ids
        real = torch.ones(len(ids), device=ids.device) if token_mask is None else token_mask.reshape(-1).float()

        def counts(routing: Routing) -> torch.Tensor:
            ids = routing.expert_ids
            weights = None if token_mask is None else token_mask.reshape(-1, 1).expand_as(ids).reshape(-1).float()
            return torch.bincount(ids.reshape(-1), weights, minlength=self.num_experts).float()

        step = torch.stack([counts(r) for r in routings])
        self.step_counts = step if self.step_counts is None else self.step_counts + step
        entropy_sum = sum((token_entropies(r) * real).sum().double() for r in routings) / len(routings)
        sums = torch.stack([entropy_sum, real.sum().double()])
        self.entropy = self.entropy.to(sums.device) + sums

    def end_step(self) -> None:
        """Close one optimizer step: its counts enter the window (the oldest step leaves a full one).
        Every rank calls it once per step, after its micro-batches, also for a step whose update was
        skipped (non-finite), whose routing was counted all the same; so every rank's window has the
        same length and entry i, summed over the ranks, is the same global step at every layout."""
        if self.step_counts is not None:
            self.window.append(self.step_counts)
            self.step_counts = None

    def global_state(self, copies: int = 1, group: Optional[object] = None) -> dict[str, torch.Tensor]:
        """The window and the entropy accumulator summed over all ranks of ``group`` (default: every rank
        once torch.distributed is initialised; a collective call then), for a checkpoint: a resumed run
        goes on with the same window whatever its layout (``load_global_state``). ``copies``: the ranks
        that route each token (tensor-parallel ranks without sequence parallelism), counted once. Called
        between steps (the loop saves after ``end_step``): a step under way is not in it."""
        window = torch.stack(list(self.window)) if self.window else torch.zeros(0)
        entropy = self.entropy.to(window.device, copy=True)  # reduced in place: not the running sums
        if group is not None or dist.is_initialized():
            dist.all_reduce(window, group=group)
            dist.all_reduce(entropy, group=group)
        return {"window": window.cpu() / copies, "entropy": entropy.cpu() / copies, WINDOW_OF: "steps"}

    def load_global_state(self, state: dict[str, torch.Tensor], owner: bool, device: torch.device, copies: int = 1) -> None:
        """Continue from ``global_state``: one rank (``owner``) takes the sums (times this layout's
        ``copies``), the others zeros, so every rank's window has the same length and the sum over ranks
        is the one this layout would have counted.

        A checkpoint written before the window held optimizer steps (no ``WINDOW_OF``) saved the last
        ``window`` micro-batches of each rank, summed over the ranks: how many made one step its meta
        file does not say, so they stay in the window one entry each (the curves go on without a jump)
        until as many steps have pushed them out; until then ``moe/expert_load_max_over_mean`` and
        ``moe/unused_expert_fraction`` count fewer tokens than a window of steps."""
        if state.get(WINDOW_OF) != "steps" and len(state["window"]) and owner:
            warnings.warn(f"The checkpoint's MoE routing window holds {len(state['window'])} micro-batches (written before "
                          f"it held optimizer steps): they count as steps in moe/expert_load_max_over_mean and "
                          f"moe/unused_expert_fraction until {self.window.maxlen} steps have pushed them out.")
        window = state["window"].to(device) * copies
        entropy = state["entropy"].to(torch.float64) * copies
        if not owner:
            window, entropy = torch.zeros_like(window), torch.zeros_like(entropy)
        self.window.clear()
        self.window.extend(window.unbind(0))
        self.step_counts = None
        self.entropy = entropy

    def summary(self, group: Optional[object] = None) -> dict[str, float]:
        """``moe/expert_load_max_over_mean`` and ``moe/unused_expert_fraction`` over the window's steps,
        ``moe/router_entropy`` over the tokens since the last summary, over all ranks of ``group``
        (default: every rank once torch.distributed is initialised; a collective call then)."""
        if not self.window:
            return {}
        counts = torch.stack(list(self.window)).sum(0)  # [layers, E]
        entropy, self.entropy = self.entropy.to(counts.device), torch.zeros_like(self.entropy)  # NCCL reduces CUDA tensors only
        if group is not None or dist.is_initialized():
            dist.all_reduce(counts, group=group)
            dist.all_reduce(entropy, group=group)
        mean = counts.mean(-1).clamp(min=1e-9)
        return {
            "moe/expert_load_max_over_mean": (counts.max(-1).values / mean).mean().item(),
            "moe/unused_expert_fraction": (counts == 0).float().mean().item(),
            "moe/router_entropy": (entropy[0] / entropy[1].clamp(min=1)).item(),
        }
