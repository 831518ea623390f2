"""SFT under two ZeRO-2 ranks (deepspeed launcher) matches one process (ZeRO-0, accumulation 2) on the
same 4 conversations per step: per-step losses agree within 2e-5 relative (fp32; only the order of
the reductions differs), far below the loss change of one step, and the run learns."""
import pytest

from chat_helpers import LR, STEPS, finetune, single_run, zero2_run
from train_helpers import losses, scratch

TOLERANCE = 2e-5


def test_sft_two_ranks_match_one_process():
    reference, distributed = losses(single_run("sft")), losses(zero2_run("sft"))
    assert len(reference) == len(distributed) == STEPS["sft"]
    assert distributed == pytest.approx(reference, rel=TOLERANCE)
    assert reference[-1] < reference[0] - 0.3


def test_sft_accumulation_trains_on_the_global_batch_token_mean():
    """Micro-batch 4 in one step equals 2 x accumulation 2 on the same conversations: the loss is the mean
    over the global batch's tokens, not a mean of per-micro-batch means (the comparison above cannot tell
    them apart: both sides have the same micro-batches)."""
    whole = finetune("sft", scratch() / "sft_micro4", 0, 1, **{"train.micro_batch_size": 4, "train.gradient_accumulation_steps": 1,
                                                               "train.max_steps": STEPS["sft"], "train.lr": LR["sft"]})
    assert losses(whole) == pytest.approx(losses(single_run("sft")), rel=TOLERANCE)
