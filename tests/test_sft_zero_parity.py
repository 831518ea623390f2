"""SFT under two ZeRO-2 ranks (deepspeed launcher) matches one process (ZeRO-0, accumulation 2) on the
same 4 conversations per step: per-step losses agree within 2e-5 relative (fp32; only the order of
the reductions differs), far below the loss change of one step, and the run learns. Validation
scores every one of the 10 held-out conversations in every layout."""
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from chat_helpers import LR, STEPS, VALID, VALIDATION, finetune, prefixes, single_run, zero2_run
from train_helpers import losses, scalars, scratch

TOLERANCE = 2e-5


@lru_cache(maxsize=None)
def micro4_run():
    """One process, micro-batch 4: the global batch of the other two layouts in one micro-batch."""
    return finetune("sft", scratch() / "sft_micro4", 0, 1, **{"train.micro_batch_size": 4, "train.gradient_accumulation_steps": 1,
                                                              "train.max_steps": STEPS["sft"], "train.lr": LR["sft"]},
                    **VALIDATION["sft"])


def test_sft_two_ranks_match_one_process():
    reference, distributed = losses(single_run("sft")), losses(zero2_run("sft"))
    assert len(reference) == len(distributed) == STEPS["sft"]
    assert distributed == pytest.approx(reference, rel=TOLERANCE)
    assert reference[-1] < reference[0] - 0.3


def test_sft_accumulation_trains_on_the_global_batch_token_mean():
    """Micro-batch 4 in one step equals 2 x accumulation 2 on the same conversations: the loss is the mean
    over the global batch's tokens, not a mean of per-micro-batch means (the comparison above cannot tell
    them apart: both sides have the same micro-batches)."""
    assert losses(micro4_run()) == pytest.approx(losses(single_run("sft")), rel=TOLERANCE)


def held_out_token_mean(run_dir) -> float:
    """The mean token loss of the final checkpoint of ``run_dir`` over all held-out conversations, one at a time."""
    from doge_dist.data.chat_dataset import MaskedSequences, SFTDataset
    from doge_dist.model import IGNORE_INDEX
    from doge_dist.train.export import load_checkpoint_model

    model = load_checkpoint_model(run_dir).eval()
    conversations = SFTDataset(MaskedSequences([prefixes()["sft_valid"]], pairs=False), 128, packing=False)
    assert len(conversations) == VALID
    loss, tokens = 0.0, 0
    with torch.no_grad():
        for sample in conversations:
            logits = model(sample["input_ids"][None]).logits[0]
            loss += F.cross_entropy(logits.float(), sample["labels"], ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((sample["labels"] != IGNORE_INDEX).sum())
    return loss / tokens


def test_validation_scores_every_held_out_conversation_in_every_layout():
    """10 held-out conversations, fewer than the validation's eval_iters global batches and not a whole
    number of them: one process at micro 2 x accumulation 2, two ranks at micro 2 and one process at
    micro 4 each score all 10 (a rank's last micro-batch filled up with rows that score nothing), so
    val/loss is the token mean over all of them, as HF Trainer/TRL evaluate a whole eval set (whole
    rounds of every rank left the last 2 out on two ranks and at micro 4, but not at micro 2 alone)."""
    step = STEPS["sft"]
    values = [scalars(run, "val/loss") for run in (single_run("sft"), zero2_run("sft"), micro4_run())]
    assert all(set(value) == {step} for value in values)
    expected = held_out_token_mean(single_run("sft"))
    assert [value[step] for value in values] == pytest.approx([expected] * 3, rel=TOLERANCE)
