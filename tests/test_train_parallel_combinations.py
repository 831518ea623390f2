"""Training features combined across parallel layouts, each against one process on the same seed and
global batch (fp32, 2e-5 relative as in test_train_zero_parity): tensor parallel 2 with sequence
parallelism, packed documents (reset_attention_mask/reset_position_ids), activation checkpointing and
gradient accumulation; a MoE model sequence parallel under
ZeRO-3; and with dropout, where no other layout can match, a tensor/sequence parallel run that resumes
exactly, validating or not."""
from functools import lru_cache

import pytest

from data_helpers import assets, quiet, write_jsonl
from doge_dist.data import preprocess
from train_helpers import base_overrides, losses, pretrain, scalars, scratch

TOLERANCE = 2e-5
SHORT = dict(max_steps=3, warmup_steps=0, decay_steps=1, eval_interval=0)
SAME_BATCHES = dict(micro_batch_size=2, gradient_accumulation_steps=2)  # 1 process or 2 tensor-parallel ranks
TP2_SP = {"parallel.tensor_parallel": 2, "parallel.sequence_parallel": "true"}


@lru_cache(maxsize=None)
def short_documents() -> dict:
    """Data overrides: 12-word documents, so every 64-token sample packs several, masked apart."""
    words = " ".join(assets().texts()).split()
    records = [{"text": " ".join(words[i : i + 12])} for i in range(0, 12 * 400, 12)]
    prefix = str(scratch() / "combination_documents")
    preprocess(write_jsonl(scratch() / "combination_documents.jsonl", records), prefix, str(assets().tokenizer_model),
               append_eod=True, workers=1, log=quiet)
    return {"data.train_data": f"[{prefix}_text_document]", "data.cache_dir": str(scratch() / "combination_cache"),
            "data.reset_position_ids": "true", "data.reset_attention_mask": "true"}


def assert_same_steps(run_dir, reference):
    assert losses(run_dir) == pytest.approx(losses(reference), rel=TOLERANCE)
    norms, expected = scalars(run_dir, "train/grad_norm"), scalars(reference, "train/grad_norm")
    assert [norms[s] for s in sorted(expected)] == pytest.approx([expected[s] for s in sorted(expected)], rel=TOLERANCE)


def test_tp2_sp_documents_checkpointing_accumulation_matches_one_process():
    single, parallel = scratch() / "combination_documents_single", scratch() / "combination_documents_tp2_sp"
    pretrain(single, 0, nproc=1, launcher="python", **SAME_BATCHES, **SHORT, **short_documents())
    pretrain(parallel, 2, nproc=2, **SAME_BATCHES, **SHORT, **short_documents(), **TP2_SP,
             activation_checkpointing="true")
    assert_same_steps(parallel, single)


def test_moe_sequence_parallel_under_zero3_matches_one_process():
    moe = {"model.preset": "doge-tiny-moe"}
    single, parallel = scratch() / "combination_moe_single", scratch() / "combination_moe_tp2_sp_zero3"
    pretrain(single, 0, nproc=1, launcher="python", **SAME_BATCHES, **SHORT, **moe)
    pretrain(parallel, 3, nproc=2, **SAME_BATCHES, **SHORT, **moe, **TP2_SP)
    assert_same_steps(parallel, single)


def test_dropout_under_tp2_sp_and_checkpointing_resumes_exactly():
    """Masks drawn per tensor-parallel rank (parallel.rng) come from the saved generator states: the
    resumed steps are the uninterrupted ones (the states were restored before the rest of the set-up,
    whose CPU peak measurement for MFU drew from them and shifted every mask of a resumed run). The
    resumed run validates after every step and the whole one never: as in Megatron-LM, validation
    leaves the training's masks alone (each per-rank region of an evaluation forward drew a seed from
    the shared generator, which shifted every later mask)."""
    dropout = {"model.hidden_dropout": 0.1, "model.attention_dropout": 0.1, **TP2_SP}
    common = dict(**SAME_BATCHES, **SHORT, activation_checkpointing="true", **dropout)
    whole, resumed = scratch() / "combination_dropout", scratch() / "combination_dropout_resumed"
    pretrain(whole, 1, nproc=2, save_interval=1, **common)
    pretrain(resumed, 1, nproc=2, **{**common, "eval_interval": 1}, **{"run.resume": str(whole / "checkpoints" / "step_00000001")})
    assert set(scalars(resumed, "val/loss")) == {2, 3}
    assert losses(resumed) == losses(whole)[1:]


def test_building_the_validation_batches_draws_nothing_from_the_training_random_state():
    """Iterating a DataLoader draws its seed from torch's global generator: a run with train.eval_interval
    > 0 built its validation batches that way and drew every later dropout mask shifted, so that its
    training losses were not those of the same run without validation (in Megatron-LM they are)."""
    import torch

    from doge_dist.config import load_config
    from doge_dist.train.data import TrainData

    states = []
    for interval in (0, 5):
        config = load_config(None, base_overrides(scratch() / "unused", eval_interval=interval))
        torch.manual_seed(0)
        TrainData(config, 0, 1, 0, str(scratch() / "data_cache"))
        states.append(torch.get_rng_state())
    assert torch.equal(*states)
