"""Tensor parallelism in the trainer: TP 2 x DP 2 with ZeRO-2 matches one process, and so do TP 2's
gradient norms at ZeRO-0 fp32, where our optimizer clips; checkpoints of a model with biases move
2 (sequence parallel) -> 1 -> 4 tensor-parallel ranks (DeepSpeed universal checkpoints) continuing the
same losses, and so do ZeRO-3 checkpoints 1 -> 2 tensor-parallel ranks and onto more data-parallel
ranks; a TP = 2 checkpoint exports to Hugging Face. Tolerance as in test_train_zero_parity: 2e-5 relative, fp32."""
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from train_helpers import STEPS, losses, pretrain, scalars, scratch, single_process_run, two_rank_run

TOLERANCE = 2e-5
FOUR_KV_HEADS = {"model.num_key_value_heads": 4}  # so that 4 tensor-parallel ranks split the heads
BIASES = {"model.attention_bias": "true", "model.mlp_bias": "true"}  # o_proj/dt_proj/down_proj biases: whole on every rank


def test_tp2_dp2_zero2_matches_one_process():
    run_dir = scratch() / "tp2_dp2"
    pretrain(run_dir, 2, nproc=4, micro_batch_size=2, gradient_accumulation_steps=1,
             **{"parallel.tensor_parallel": 2, "parallel.sequence_parallel": "true"})
    assert losses(run_dir) == pytest.approx(losses(single_process_run()), rel=TOLERANCE)


def test_tp2_zero0_fp32_clips_by_the_global_gradient_norm():
    """At ZeRO-0 in fp32 our optimizer clips: its norm must sum the tensor-parallel slices once each."""
    run_dir = scratch() / "tp2_zero0"
    pretrain(run_dir, 0, nproc=2, micro_batch_size=2, gradient_accumulation_steps=2, **{"parallel.tensor_parallel": 2})
    single = single_process_run()
    norms, tp_norms = scalars(single, "train/grad_norm"), scalars(run_dir, "train/grad_norm")
    assert max(norms.values()) > 1.0  # gradient_clipping is 1.0: clipping is exercised
    assert [tp_norms[s] for s in sorted(norms)] == pytest.approx([norms[s] for s in sorted(norms)], rel=TOLERANCE)
    assert losses(run_dir) == pytest.approx(losses(single), rel=TOLERANCE)


@lru_cache(maxsize=None)
def reshard_chain():
    """A: TP 2 with sequence parallelism for 10 steps (checkpoints 4, 8, 10); B: TP 1 from A's step 4;
    C: TP 4 from B's step 8. The biases and the weights sequence parallelism sums gradients of are
    whole on every rank: ds_to_universal checks that their copies agree."""
    common = dict(micro_batch_size=2, gradient_accumulation_steps=2, save_interval=4, **FOUR_KV_HEADS, **BIASES)
    a, b, c = scratch() / "reshard_a", scratch() / "reshard_b", scratch() / "reshard_c"
    pretrain(a, 1, nproc=2, **common, **{"parallel.tensor_parallel": 2, "parallel.sequence_parallel": "true"})
    pretrain(b, 1, nproc=1, launcher="python", **common, **{"run.resume": str(a / "checkpoints" / "step_00000004")})
    pretrain(c, 1, nproc=4, **common, **{"parallel.tensor_parallel": 4, "run.resume": str(b / "checkpoints" / "step_00000008")})
    return a, b, c


def test_checkpoints_reshard_2_to_1_to_4():
    a, b, c = (losses(run) for run in reshard_chain())
    assert len(a) == STEPS and len(b) == 6 and len(c) == 2
    assert b == pytest.approx(a[4:], rel=TOLERANCE)
    assert c == pytest.approx(a[8:10], rel=TOLERANCE)


@lru_cache(maxsize=None)
def zero3_reshard_chain():
    """ZeRO-3, 4 sequences per step: A: 2 data-parallel ranks (checkpoint 5); B: TP 2 on 2 ranks from A's
    step 5 (checkpoint 8); C: TP 2 x DP 2 on 4 ranks from B's step 8."""
    a, b, c = two_rank_run(3), scratch() / "zero3_reshard_b", scratch() / "zero3_reshard_c"
    tp2 = {"parallel.tensor_parallel": 2}
    pretrain(b, 3, nproc=2, micro_batch_size=2, gradient_accumulation_steps=2, save_interval=4,
             **tp2, **{"run.resume": str(a / "checkpoints" / "step_00000005")})
    pretrain(c, 3, nproc=4, micro_batch_size=2, gradient_accumulation_steps=1,
             **tp2, **{"run.resume": str(b / "checkpoints" / "step_00000008")})
    return a, b, c


def test_zero3_checkpoints_reshard_1_to_2_and_onto_more_data_parallel_ranks():
    """DeepSpeed's ZeRO-3 loader cuts a tensor-parallel rank's share with the restore maps apply.parallelize
    attaches, from A's universal tensors in the form shape_bare_tensors gives them (without either:
    'start + length exceeds dimension size')."""
    a, b, c = (losses(run) for run in zero3_reshard_chain())
    assert len(b) == 5 and len(c) == 2
    assert b == pytest.approx(a[5:], rel=TOLERANCE)
    assert c == pytest.approx(a[8:], rel=TOLERANCE)


def test_zero3_refuses_to_reshard_a_vocabulary_not_divisible_by_tp_before_any_work(tmp_path):
    """The restore maps split the vocabulary unpadded: a padded one (509 over 2 ranks) stops with the ways out."""
    from doge_dist.config import ConfigError, ModelConfig, TrainConfig
    from doge_dist.parallel.state import ParallelLayout
    from doge_dist.train import checkpoint
    from doge_dist.train.loop import loadable_checkpoint

    tag = checkpoint.tag_for(4)
    (tmp_path / tag).mkdir()
    model = ModelConfig.from_preset("doge-tiny", vocab_size=509).to_dict()
    (tmp_path / tag / checkpoint.META).write_text(json.dumps({"step": 4, "dp_size": 2, "zero_stage": 3, "model": model}))
    layout = ParallelLayout(world_size=2, tensor_parallel=2, expert_parallel=1)
    with pytest.raises(ConfigError, match=r"saved at tensor_parallel 1 on 2 data-parallel rank\(s\) and this run uses "
                                          r"tensor_parallel 2 on 1: .*model.vocab_size \(509\) is a multiple of "
                                          r"tensor_parallel. Resume at the saved .* or continue from its weights with run.init_from"):
        loadable_checkpoint(tmp_path, tag, layout, {"zero_optimization": {"stage": 3}}, tmp_path, TrainConfig())


def test_another_runs_checkpoint_is_converted_in_the_run_that_loads_it():
    """B's run.resume PATH (A's step 4, at TP 1), a weights-only run.init_from and DPO's reference
    model from the same TP 2 ZeRO-1 checkpoint convert it to a universal checkpoint in their own
    run.dir/converted/, never in A's directory (which may be read-only, shared or still training)."""
    from doge_dist.config import Config, ModelConfig
    from doge_dist.train import checkpoint
    from doge_dist.train.dpo import load_reference, reference_source

    a, b, _ = reshard_chain()
    source = a / "checkpoints" / "step_00000004"
    run_dir, dpo_dir = scratch() / "weights_from_tp2", scratch() / "dpo_reference_from_tp2"
    result = pretrain(run_dir, 1, nproc=1, launcher="python", max_steps=1, warmup_steps=1, decay_steps=0,
                      eval_interval=0, **FOUR_KV_HEADS, **BIASES, **{"run.init_from": str(source)})
    config = Config(model=ModelConfig(**checkpoint.read_meta(source.parent, source.name)["model"]))
    load_reference(config, reference_source(str(source)), torch.device("cpu"), dpo_dir)
    converted = Path("converted") / "step_00000004_universal"
    assert (dpo_dir / converted / "converted_from").read_text() == str(source.resolve())
    assert f"universal checkpoint in {run_dir / converted}" in result.stdout
    for run in (b, run_dir):  # served the start only: removed once the run saved its own checkpoint
        assert not (run / "converted").exists() and (run / "checkpoints" / "latest").is_file()
    assert not (a / "checkpoints" / "step_00000004_universal").exists()


def test_tp2_checkpoint_exports_to_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from doge_dist.train.export import export_hf, load_checkpoint_model

    a, b, _ = reshard_chain()
    export_hf(a / "checkpoints" / "step_00000008", tmp_path / "hf")
    assert not (a / "checkpoints" / "step_00000008_universal").exists()  # A's directory may be read-only or training
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    same_weights_at_tp1 = load_checkpoint_model(b / "checkpoints" / "step_00000008").eval()
    ids = torch.randint(3, 512, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - same_weights_at_tp1(ids).logits).abs().max() <= 1e-3
