"""One process (ZeRO-0, accumulation 2) vs two gloo ranks with ZeRO-1, -2 (deepspeed launcher) and -3
(torchrun) on the same 4 sequences per step: per-step losses agree for 10 steps, and so do the
validation losses (train.eval_iters counts global batches, as in Megatron-LM).

Tolerance: 2e-5 relative (fp32; the reductions add the same numbers in another order), which is far
below the loss change of one step (~1e-2), so a wrong gradient scaling or sample order fails.
"""
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from train_helpers import REPO, STEPS, losses, pretrain, scalars, scratch, single_process_run, two_rank_run

TOLERANCE = 2e-5


@pytest.mark.parametrize("stage,launcher", [(1, "torchrun"), (2, "deepspeed"), (3, "torchrun")])
def test_two_ranks_match_one_process(stage, launcher):
    reference = losses(single_process_run())
    distributed = losses(two_rank_run(stage, launcher))
    assert len(reference) == len(distributed) == STEPS
    assert distributed == pytest.approx(reference, rel=TOLERANCE)
    assert reference[-1] < reference[0] - 0.3  # it trains
    validation, distributed_validation = scalars(single_process_run(), "val/loss"), scalars(two_rank_run(stage, launcher), "val/loss")
    assert set(validation) == set(distributed_validation) == {5, 10}
    assert [distributed_validation[s] for s in (5, 10)] == pytest.approx([validation[s] for s in (5, 10)], rel=TOLERANCE)


@lru_cache(maxsize=None)
def bf16_run(stage: int, micro_batch_size: int = 4, ds_config: Path | None = None) -> Path:
    """One process, bf16, 5 steps of 4 sequences (micro_batch_size x the accumulation that makes 4)."""
    run_dir = scratch() / f"bf16_zero{stage}_micro{micro_batch_size}{'_' + ds_config.stem if ds_config else ''}"
    pretrain(run_dir, stage, nproc=1, launcher="python", ds_config=ds_config, micro_batch_size=micro_batch_size,
             gradient_accumulation_steps=4 // micro_batch_size, max_steps=5, warmup_steps=1, decay_steps=2,
             eval_interval=0, bf16="true")
    return run_dir


def test_bf16_zero0_trains_like_bf16_zero1():
    """DeepSpeed's ZeRO-0 bf16 optimizer wrapper made AdamW's states with a step on zero gradients, so
    AdamW counted one step too many and its first updates were a quarter smaller: the loss drifted
    5e-3 (relative) from ZeRO-1's within 4 steps (engine.start_masters_from drops the states of its zero-gradient step).
    Same micro-batches, bf16 tolerance."""
    assert losses(bf16_run(0)) == pytest.approx(losses(bf16_run(1)), rel=5e-4)


def test_zero0_bf16_checkpoint_exports_its_fp32_master_weights():
    """At ZeRO-0 with bf16 the module's weights in a checkpoint are the bf16 copies; the fp32 masters are
    in DeepSpeed's optimizer state (FP16_UnfusedOptimizer's fp32_groups). Export, upcycling and
    run.init_from read the masters, as they do at ZeRO 1-3: they read the bf16 rounding (3.9e-3 off)."""
    from doge_dist.train.checkpoint import read_latest
    from doge_dist.train.export import consolidated_state

    root = bf16_run(0) / "checkpoints"
    tag = read_latest(root)
    masters = [t for group in torch.load(root / tag / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["fp32_groups"]
               for t in group]
    exported = consolidated_state(root, tag)
    assert all(any(torch.equal(master, weight) for weight in exported.values()) for master in masters)
    assert sum(not torch.equal(w, w.bfloat16().float()) for w in exported.values()) >= len(masters) - 2, "bf16-rounded"


def test_bf16_with_fp32_gradient_accumulation_accumulates_each_micro_batch_once(tmp_path_factory):
    """ZeRO-1 with ``data_types.grad_accum_dtype: fp32`` is DeepSpeed's BF16_Optimizer: it adds each
    micro-batch's bf16 gradients into fp32 ones and clears them when the next backward starts, which
    DeepSpeed's engine detects from the forward's output tensors. Our output was a plain dataclass
    that it does not look into, so the bf16 gradients were never cleared and added again at every
    micro-batch (a 1.5x gradient norm at accumulation 2). Micro 2 x accumulation 2 against micro 4."""
    config = tmp_path_factory.mktemp("ds") / "zero1_fp32_accumulation.json"
    config.write_text(json.dumps({**json.loads((REPO / "configs" / "zero1.json").read_text()),
                                  "data_types": {"grad_accum_dtype": "fp32"}}))
    accumulated, whole = bf16_run(1, micro_batch_size=2, ds_config=config), bf16_run(1)
    norms, reference = scalars(accumulated, "train/grad_norm"), scalars(whole, "train/grad_norm")
    assert [norms[s] for s in sorted(norms)] == pytest.approx([reference[s] for s in sorted(reference)], rel=2e-2)
    assert losses(accumulated) == pytest.approx(losses(whole), rel=1e-3)


def test_zero0_fp32_without_gradient_clipping_clips_at_deepspeeds_default(tmp_path_factory):
    """DeepSpeed clips at 1.0 when its JSON has no "gradient_clipping"; a ZeRO-0 fp32 run, whose optimizer
    clips for DeepSpeed, read the missing key as 0 and trained unclipped, and the run's ds_config.json said
    0.0 even under configs/zero0.json's explicit 1.0. Without the key it trains as with 1.0, step for step."""
    zero0 = json.loads((REPO / "configs" / "zero0.json").read_text())
    config = tmp_path_factory.mktemp("ds") / "zero0_default_clipping.json"
    config.write_text(json.dumps({key: value for key, value in zero0.items() if key != "gradient_clipping"}))
    run_dir = scratch() / "zero0_default_clipping"
    pretrain(run_dir, 0, nproc=1, launcher="python", ds_config=config, micro_batch_size=2, gradient_accumulation_steps=2,
             eval_interval=0)
    reference = single_process_run()  # configs/zero0.json: "gradient_clipping": 1.0
    norms = scalars(reference, "train/grad_norm")
    assert max(norms.values()) > 1.0  # clipping changes these steps
    assert scalars(run_dir, "train/grad_norm") == pytest.approx(norms, rel=1e-6)
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6)
    for run in (run_dir, reference):
        assert json.loads((run / "ds_config.json").read_text())["gradient_clipping"] == 1.0
