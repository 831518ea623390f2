"""Expert parallelism in the trainer: EP 2 (2 ranks, ZeRO-2, and 4 ranks with two replicas of each
expert shard) reproduces one process's 10 losses; a
checkpoint saved at EP 2 resumes at EP 1 (and at TP 2) and one saved at EP 1 resumes at EP 2, continuing
the same losses; an EP 2 checkpoint exports to Hugging Face.
Tolerance as in test_train_zero_parity: 2e-5 relative, fp32."""
from functools import lru_cache

import pytest
import torch

from train_helpers import losses, pretrain, scalars, scratch

TOLERANCE = 2e-5
MOE = {"model.preset": "doge-tiny-moe", "train.moe_stats_window": 3}  # the routing window: past it within 10 steps


@lru_cache(maxsize=None)
def runs():
    single, ep2, ep1 = scratch() / "moe_single", scratch() / "moe_ep2", scratch() / "moe_ep2_to_ep1"
    back = scratch() / "moe_ep1_to_ep2"
    pretrain(single, 0, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2, save_interval=5, **MOE)
    pretrain(ep2, 2, nproc=2, micro_batch_size=2, gradient_accumulation_steps=1, save_interval=5,
             **MOE, **{"parallel.expert_parallel": 2})
    pretrain(ep1, 1, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2, save_interval=7,
             **MOE, **{"run.resume": str(ep2 / "checkpoints" / "step_00000005")})
    pretrain(back, 2, nproc=2, micro_batch_size=2, gradient_accumulation_steps=1,
             **MOE, **{"parallel.expert_parallel": 2, "run.resume": str(ep1 / "checkpoints" / "step_00000007")})
    return single, ep2, ep1, back


def test_ep2_matches_one_process_and_checkpoints_move_between_ep_sizes():
    single, ep2, ep1, back = (losses(run) for run in runs())
    assert ep2 == pytest.approx(single, rel=TOLERANCE)
    assert ep1 == pytest.approx(single[5:], rel=TOLERANCE)
    assert back == pytest.approx(single[7:], rel=TOLERANCE)


@pytest.mark.parametrize("tag", ["moe/expert_load_max_over_mean", "moe/unused_expert_fraction", "moe/router_entropy"])
def test_routing_statistics_continue_across_resumes_at_other_layouts(tag):
    """The expert loads are counted over the last train.moe_stats_window (here 3) optimizer steps of all
    ranks: one process at accumulation 2 and EP 2 at accumulation 1 log the same values past the window,
    where the window held each rank's micro-batches (one process's covered half the steps, from step 2
    on its values differed), and a resumed run (here at another number of ranks) continues that window
    from the checkpoint, where it restarted empty and its curves jumped at every resume
    (expert_load_max_over_mean 3.0 instead of 1.8 at the first step)."""
    single, ep2, ep1, back = (scalars(run, tag) for run in runs())
    assert ep2 == pytest.approx(single, rel=TOLERANCE)
    assert ep1 == pytest.approx({step: value for step, value in single.items() if step > 5}, rel=TOLERANCE)
    assert back == pytest.approx({step: value for step, value in single.items() if step > 7}, rel=TOLERANCE)


def test_ep2_checkpoint_resumes_at_tensor_parallel_2():
    """The universal checkpoint of an EP 2 run names the tensor-parallel split dims (row-parallel
    weights along dim 1), so a TP 2 run cuts them right; its routing statistics continue the window."""
    run_dir = scratch() / "moe_ep2_to_tp2"
    pretrain(run_dir, 2, nproc=2, micro_batch_size=2, gradient_accumulation_steps=2,
             **MOE, **{"parallel.tensor_parallel": 2, "run.resume": str(runs()[1] / "checkpoints" / "step_00000005")})
    assert losses(run_dir) == pytest.approx(losses(runs()[0])[5:], rel=TOLERANCE)
    # both tensor-parallel ranks route the same tokens: the continued routing window counts them once
    load = scalars(runs()[0], "moe/expert_load_max_over_mean")
    assert scalars(run_dir, "moe/expert_load_max_over_mean") == pytest.approx({k: v for k, v in load.items() if k > 5}, rel=TOLERANCE)


def test_ep2_with_two_expert_data_parallel_replicas_matches_one_process():
    """4 ranks at EP 2: every expert shard has two replicas, so DeepSpeed reduces and partitions the
    expert gradients over that group of 2 (and the dense ones over all 4 via the expert group)."""
    run_dir = scratch() / "moe_ep2_edp2"
    pretrain(run_dir, 2, nproc=4, micro_batch_size=1, gradient_accumulation_steps=1,
             **MOE, **{"parallel.expert_parallel": 2})
    assert losses(run_dir) == pytest.approx(losses(runs()[0]), rel=TOLERANCE)


def assert_exports_like(checkpoint, reference, tmp_path):
    """``checkpoint`` exported to Hugging Face gives transformers' logits of the one-process ``reference``."""
    from transformers import AutoModelForCausalLM

    from doge_dist.train.export import export_hf, load_checkpoint_model

    export_hf(checkpoint, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    same_step_one_process = load_checkpoint_model(reference).eval()
    for layer in same_step_one_process.model.layers:  # transformers always routes with the reference reshape
        layer.mlp.router_layout = "hf_compat"
    ids = torch.randint(3, 512, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - same_step_one_process(ids).logits).abs().max() <= 1e-3


def test_ep2_checkpoint_exports_to_transformers(tmp_path):
    single, ep2, *_ = runs()
    assert_exports_like(ep2 / "checkpoints" / "step_00000005", single / "checkpoints" / "step_00000005", tmp_path)
