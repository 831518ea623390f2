"""A checkpoint of any ZeRO stage -> fp32 weights -> a Hugging Face Doge directory with the tokenizer.

DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` merges the fp32 master partitions of ZeRO
1-3 (and of the bf16 optimizer); a ZeRO-0 checkpoint has the whole model in its model-states file,
in fp32, or in bf16 with the fp32 masters in its optimizer state (checkpoint.fp32_master_names).
Tensor- and expert-parallel checkpoints go through DeepSpeed's universal checkpoint (ZeRO 1-3) or, at
ZeRO-0, the per-rank model states are merged with the split tables.
The model shape comes from the checkpoint's doge_meta.json, the tokenizer from the run's config.yaml.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from ..config import ConfigError, ModelConfig
from ..model import DogeForCausalLM, build_model
from . import checkpoint


def consolidated_state(root: Path, tag: str, universal_root: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint of any ZeRO stage and tensor-parallel size; in a distributed
    job a collective call (a model-parallel checkpoint is converted once, by rank 0, into
    ``universal_root``, default ``root``: see checkpoint.universal_root)."""
    meta = checkpoint.read_meta(root, tag)
    partitioned = checkpoint.saved_zero_stage(root, tag) > 0  # ZeRO 1-3: DeepSpeed partitioned the fp32 states
    # DeepSpeed's BF16_Optimizer (ZeRO-1, fp32 gradient accumulation) saves a format zero_to_fp32 cannot read
    bf16_optimizer = (meta.get("optimizer_layout") or {}).get("bf16_optimizer", False)
    if meta.get("tensor_parallel", 1) > 1 or meta.get("expert_parallel", 1) > 1 or bf16_optimizer:
        if partitioned:  # DeepSpeed's universal checkpoint merges the model-parallel slices and reads both formats
            if dist.is_available() and dist.is_initialized():  # every rank of a job calls this: rank 0 converts
                universal = Path(*checkpoint.universal_checkpoint(root, tag, universal_root)) / "zero"
            else:
                universal = checkpoint.convert_to_universal(root, tag, universal_root) / "zero"
            return {p.name: torch.load(p / "fp32.pt", weights_only=False)["param"].float()
                    for p in universal.iterdir() if (p / "fp32.pt").is_file()}
        from ..parallel.grid_checkpoint import merge_grid

        shards = [_module_states(file) for file in _model_parallel_files(root / tag)]
        return merge_grid(shards, ModelConfig(**meta["model"]), meta.get("tensor_parallel", 1))
    if partitioned:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))
    return _module_states(root / tag / "mp_rank_00_model_states.pt")


def _model_parallel_files(directory: Path) -> list[Path]:
    """A ZeRO-0 checkpoint's model-parallel files in rank order: DeepSpeed names them ``mp_rank_{r:02d}``, so
    by name ``mp_rank_100`` sorts before ``mp_rank_11``."""
    files = directory.glob("mp_rank_*_model_states.pt")
    return sorted(files, key=lambda file: int(file.name.split("_")[2]))


def _module_states(file: Path) -> dict[str, torch.Tensor]:
    """The weights of one rank's ZeRO-0 model states: the fp32 masters where the module is bf16."""
    states = torch.load(file, map_location="cpu", weights_only=False)
    weights = {k: v.float() for k, v in states["module"].items()}
    if checkpoint.FP32_MASTER_NAMES in states:
        for names, masters in zip(states[checkpoint.FP32_MASTER_NAMES], states["optimizer"]["fp32_groups"]):
            weights.update(zip(names, masters))
    return weights


def find_checkpoint(path: str | Path, step: Optional[int] = None) -> tuple[Path, str]:
    """(root, tag) of the latest or ``step``'s checkpoint under ``path``, whole (checkpoint.check_complete)."""
    root, tag = checkpoint.resolve_checkpoint(path, step)
    if not (root / tag / checkpoint.META).is_file():
        kept = checkpoint.complete_tags(root)
        raise ConfigError(f"No complete checkpoint for step {step} in {root}; kept: {', '.join(kept) or 'none'}.")
    checkpoint.check_complete(root, tag)
    return root, tag


def load_checkpoint_model(path: str | Path, step: Optional[int] = None, run_dir: Optional[Path] = None) -> DogeForCausalLM:
    """Our model with a checkpoint's consolidated fp32 weights (``model.config`` from the checkpoint);
    ``run_dir``: the run that loads it, where a universal conversion goes (checkpoint.universal_root).
    Without one (export, generate) a conversion goes into a temporary directory, never into the
    checkpoint's run, which may be read-only, shared or still training."""
    from ..convert.hf import load_state_checked

    root, tag = find_checkpoint(path, step)
    model = build_model(ModelConfig(**checkpoint.read_meta(root, tag)["model"]))
    print(f"[doge-dist] consolidating {root / tag}", flush=True)
    with contextlib.ExitStack() as scratch:
        run_dir = run_dir or Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="doge_consolidate_")))
        load_state_checked(model, consolidated_state(root, tag, checkpoint.universal_root(root, run_dir)), str(root / tag))
    return model


def run_tokenizer_path(path: str | Path, step: Optional[int] = None) -> Optional[str]:
    """data.tokenizer of the run that wrote the checkpoint under ``path`` (from its config.yaml); a
    path that does not exist from here (relative to where the run was started) is an error naming --tokenizer."""
    root, _ = checkpoint.resolve_checkpoint(path, step)
    config_file = root.parent / "config.yaml"
    if not config_file.is_file():
        return None
    tokenizer = (yaml.safe_load(config_file.read_text()).get("data") or {}).get("tokenizer")
    if tokenizer and not Path(tokenizer).exists():
        raise ConfigError(
            f"{config_file} names data.tokenizer '{tokenizer}', which does not exist from {Path.cwd()}"
            f"{'' if Path(tokenizer).is_absolute() else ' (the path is relative to the directory the run was started in)'}: "
            "run from that directory, or pass --tokenizer."
        )
    return tokenizer


def known_tokenizer_path(path: str | Path, step: Optional[int] = None) -> str:
    """``run_tokenizer_path``, or a ConfigError that says to pass --tokenizer (a checkpoint copied without
    its run's config.yaml, or a run without data.tokenizer)."""
    found = run_tokenizer_path(path, step)
    if not found:
        raise ConfigError(f"No tokenizer known for {path}: pass --tokenizer (the run's config.yaml, next to its "
                          "checkpoints/ directory, is missing or has no data.tokenizer).")
    return found


def check_tokenizer_fits(tokenizer, path: str | Path, vocab_size: int) -> None:
    """A tokenizer with more ids than the model's vocabulary is another model's (its ids would index past
    the embedding); fewer is a padded vocabulary, as the trainer allows."""
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"Tokenizer '{path}' has {tokenizer.vocab_size} ids but the model's vocab_size is "
                          f"{vocab_size}: pass --tokenizer with the tokenizer this model was made for.")


def resolve_tokenizer(path: str | Path, step: Optional[int], tokenizer: Optional[str], vocab_size: int):
    """--tokenizer, or data.tokenizer of the run's config.yaml, loaded and checked against the model's
    vocabulary: before the checkpoint is consolidated (a while for a large model), so that a missing or
    foreign tokenizer fails first, not after it."""
    from ..data import load_tokenizer

    tokenizer_path = tokenizer or known_tokenizer_path(path, step)
    loaded = load_tokenizer(tokenizer_path)
    check_tokenizer_fits(loaded, tokenizer_path, vocab_size)
    return loaded


def save_hf_with_tokenizer(model: DogeForCausalLM, output: str | Path, tokenizer) -> Path:
    """``save_hf`` with ``tokenizer`` (from ``resolve_tokenizer``) written as a Hugging Face tokenizer."""
    from ..convert.hf import save_hf

    with tempfile.TemporaryDirectory() as scratch:
        return save_hf(model, output, tokenizer=tokenizer.save_hf(Path(scratch) / "tokenizer"))


def export_hf(path: str | Path, output: str | Path, step: Optional[int] = None, tokenizer: Optional[str] = None) -> Path:
    from ..convert.hf import check_output

    check_output(output)  # the output and the tokenizer before the consolidation, which takes a while for a large model
    vocab_size = checkpoint.read_meta(*find_checkpoint(path, step))["model"]["vocab_size"]
    loaded = resolve_tokenizer(path, step, tokenizer, vocab_size)
    return save_hf_with_tokenizer(load_checkpoint_model(path, step), output, loaded)
