"""Checks that run before any process group, model or dataset exists.

Every mistake a user can make in the YAML, the DeepSpeed JSON, the data paths or the tokenizer
fails here with one paragraph naming the key or file and the fix, on every rank alike (the checks
read only files and the launcher's WORLD_SIZE). Prefix files are checked for shape here; token ids
are scanned later by the data pipeline itself (on rank 0 only).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..parallel.expert import check_expert_parallel
from ..parallel.grid_checkpoint import check_grid
from ..parallel.state import ParallelLayout
from ..parallel.state import check_layout as check_parallel_layout
from ..parallel.tensor import check_tensor_parallel
from .ds_config import bf16_enabled, resolve_ds_config, zero_stage
from .optim import DECAY_GROUPS
from .schedule import check_schedule

VOCAB_PADDING = 128  # the model vocabulary may exceed the tokenizer's by padding up to this many ids


def check_layout(config: Config, world_size: int) -> ParallelLayout:
    """The process layout, and a model whose shapes split over it."""
    layout = check_parallel_layout(config.parallel, world_size)
    if layout.tensor_parallel > 1:
        check_tensor_parallel(config.model, layout.tensor_parallel, config.parallel.sequence_parallel)
        if config.parallel.sequence_parallel and config.data.seq_length % layout.tensor_parallel:
            raise ConfigError(
                f"data.seq_length ({config.data.seq_length}) must be a multiple of parallel.tensor_parallel "
                f"({layout.tensor_parallel}) with parallel.sequence_parallel=true: each tensor-parallel rank holds "
                f"seq_length / tensor_parallel tokens."
            )
    if layout.expert_parallel > 1:
        check_expert_parallel(config.model, layout.expert_parallel)
        if layout.tensor_parallel > 1:
            check_grid(config.model, layout.tensor_parallel)
    return layout


def check_seq_length(config: Config) -> None:
    """data.seq_length fits the model (launch/plan.py runs this too: a plan's activations scale with it)."""
    seq_length, positions = config.data.seq_length, config.model.max_position_embeddings
    if seq_length < 1:
        raise ConfigError(f"data.seq_length must be positive, got {seq_length}.")
    if seq_length > positions:
        raise ConfigError(
            f"data.seq_length ({seq_length}) exceeds model.max_position_embeddings ({positions}), the context the model "
            f"(and its Hugging Face export) is made for; raise model.max_position_embeddings to at least {seq_length} "
            "or lower data.seq_length."
        )


def check_data(config: Config) -> None:
    from ..data import load_tokenizer, validate_prefix
    from ..data.blend import parse_blends, split_weights

    data = config.data
    if not data.tokenizer:
        raise ConfigError("data.tokenizer is not set: give the sentencepiece .model or Hugging Face directory the data was tokenized with.")
    tokenizer = load_tokenizer(data.tokenizer)
    vocab, model_vocab = tokenizer.vocab_size, config.model.vocab_size
    if not vocab <= model_vocab < vocab + VOCAB_PADDING:
        raise ConfigError(
            f"Tokenizer '{data.tokenizer}' has {vocab} ids but model.vocab_size is {model_vocab}: set "
            f"model.vocab_size={vocab} (or pad it by fewer than {VOCAB_PADDING} ids), or use the tokenizer this model was made for."
        )
    train, valid = parse_blends(data)
    for prefix in train[0] + (valid[0] if valid else []):
        validate_prefix(prefix, scan_tokens=False)
    if config.train.eval_interval > 0 and valid is None and split_weights(data.split)[1] == 0:
        raise ConfigError("train.eval_interval > 0 but data.split gives the validation split no weight; set data.valid_data or a split like 969,30,1.")


def check_writable_dir(path: str, key: str) -> None:
    """``path`` is, or can be made, a directory this process writes to: otherwise the first write, after
    the process group and the model exist, would fail with a traceback."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key} = '{path}' cannot be created: '{existing}' is a file. Choose another {key}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} = '{path}' cannot be written: '{existing}' is read-only for this user. Choose another {key}.")


def check_init_from(init_from: str, key: str = "run.init_from") -> None:
    """run.init_from (or the flag ``key``) is a directory (SFT/DPO read their model shape from it
    before the other checks)."""
    if not Path(init_from).is_dir():
        problem = "is a file" if Path(init_from).exists() else "does not exist"
        raise ConfigError(f"{key} = '{init_from}' {problem}: give a Hugging Face Doge directory or a run directory.")


def check_flex_trains_here(attn_backend: str) -> None:
    """PyTorch's FlexAttention has no backward on CPU: without a GPU an explicit flex would fail in the
    first step's backward, after the engine and the data were built."""
    import torch

    if attn_backend == "flex" and not torch.cuda.is_available():
        raise ConfigError("model.attn_backend = 'flex': PyTorch's FlexAttention has no backward on CPU and no CUDA GPU "
                          "is visible; train on CPU with model.attn_backend=auto (sdpa there), sdpa or eager.")


def check_ds_config(config: Config, ds_user: dict[str, Any], layout: ParallelLayout, where: str) -> dict[str, Any]:
    """The effective DeepSpeed config, and its ZeRO stage against the layout and train settings (launch/plan.py
    runs this too, so it plans only what the trainer runs)."""
    ds = resolve_ds_config(ds_user, config.train, layout.dp_size, where)
    stage = zero_stage(ds)
    if layout.expert_parallel > 1 and stage > 2:
        raise ConfigError(f"{where}: expert parallelism trains with ZeRO 0-2; ZeRO-3 is not supported with it.")
    model_parallel = layout.tensor_parallel > 1 or layout.expert_parallel > 1
    if model_parallel and stage == 0 and bf16_enabled(ds):
        raise ConfigError(f"{where}: ZeRO-0 in bf16 with tensor or expert parallelism is not supported: DeepSpeed's "
                          "ZeRO-0 bf16 optimizer computes the gradient norm for clipping without the model-parallel "
                          "marks of the parameters, so it leaves out other ranks' slices (at tensor_parallel 2 about "
                          "half the norm). Use ZeRO-1 (configs/zero1.json, the same steps), or ZeRO-0 in fp32.")
    if config.model.attn_backend == "flash" and not bf16_enabled(ds):
        raise ConfigError(f"{where} trains in fp32 (no bf16 enabled), but model.attn_backend = 'flash' runs flash-attn's "
                          "kernel, which computes in fp16/bf16 only: enable bf16 (configs/zero2.json, or train.bf16=true), "
                          "or choose model.attn_backend auto (flex on CUDA) or sdpa.")
    if config.train.compile and stage > 2:
        raise ConfigError(f"{where}: train.compile compiles each decoder layer, which ZeRO-3's parameter gathering hooks "
                          "would break into pieces; use ZeRO 0-2 with it, or set train.compile=false.")
    return ds


def check_settings(config: Config, ds_user: dict[str, Any], layout: ParallelLayout, where: str) -> dict[str, Any]:
    """The checks of the config's values alone, no files and no host (launch/plan.py makes them too, so it
    plans only runs the trainer takes): the loss backend's split, the schedule, the optimizer's groups, the
    DeepSpeed JSON against the layout and data.seq_length; returns the effective DeepSpeed config."""
    if config.model.loss_backend == "te" and config.parallel.tensor_parallel > 1:
        raise ConfigError("model.loss_backend = 'te': transformer-engine's cross entropy does not take a vocabulary "
                          "split over tensor-parallel ranks; with parallel.tensor_parallel > 1 set "
                          "model.loss_backend=torch (megatron-core's vocab-parallel cross entropy).")
    check_schedule(config.train)
    if config.train.freeze_dense_steps and not config.model.is_moe:
        raise ConfigError("train.freeze_dense_steps is for MoE models continued from a dense one (launch/upcycle.py).")
    if config.train.decay_groups not in DECAY_GROUPS:
        raise ConfigError(f"train.decay_groups = {config.train.decay_groups!r} is not one of {', '.join(DECAY_GROUPS)}.")
    ds = check_ds_config(config, ds_user, layout, where)
    check_seq_length(config)
    return ds


def check_run(config: Config, ds_user: dict[str, Any], world_size: int, where: str) -> tuple[ParallelLayout, dict[str, Any]]:
    """All pre-build checks; returns the layout and the effective DeepSpeed config."""
    layout = check_layout(config, world_size)
    ds = check_settings(config, ds_user, layout, where)
    if config.model.attn_backend == "flash":
        from ..model.flash import check_flash_available

        check_flash_available()
    check_flex_trains_here(config.model.attn_backend)
    if config.model.loss_backend == "te":
        from ..model.te_loss import check_te_available

        check_te_available()
    check_data(config)
    check_writable_dir(config.run.dir, "run.dir")
    if config.data.cache_dir:
        check_writable_dir(config.data.cache_dir, "data.cache_dir")
    if config.run.init_from:
        check_init_from(config.run.init_from)
    if config.run.init_optimizer and (not config.run.init_from or Path(config.run.init_from, "config.json").is_file()):
        what = f"'{config.run.init_from}', a Hugging Face directory (weights only)" if config.run.init_from else "not set"
        raise ConfigError(f"run.init_optimizer takes the optimizer states of run.init_from's checkpoint, but run.init_from is "
                          f"{what}: set run.init_from to a run directory or checkpoint, or drop run.init_optimizer.")
    if config.run.resume not in ("auto", "never") and not Path(config.run.resume).exists():
        raise ConfigError(f"run.resume = '{config.run.resume}' is neither auto, never, nor an existing checkpoint directory.")
    return layout, ds
