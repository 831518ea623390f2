"""SFT under two ZeRO-2 ranks (deepspeed launcher) matches one process (ZeRO-0, accumulation 2) on the
same 4 conversations per step: per-step losses agree within 2e-5 relative (fp32; only the order of
the reductions differs), far below the loss change of one step, and the run learns."""
import pytest

from chat_helpers import STEPS, single_run, zero2_run
from train_helpers import losses

TOLERANCE = 2e-5


def test_sft_two_ranks_match_one_process():
    reference, distributed = losses(single_run("sft")), losses(zero2_run("sft"))
    assert len(reference) == len(distributed) == STEPS["sft"]
    assert distributed == pytest.approx(reference, rel=TOLERANCE)
    assert reference[-1] < reference[0] - 0.3
