"""SFT on the parallel layouts of pretraining: tensor parallel 2 with sequence parallelism on padded
batches (dense) and expert parallel 2 (CDMoE) match one process (per-step loss within 2e-5 relative,
fp32). Packed samples under tensor and sequence parallelism are pretraining's document masks, matched
to one process in test_train_parallel_combinations."""
import pytest
import torch

from chat_helpers import LR, STEPS, chat_tokenizer, finetune
from doge_dist.config import ModelConfig
from doge_dist.convert.hf import save_hf
from doge_dist.model import build_model
from train_helpers import losses, scalars, scratch

TOLERANCE = 2e-5
SAME_BATCHES = {"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2, "train.max_steps": STEPS["sft"],
                "train.lr": LR["sft"]}


def test_sft_expert_parallel_matches_one_process():
    """Also the routing statistics, past their window of 2 steps: one process at accumulation 2 and two
    ranks at accumulation 1 count the same steps."""
    torch.manual_seed(0)
    moe = save_hf(build_model(ModelConfig.from_preset("doge-tiny-moe")), scratch() / "hf_moe_init", tokenizer=chat_tokenizer())
    window = {"run.init_from": str(moe), "train.moe_stats_window": 2}
    single = finetune("sft", scratch() / "sft_moe_single", 0, 1, **SAME_BATCHES, **window)
    ep2 = finetune("sft", scratch() / "sft_moe_ep2", 2, 2, **{**SAME_BATCHES, "train.gradient_accumulation_steps": 1},
                   **window, **{"parallel.expert_parallel": 2})
    assert losses(ep2) == pytest.approx(losses(single), rel=TOLERANCE)
    for tag in ("moe/expert_load_max_over_mean", "moe/unused_expert_fraction", "moe/router_entropy"):
        assert scalars(ep2, tag) == pytest.approx(scalars(single, tag), rel=TOLERANCE), tag


def test_sft_padded_batches_run_sequence_parallel():
    """Padded (unpacked) micro-batches have any length: under sequence parallelism they are padded up to a
    multiple of tensor_parallel, so every rank holds T/tp tokens, and the losses stay one process's."""
    padded = {**SAME_BATCHES, "finetune.packing": "false"}
    single = finetune("sft", scratch() / "sft_padded_single", 0, 1, **padded)
    sp = finetune("sft", scratch() / "sft_padded_tp2_sp", 1, 2, **padded,
                  **{"parallel.tensor_parallel": 2, "parallel.sequence_parallel": "true"})
    assert losses(sp) == pytest.approx(losses(single), rel=TOLERANCE)
