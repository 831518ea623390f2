"""The shipped configs against the small-doge recipes they say they are: the pretraining table of
doge_reference.md (peak lr, steps, WSD phases, AdamW, seed, sequence, tokens per step) with the batch
of small-doge's recipes/doge/Doge-*/config_full.yaml (per-device 1 x accumulation 256/512/768/1024
sequences), and its SFT/DPO recipes (recipes/doge/Doge-*-Instruct/{sft,dpo}/config_full.yaml).
Only YAML and JSON are read; nothing is built or trained."""
import re
from pathlib import Path

import pytest

from doge_dist.config import ModelConfig, load_config
from doge_dist.model.flops import parameter_count
from doge_dist.train.ds_config import read_ds_config, resolve_ds_config

REPO = Path(__file__).resolve().parents[1]
SEQUENCE = 2048

# config: (preset, total parameters of the published model, peak lr, steps, warmup = decay steps, sequences per step)
PRETRAINING = {
    "doge_20m.yaml": ("doge-20m", 13_118_728, 8e-3, 8000, 800, 256),
    "doge_60m.yaml": ("doge-60m", 54_571_552, 6e-3, 16000, 1600, 512),
    "doge_160m.yaml": ("doge-160m", 152_676_168, 4e-3, 24000, 2400, 768),
    "doge_320m.yaml": ("doge-320m", 335_750_272, 2e-3, 32000, 3200, 1024),
    # dense -> sparse continuations: the recipe of the dense model of the same shape
    "doge_20m_moe.yaml": ("doge-20m-moe", 17_444_104, 8e-3, 8000, 800, 256),
    "doge_120m_moe.yaml": ("doge-120m-moe", 122_728_992, 6e-3, 16000, 1600, 512),
}
# config: (the config whose run.dir is run.init_from, the pretraining config, lr divisor, sequence length)
FINETUNING = {
    "sft_doge_20m.yaml": ("doge_20m.yaml", "doge_20m.yaml", 10, 2048),
    "sft_doge_60m.yaml": ("doge_60m.yaml", "doge_60m.yaml", 10, 2048),
    "dpo_doge_20m.yaml": ("sft_doge_20m.yaml", "doge_20m.yaml", 100, 1024),
    "dpo_doge_60m.yaml": ("sft_doge_60m.yaml", "doge_60m.yaml", 100, 1024),
    "sft_tiny_cpu.yaml": ("doge_tiny_cpu.yaml", "doge_tiny_cpu.yaml", 10, 256),
    "dpo_tiny_cpu.yaml": ("sft_tiny_cpu.yaml", "doge_tiny_cpu.yaml", 100, 256),
}


def config(name: str, *overrides: str):
    return load_config(str(REPO / "configs" / name), list(overrides))


def effective_ds(cfg) -> dict:
    return resolve_ds_config(read_ds_config(str(REPO / cfg.run.ds_config)), cfg.train, 1, cfg.run.ds_config)


def test_every_training_config_is_pinned_here():
    shipped = {path.name for path in (REPO / "configs").glob("*.yaml")}
    assert shipped == set(PRETRAINING) | set(FINETUNING) | {"doge_tiny_cpu.yaml"}


@pytest.mark.parametrize("name", sorted(PRETRAINING))
def test_pretraining_recipe_matches_the_reference(name):
    preset, params, lr, steps, phase, sequences = PRETRAINING[name]
    cfg = config(name)
    assert cfg.model == ModelConfig.from_preset(preset) and parameter_count(cfg.model) == params
    train = cfg.train
    assert (train.lr, train.max_steps, train.warmup_steps, train.decay_steps) == (lr, steps, phase, phase)
    assert (train.scheduler, train.decay_type, train.min_lr_ratio) == ("wsd", "linear", 0.0)
    assert (train.adam_beta1, train.adam_beta2, train.adam_eps, train.weight_decay, train.seed) == (0.9, 0.95, 1e-8, 0.01, 233)
    assert cfg.data.seq_length == SEQUENCE
    assert train.micro_batch_size * train.gradient_accumulation_steps == sequences  # on one GPU
    ds = effective_ds(cfg)
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    if cfg.model.is_moe:  # small-doge's MoE warm-up trains only the new tables over the lr warmup
        assert train.freeze_dense_steps == train.warmup_steps


@pytest.mark.parametrize("name", sorted(PRETRAINING))
def test_pretraining_header_states_the_tokens_it_trains_on(name):
    """max_steps x tokens per step, as the header says (the README's budgets are rounded; 160M's 32B is not
    24,000 steps of its recipe's 768 sequences, which the header has to say)."""
    _, _, _, steps, _, sequences = PRETRAINING[name]
    total = steps * sequences * SEQUENCE
    line = f"{steps:,} steps x {sequences * SEQUENCE:,} tokens = {total / 1e9:.2f}B tokens"
    assert line in (REPO / "configs" / name).read_text(), line


@pytest.mark.parametrize("name", sorted(PRETRAINING))
def test_pretraining_header_torchrun_line_keeps_the_global_batch(name):
    """The ``torchrun --nproc_per_node N ... train.gradient_accumulation_steps=A`` example: micro x A x N
    is the recipe's global batch."""
    text = (REPO / "configs" / name).read_text()
    for gpus, accumulation in re.findall(r"torchrun --nproc_per_node (\d+) .*gradient_accumulation_steps=(\d+)", text):
        assert config(name).train.micro_batch_size * int(accumulation) * int(gpus) == PRETRAINING[name][5]


@pytest.mark.parametrize("name", sorted(FINETUNING))
def test_finetuning_recipe_matches_the_reference(name):
    """lr = pretraining lr / 10 (SFT) or / 100 (DPO), 2 epochs, cosine_with_min_lr (min 0.1, warmup 10%),
    AdamW as the Trainer's ``adamw_torch`` default (0.9, 0.999, 1e-8), weight decay 0.01, seed 233, bf16,
    clip 1.0; DPO beta 0.1 (TRL's default: the recipes set none) against the frozen SFT model."""
    init, pretraining, divisor, seq_length = FINETUNING[name]
    cfg, base = config(name), config(pretraining)
    train, finetune = cfg.train, cfg.finetune
    assert cfg.run.init_from == config(init).run.dir
    assert train.lr == pytest.approx(base.train.lr / divisor, rel=1e-12)
    assert (finetune.epochs, finetune.warmup_ratio, train.scheduler, train.min_lr_ratio) == (2, 0.1, "cosine", 0.1)
    assert cfg.data.seq_length == seq_length
    ds = effective_ds(cfg)
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    if "tiny" in name:
        return
    assert (train.adam_beta1, train.adam_beta2, train.adam_eps, train.weight_decay, train.seed) == (0.9, 0.999, 1e-8, 0.01, 233)
    assert train.micro_batch_size * train.gradient_accumulation_steps == 128  # per-device 1 x accumulation 128
    if name.startswith("sft"):
        assert finetune.packing
    else:
        assert (finetune.beta, finetune.reference) == (0.1, "model")


@pytest.mark.parametrize("stage", range(4))
def test_deepspeed_json_is_the_stage_it_is_named(stage):
    """DeepSpeed's own parser reads every key (resolve_ds_config runs it): an unknown one is refused."""
    from doge_dist.config import TrainConfig

    path = f"configs/zero{stage}.json"
    ds = resolve_ds_config(read_ds_config(str(REPO / path)), TrainConfig(), 1, path)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
