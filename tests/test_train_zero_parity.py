"""One process (ZeRO-0, accumulation 2) vs two gloo ranks with ZeRO-1, -2 (deepspeed launcher) and -3
(torchrun) on the same 4 sequences per step: per-step losses agree for 10 steps, and so do the
validation losses (train.eval_iters counts global batches, as in Megatron-LM).

Tolerance: 2e-5 relative (fp32; the reductions add the same numbers in another order), which is far
below the loss change of one step (~1e-2), so a wrong gradient scaling or sample order fails.
"""
import pytest

from train_helpers import STEPS, losses, scalars, single_process_run, two_rank_run

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
