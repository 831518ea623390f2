"""Tensor x expert parallelism in the trainer (TP 2 x EP 2 on 4 ranks, ZeRO-2): the same 10 losses
and gradient norms as one process (the norm counts every tensor once although each is held by two
ranks); its checkpoint resumes in one process, a one-process checkpoint resumes at TP 2 x EP 2 (with
sequence parallelism), and it exports to Hugging Face. Tolerance as in test_train_zero_parity: 2e-5 relative, fp32."""
from functools import lru_cache

import pytest

from test_train_expert_parallel import MOE, TOLERANCE, assert_exports_like
from test_train_expert_parallel import runs as expert_runs
from train_helpers import losses, pretrain, scalars, scratch

GRID = {**MOE, "parallel.tensor_parallel": 2, "parallel.expert_parallel": 2}


@lru_cache(maxsize=None)
def runs():
    single, _, ep1, _ = expert_runs()  # ep1: one process, ZeRO-1, resumed at step 5 and saved at step 7
    grid, to_single, back = scratch() / "grid", scratch() / "grid_to_single", scratch() / "single_to_grid"
    pretrain(grid, 2, nproc=4, micro_batch_size=2, gradient_accumulation_steps=1, save_interval=5, **GRID)
    pretrain(to_single, 1, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2,
             **MOE, **{"run.resume": str(grid / "checkpoints" / "step_00000005")})
    pretrain(back, 2, nproc=4, micro_batch_size=2, gradient_accumulation_steps=1,
             **GRID, **{"run.resume": str(ep1 / "checkpoints" / "step_00000007"), "parallel.sequence_parallel": "true"})
    return single, grid, to_single, back


def test_tp2_ep2_matches_one_process_and_checkpoints_move_to_and_from_it():
    single, grid, to_single, back = runs()
    reference = losses(single)
    assert losses(grid) == pytest.approx(reference, rel=TOLERANCE)
    norms, grid_norms = scalars(single, "train/grad_norm"), scalars(grid, "train/grad_norm")
    assert [grid_norms[s] for s in sorted(norms)] == pytest.approx([norms[s] for s in sorted(norms)], rel=TOLERANCE)
    assert losses(to_single) == pytest.approx(reference[5:], rel=TOLERANCE)
    assert losses(back) == pytest.approx(reference[7:], rel=TOLERANCE)


def test_tp2_ep2_checkpoint_exports_to_transformers(tmp_path):
    single, grid, *_ = runs()
    assert_exports_like(grid / "checkpoints" / "step_00000005", single / "checkpoints" / "step_00000005", tmp_path)
