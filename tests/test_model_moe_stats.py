"""MoE monitoring statistics equal direct computations."""
import math

import pytest

import torch
import torch.nn.functional as F

from doge_dist.model.cdmoe import Routing
from doge_dist.model.moe_stats import MoEStats, router_entropy


def test_router_entropy_equals_entropy_over_all_experts():
    torch.manual_seed(0)
    lx, ly = torch.randn(5, 4), torch.randn(5, 4)
    probs = F.softmax((lx[:, :, None] + ly[:, None, :]).reshape(5, 16), dim=-1)
    direct = -(probs * probs.log()).sum(-1).mean()
    assert torch.allclose(router_entropy(Routing(lx, ly, torch.zeros(5, 2, dtype=torch.long))), direct, atol=1e-5)
    uniform = Routing(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.long))
    assert math.isclose(router_entropy(uniform).item(), math.log(16), rel_tol=1e-6)


def test_load_and_unused_fraction_over_the_window():
    stats = MoEStats(num_experts=4, window=2)
    logits = torch.zeros(2, 2)
    for ids in ([[0, 1], [0, 1]], [[0, 0], [1, 1]], [[0, 0], [0, 0]]):  # the first micro-batch leaves the window
        stats.update([Routing(logits, logits, torch.tensor(ids))])
    summary = stats.summary()
    # window counts: expert 0 -> 6, expert 1 -> 2, experts 2, 3 -> 0; mean 2
    assert summary["moe/expert_load_max_over_mean"] == 3.0
    assert summary["moe/unused_expert_fraction"] == 0.5
    assert summary["moe/router_entropy"] == pytest.approx(math.log(4))


def test_router_entropy_leaves_the_padding_out():
    """Fine-tuning batches are right-padded: the padding's routing (here sharply peaked, entropy ~0)
    must not pull moe/router_entropy down, as it stays out of the expert counts; micro-batches with
    fewer real tokens weigh less (the mean over every real token)."""
    uniform, peaked = torch.zeros(3, 4), torch.tensor([[50.0, 0, 0, 0]]).expand(3, 4)
    ids = torch.zeros(3, 1, dtype=torch.long)
    stats = MoEStats(num_experts=16)
    stats.update([Routing(torch.cat([uniform[:1], peaked[:2]]), torch.cat([uniform[:1], peaked[:2]]), ids)],
                 token_mask=torch.tensor([[1, 0, 0]]))  # one real token (uniform routing), two pads
    stats.update([Routing(peaked, peaked, ids)], token_mask=torch.tensor([[1, 1, 1]]))  # three real, entropy ~0
    assert stats.summary()["moe/router_entropy"] == pytest.approx(math.log(16) / 4, abs=1e-6)


def _saved_and_running_entropy(rank, world_size):
    stats = MoEStats(num_experts=4)
    stats.window.append(torch.tensor([[1.0, 0.0, 2.0, 1.0]]))
    stats.entropy += torch.tensor([10.0, 5.0], dtype=torch.float64)
    saved = stats.global_state()
    return saved["entropy"].tolist(), saved["window"].tolist(), stats.entropy.tolist()


def test_the_checkpointed_sums_leave_the_running_ones_alone():
    """global_state reduces over the ranks for the checkpoint; on CPU it reduced the running entropy sums
    themselves, so every save changed the next logged moe/router_entropy (on two ranks: [10, 5] -> [20, 10])."""
    from doge_dist.parallel.spawn import run_distributed

    for saved, window, running in run_distributed(_saved_and_running_entropy, 2):
        assert (saved, window, running) == ([20.0, 10.0], [[[2.0, 0.0, 4.0, 2.0]]], [10.0, 5.0])
