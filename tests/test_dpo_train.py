"""DPO training runs: on a tiny synthetic preference set (16 pairs, several epochs) the reward margin
and accuracy rise within 30 steps on CPU; two ZeRO-2 ranks with precomputed reference log-probs
match one process with a frozen reference model, and so does tensor parallelism 2 (per-step DPO loss
within 1e-5 absolute, fp32); the reference is the untrained policy (model.* overrides, dropout off) and
stays the checkpoint a run started from across a resume."""
import pytest

from chat_helpers import LR, STEPS, VALID, finetune, init_dir, prefixes, single_run, zero2_run
from doge_dist.train.dpo import VALID_METRICS
from train_helpers import concurrently, losses, scalars, scratch

TOLERANCE = 1e-5
BETA = 0.1  # finetune.beta's default


def _series(run_dir, tag):
    values = scalars(run_dir, tag)
    return [values[step] for step in sorted(values)]


def test_margin_and_accuracy_rise():
    run = single_run("dpo")
    margin, accuracy = _series(run, "dpo/reward_margin"), _series(run, "dpo/accuracy")
    assert len(margin) == len(accuracy) == STEPS["dpo"]
    assert sum(margin[-5:]) / 5 > sum(margin[:5]) / 5 + 0.05
    assert sum(accuracy[-5:]) / 5 > sum(accuracy[:5]) / 5 + 0.2
    assert _series(run, "dpo/loss") == pytest.approx(losses(run), abs=1e-6)  # dpo/loss is the trained loss
    assert set(scalars(run, "dpo/rewards_chosen")) == set(scalars(run, "dpo/rewards_rejected")) == set(range(1, STEPS["dpo"] + 1))


def test_dpo_tensor_parallel_matches_one_process():
    """TP 2: the policy's sequence log-probs come from vocabulary-sharded logits. Its first 10 steps
    against the one-process run's (a constant lr: the same updates whatever train.max_steps)."""
    reference = losses(single_run("dpo"))[:10]
    run = finetune("dpo", scratch() / "dpo_tp2", 1, 2, **{"parallel.tensor_parallel": 2, "train.micro_batch_size": 2,
                                                         "train.gradient_accumulation_steps": 2,
                                                         "train.max_steps": 10, "train.lr": LR["dpo"]})
    assert losses(run) == pytest.approx(reference, abs=TOLERANCE)


def test_dpo_two_ranks_precomputed_match_one_process():
    reference = losses(single_run("dpo"))
    distributed = losses(zero2_run("dpo", **{"finetune.reference": "precomputed"}))
    assert distributed == pytest.approx(reference, abs=TOLERANCE)


def held_out_dpo_loss(run_dir) -> float:
    """The mean DPO loss of the final checkpoint of ``run_dir`` over all held-out pairs, against the
    untrained policy, one sequence at a time."""
    import torch
    import torch.nn.functional as F

    from doge_dist.convert.hf import load_hf
    from doge_dist.data.chat_dataset import MaskedSequences, PreferenceDataset
    from doge_dist.model import IGNORE_INDEX
    from doge_dist.train.dpo import dpo_loss
    from doge_dist.train.export import load_checkpoint_model

    policy, reference = load_checkpoint_model(run_dir).eval(), load_hf(init_dir()).eval()
    pairs = PreferenceDataset(MaskedSequences([prefixes()["dpo_valid"]], pairs=True), 128)
    assert len(pairs) == VALID

    def logp(model, sample):
        logits = model(sample["input_ids"][None]).logits[0].float()
        return -F.cross_entropy(logits, sample["labels"], ignore_index=IGNORE_INDEX, reduction="sum")

    with torch.no_grad():
        logps = [[logp(model, pair[side]) for model in (policy, reference) for side in ("chosen", "rejected")] for pair in pairs]
    pi_c, pi_r, ref_c, ref_r = torch.tensor(logps).T
    return dpo_loss(pi_c, pi_r, ref_c, ref_r, BETA)[0].mean().item()


def test_validation_pairs_scored_against_their_own_reference():
    """Held-out pairs: the same DPO loss and rewards with a frozen reference model (one process) as
    with precomputed reference log-probs (two ranks), which then must hold the validation pairs' own;
    no perplexity for a loss that is not a token cross entropy. Every one of the 10 pairs is scored,
    though they are not a whole number of global batches (two ranks score 5 each, the last micro-batch
    filled up with a pair of zero weight): the loss at the end is the mean over all 10 computed by hand."""
    single, distributed = single_run("dpo"), zero2_run("dpo", **{"finetune.reference": "precomputed"})
    for tag in ("val/loss", *VALID_METRICS):
        one, two = scalars(single, tag), scalars(distributed, tag)
        assert set(one) == set(two) == {10, 20, 30}, tag
        assert [two[step] for step in sorted(two)] == pytest.approx([one[step] for step in sorted(one)], abs=TOLERANCE), tag
    assert not scalars(single, "val/ppl")
    accuracy, margin = scalars(single, "dpo_val/accuracy"), scalars(single, "dpo_val/reward_margin")
    chosen, rejected = scalars(single, "dpo_val/rewards_chosen"), scalars(single, "dpo_val/rewards_rejected")
    assert all(value * VALID == pytest.approx(round(value * VALID), abs=1e-4) for value in accuracy.values())  # over all pairs
    assert scalars(single, "val/loss")[STEPS["dpo"]] == pytest.approx(held_out_dpo_loss(single), abs=TOLERANCE)
    assert [margin[s] for s in sorted(margin)] == pytest.approx([chosen[s] - rejected[s] for s in sorted(margin)], abs=1e-6)


def test_bf16_reference_equals_the_untrained_policy():
    """In bf16 the policy runs as DeepSpeed runs it (bf16 weights); the frozen reference must compute
    the same way, so that before the first update every reward is exactly 0 and the loss is log 2."""
    import math

    run = finetune("dpo", scratch() / "dpo_bf16", 0, 1, **{"train.bf16": "true", "train.micro_batch_size": 2,
                                                           "train.gradient_accumulation_steps": 1,
                                                           "train.max_steps": 1, "train.lr": LR["dpo"]})
    assert scalars(run, "dpo/rewards_chosen")[1] == 0.0 and scalars(run, "dpo/rewards_rejected")[1] == 0.0
    assert scalars(run, "dpo/loss")[1] == pytest.approx(math.log(2), abs=1e-6)


def test_tokens_per_step_count_both_sequences_of_a_pair():
    """A DPO sample is a pair: chosen and rejected both run through the policy, so the tokens of a step
    (and with them tok/s and MFU) are those of both sequences of every pair: their real tokens, not the
    padding to the longest of the micro-batch nor data.seq_length (128; these pairs are 62-96 long)."""
    from doge_dist.config import load_config
    from doge_dist.data.chat_dataset import EpochShuffled
    from doge_dist.train.dpo import DPOTask

    run = finetune("dpo", scratch() / "dpo_tokens", 0, 1, **{"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1,
                                                            "train.max_steps": 1, "train.lr": LR["dpo"]})
    config = load_config(str(run / "config.yaml"))
    pairs = EpochShuffled(DPOTask().dataset(config, "train"), 2, config.data.seed)
    real = sum(len(pairs[i][side]["input_ids"]) for i in range(2) for side in ("chosen", "rejected"))
    assert real < 2 * 2 * 128
    assert scalars(run, "train/consumed_tokens")[1] == real


def test_resume_trains_against_the_reference_the_run_started_from():
    """run.init_from names a run directory whose SFT run trains on while the DPO run is stopped: the resumed
    DPO run keeps its reference, the checkpoint it started from (recorded in its checkpoints), and trains as
    an uninterrupted run from that checkpoint named explicitly. Once that checkpoint is gone or written
    again, a resume is refused, naming it; a run.init_from naming another step directory is taken instead."""
    root = scratch() / "dpo_resume_reference"
    sft = root / "sft"
    short = {"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1, "train.lr": LR["sft"]}
    finetune("sft", sft, 0, 1, **short, **{"train.max_steps": 3})
    step3 = sft / "checkpoints" / "step_00000003"
    dpo = {"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1, "train.lr": LR["dpo"]}
    resumed = root / "dpo_from_sft"

    def stopped_and_resumed():
        finetune("dpo", resumed, 0, 1, **dpo, **{"run.init_from": str(sft), "train.max_steps": 2})
        finetune("sft", sft, 0, 1, **short, **{"train.max_steps": 6})  # trains on: `latest` names step 6
        finetune("dpo", resumed, 0, 1, **dpo, **{"run.init_from": str(sft), "train.max_steps": 4})

    # the uninterrupted run reads step 3 alone, which the SFT run leaves as it is: at the same time as the others
    uninterrupted, _ = concurrently(
        lambda: finetune("dpo", root / "dpo_from_step3", 0, 1, **dpo, **{"run.init_from": str(step3), "train.max_steps": 4}),
        stopped_and_resumed)
    assert len(losses(resumed)) == 4
    assert losses(resumed) == pytest.approx(losses(uninterrupted), abs=TOLERANCE)

    from doge_dist.config import ConfigError
    from doge_dist.train.dpo import resumed_reference

    start = (resumed / "checkpoints", "step_00000004")
    assert resumed_reference(str(sft), start)["path"] == str(step3.resolve())
    step6 = sft / "checkpoints" / "step_00000006"
    assert resumed_reference(str(step6), start)["path"] == str(step6.resolve())  # named explicitly: taken instead
    moved = step3.rename(root / "elsewhere")  # pruned by keep_last, deleted by hand
    with pytest.raises(ConfigError, match=f"{step3.resolve()}.*is gone"):
        resumed_reference(str(sft), start)
    moved.rename(step3)
    (step3 / "mp_rank_00_model_states.pt").touch()  # written again (a rewound run saving step 3 anew)
    with pytest.raises(ConfigError, match=f"{step3.resolve()}.*written again"):
        resumed_reference(str(sft), start)


@pytest.mark.parametrize("model", [{"model.keep_window_size": 16}, {"model.hidden_dropout": 0.1}], ids=["keep_window", "dropout"])
def test_first_step_rewards_are_zero_with_model_overrides(model):
    """The reference is the untrained policy, as TRL's is a copy of it: built with the run's model.*
    overrides (a keep window of 16 is active on these 62-96-token pairs), and trained with dropout off (TRL's
    DPOConfig.disable_dropout default), so that step 1's rewards are 0 and its loss log 2."""
    import math

    name = next(iter(model)).split(".")[1]
    run = finetune("dpo", scratch() / f"dpo_first_step_{name}", 0, 1, **model, **{
        "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1, "train.max_steps": 1, "train.lr": LR["dpo"]})
    assert scalars(run, "dpo/rewards_chosen")[1] == 0.0 and scalars(run, "dpo/rewards_rejected")[1] == 0.0
    assert scalars(run, "dpo/loss")[1] == pytest.approx(math.log(2), abs=1e-6)
