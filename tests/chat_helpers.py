"""Shared, built-once assets for tests/test_sft_*.py and tests/test_dpo_*.py: the chat twin of the
data tests' tokenizer, a tiny synthetic chat/preference sample preprocessed to chat prefixes, a
random doge-tiny Hugging Face directory to start from, and SFT/DPO runs launched like pretraining."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

import data_helpers
from doge_dist.config import ModelConfig
from doge_dist.convert.hf import save_hf
from doge_dist.data.chat_template import CHAT_SUBDIR
from doge_dist.data.preprocess_chat import preprocess_chat
from doge_dist.data.sample_chat import build_sample_chat
from doge_dist.model import build_model
from train_helpers import BIN, PYTHON, REPO, _port, run_on_a_free_port, scratch

SFT_CONVERSATIONS, DPO_PAIRS = 32, 16  # small: the DPO test memorises its pairs within a few epochs
VALID = 10  # held-out conversations and pairs: not a whole number of 4-sample global batches


@lru_cache(maxsize=None)
def chat_tokenizer() -> Path:
    """data_tools/train_tokenizer.py writes the chat twin next to the tokenizer."""
    return data_helpers.assets().tokenizer_dir / CHAT_SUBDIR


@lru_cache(maxsize=None)
def prefixes() -> dict[str, str]:
    """{"sft_train", "sft_valid", "dpo_train", "dpo_valid"} -> chat data prefix (..._text_document)."""
    root = scratch() / "chat_data"
    build_sample_chat(root, sft=SFT_CONVERSATIONS, dpo=DPO_PAIRS, valid=VALID)
    out = {}
    for name in ("sft_train", "sft_valid", "dpo_train", "dpo_valid"):
        preprocess_chat(str(root / f"{name}.jsonl"), str(root / name), str(chat_tokenizer()), kind=name[:3],
                        max_prompt_length=48, max_completion_length=48, log=data_helpers.quiet)
        out[name] = str(root / f"{name}_text_document")
    return out


@lru_cache(maxsize=None)
def init_dir() -> Path:
    """A seeded random doge-tiny (vocab 512 = the test tokenizer) as a Hugging Face directory."""
    torch.manual_seed(0)
    return save_hf(build_model(ModelConfig.from_preset("doge-tiny")), scratch() / "hf_init", tokenizer=chat_tokenizer())


def finetune(kind: str, run_dir: Path, stage: int, nproc: int, **values) -> Path:
    """launch/{sft,dpo}.py: 1 process with plain python, or 2 ranks with the deepspeed launcher."""
    script = str(REPO / "launch" / f"{kind}.py")
    data = prefixes()
    settings = {
        "run.init_from": str(init_dir()), "run.dir": str(run_dir),
        "data.train_data": f"[{data[kind + '_train']}]", "data.valid_data": f"[{data[kind + '_valid']}]",
        "data.tokenizer": str(chat_tokenizer()), "data.seq_length": 128,
        "finetune.epochs": 0, "train.bf16": "false", "train.log_interval": 1, "train.eval_interval": 0,
        "train.warmup_steps": 0, "train.decay_steps": 0,
    }
    settings.update(values)

    def launch() -> list[str]:
        launcher = [PYTHON] if nproc == 1 else [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_port())]
        return launcher + [script, "--ds_config", str(REPO / "configs" / f"zero{stage}.json")] + [f"{k}={v}" for k, v in settings.items()]

    cmd, result = run_on_a_free_port(launch)
    if result.returncode != 0:
        raise AssertionError(f"{kind} failed ({' '.join(cmd)}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return run_dir


# Runs shared by several test files: one process (micro 2 x accumulation 2) and two ZeRO-2 ranks
# (micro 2 x accumulation 1) see the same 4 samples per step in the same micro-batches. Both also
# score all 10 validation samples (eval_iters global batches hold more): SFT at its last step, DPO
# every 10 steps; one process in 5 micro-batches of 2, two ranks in 3 of 2 each, the last one's
# second row a filler that scores nothing.
STEPS = {"sft": 8, "dpo": 30}
LR = {"sft": 2e-3, "dpo": 5e-4}
VALIDATION = {"sft": {"train.eval_interval": STEPS["sft"], "train.eval_iters": 3},
              "dpo": {"train.eval_interval": 10, "train.eval_iters": 3}}


@lru_cache(maxsize=None)
def single_run(kind: str) -> Path:
    return finetune(kind, scratch() / f"{kind}_single", 0, 1, **{"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2,
                                                                  "train.max_steps": STEPS[kind], "train.lr": LR[kind]},
                    **VALIDATION[kind])


@lru_cache(maxsize=None)
def zero2_run(kind: str, **extra) -> Path:
    values = {"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1, "train.max_steps": STEPS[kind], "train.lr": LR[kind]}
    return finetune(kind, scratch() / f"{kind}_zero2", 2, 2, **values, **VALIDATION[kind], **extra)
