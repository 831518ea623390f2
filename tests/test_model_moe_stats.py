"""MoE monitoring statistics equal direct computations."""
import math
import warnings

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
    for ids in ([[0, 1], [0, 1]], [[0, 0], [1, 1]], [[0, 0], [0, 0]]):  # one step each: the first leaves the window
        stats.update([Routing(logits, logits, torch.tensor(ids))])
        stats.end_step()
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
    stats.end_step()
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


def over_ranks(ranks: list[MoEStats]) -> MoEStats:
    """What ``summary`` and ``global_state`` all-reduce the ranks' windows and entropy sums into: their
    entry-wise sums (every rank's window has the same length). The ranks' entropy sums start again, as
    after ``summary``."""
    assert len({len(stats.window) for stats in ranks}) == 1
    merged = MoEStats(ranks[0].num_experts, ranks[0].window.maxlen)
    merged.window.extend(sum(entries) for entries in zip(*(stats.window for stats in ranks)))
    merged.entropy = sum(stats.entropy for stats in ranks)
    for stats in ranks:
        stats.entropy = torch.zeros_like(stats.entropy)
    return merged


def test_the_window_counts_optimizer_steps_at_every_layout():
    """One process with accumulation 4 and two data-parallel ranks with accumulation 2 route the same
    global batches: their moe/* scalars are the same, also past the window (the window holds optimizer
    steps). It held each rank's micro-batches, so two ranks' window covered twice the steps (here one
    step against two: at step 4 moe/unused_expert_fraction 0.5 against 0.0), and a resume at another
    layout changed what the window covers midway."""
    torch.manual_seed(0)
    experts, tokens, top_k = 16, 64, 4

    def routing(step: int) -> Routing:  # after step 2 only experts 0-7 are chosen: half of them unused past the window
        ids = torch.randint(0, experts if step < 3 else experts // 2, (tokens, top_k))
        return Routing(torch.randn(tokens, 4), torch.randn(tokens, 4), ids)

    steps = [[routing(step) for _ in range(4)] for step in range(12)]  # 4 micro-batches (sequences) per optimizer step
    single, rank0, rank1 = (MoEStats(experts, window=4) for _ in range(3))
    for step, micro in enumerate(steps):
        for routed in micro:
            single.update([routed])
        for routed in micro[:2]:
            rank0.update([routed])
        for routed in micro[2:]:
            rank1.update([routed])
        for stats in (single, rank0, rank1):
            stats.end_step()
        two_ranks = over_ranks([rank0, rank1])
        assert len(single.window) == len(two_ranks.window) == min(step + 1, 4)
        assert all(torch.equal(a, b) for a, b in zip(single.window, two_ranks.window))
        assert two_ranks.summary() == pytest.approx(single.summary(), rel=1e-12), step
    assert single.summary()["moe/unused_expert_fraction"] == 0.5


def test_a_resume_at_another_layout_continues_the_same_window():
    """The checkpointed window (summed over the ranks) continues, at any layout, as one process's."""
    torch.manual_seed(0)
    logits = torch.zeros(8, 2)
    steps = [[Routing(logits, logits, torch.randint(0, 4, (8, 2))) for _ in range(2)] for _ in range(6)]
    single, rank0, rank1 = (MoEStats(4, window=3) for _ in range(3))
    for micro in steps[:4]:
        single.update([micro[0]]), single.update([micro[1]]), single.end_step()
        rank0.update([micro[0]]), rank0.end_step()
        rank1.update([micro[1]]), rank1.end_step()
    resumed = MoEStats(4, window=3)  # two ranks' checkpoint, resumed in one process
    resumed.load_global_state(over_ranks([rank0, rank1]).global_state(), owner=True, device=torch.device("cpu"))
    for micro in steps[4:]:
        for stats in (single, resumed):
            stats.update([micro[0]]), stats.update([micro[1]]), stats.end_step()
        assert resumed.summary() == pytest.approx(single.summary(), rel=1e-12)


def test_an_older_checkpoints_window_of_micro_batches_is_kept_and_named(tmp_path):
    """Checkpoints written before the window held optimizer steps saved micro-batches (no "window_of"):
    a resume keeps them as entries, so the curves go on, until as many steps have pushed them out, and
    says so once (the owner rank); a checkpoint of steps loads without a word, also from disk."""
    old = {"window": torch.tensor([[[1.0, 0, 0, 0]], [[0, 1.0, 0, 0]]]), "entropy": torch.tensor([3.0, 2.0], dtype=torch.float64)}
    stats, other_rank = MoEStats(4, window=3), MoEStats(4, window=3)
    with pytest.warns(UserWarning, match="holds 2 micro-batches .* until 3 steps have pushed them out"):
        stats.load_global_state(old, owner=True, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other_rank.load_global_state(old, owner=False, device=torch.device("cpu"))
    logits = torch.zeros(1, 2)
    unused = []
    for _ in range(2):
        stats.update([Routing(logits, logits, torch.tensor([[2]]))])
        stats.end_step()
        unused.append(stats.summary()["moe/unused_expert_fraction"])
    assert unused == [0.25, 0.5]  # experts 0, 1, 2 in the window, then 1 and 2: the first old entry left it
    torch.save(stats.global_state(), tmp_path / "monitor_state.pt")
    saved = torch.load(tmp_path / "monitor_state.pt", weights_only=True)  # as checkpoint.read_monitor_state reads it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEStats(4, window=3).load_global_state(saved, owner=True, device=torch.device("cpu"))
