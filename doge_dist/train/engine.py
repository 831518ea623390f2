"""Model, optimizer and schedule wrapped by ``deepspeed.initialize``.

DeepSpeed does ZeRO, bf16 master weights, gradient reduction, clipping and the checkpoint files;
this file decides what goes in: the seeded single-device model (or the weights of an HF directory)
split by the parallel layout, activation checkpointing and torch.compile per decoder layer, and the AdamW groups and schedule from the YAML.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import Config, ModelConfig
from ..model import DogeForCausalLM, build_model
from ..model.compile import compile_model
from ..parallel.apply import deepspeed_data_parallel_size, deepspeed_mpu, parallelize
from .ds_config import bf16_enabled, gradient_clipping, zero_stage
from .optim import build_optimizer
from .schedule import build_scheduler


def enable_activation_checkpointing(model: DogeForCausalLM) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    The layer's ``forward`` is replaced on the instance, so parameter names (and checkpoints) are
    unchanged. Non-reentrant checkpointing works with ZeRO-3's parameter hooks.
    """
    for layer in model.model.layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


def initial_model(config: Config, weights: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """A fresh model (same weights on every rank for the same seed), or ``weights`` (a checkpoint's,
    consolidated), or the weights of run.init_from's HF directory; built as this run's ``config.model``
    (init_from's config with the run's model.* overrides)."""
    from ..convert.hf import load_state_checked

    model = build_model(config.model)
    if weights is None and is_hf_directory(config.run.init_from):
        weights = hf_weights(config.run.init_from, config.model)
    if weights is not None:
        load_state_checked(model, weights, f"run.init_from '{config.run.init_from}'")
    return model


def hf_weights(path: str | Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of the HF directory ``path``, read for a model built as ``model`` (its router_layout,
    checked before)."""
    from ..convert.hf import load_hf

    return load_hf(path, router_layout=model.router_layout).state_dict()


def is_hf_directory(path: Optional[str]) -> bool:
    return bool(path) and Path(path, "config.json").is_file()


def build_engine(config: Config, ds: dict[str, Any], device: torch.device,
                 weights: Optional[dict[str, torch.Tensor]] = None):
    """(engine, effective DeepSpeed config); ``weights``: see ``initial_model``. At ZeRO 0 in fp32 the
    optimizer clips and guards itself: DeepSpeed is given no clipping then, and the config returned (the
    run's ds_config.json) keeps the threshold the optimizer clips at; a missing one is DeepSpeed's default."""
    import deepspeed

    ds = copy.deepcopy(ds)
    model = parallelize(initial_model(config, weights), config.parallel, zero_stage(ds) == 3).to(device)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if config.train.compile:
        compile_model(model)
    stage0_fp32_clip = gradient_clipping(ds) if zero_stage(ds) == 0 and not bf16_enabled(ds) else None
    mpu = deepspeed_mpu(config.parallel)
    optimizer = build_optimizer(model, config.train, stage0_fp32_clip, mpu)
    scheduler = build_scheduler(optimizer, config.train)
    if config.parallel.expert_parallel > 1:  # DeepSpeed's batch arithmetic counts its own data-parallel ranks
        dp = torch.distributed.get_world_size() // config.parallel.tensor_parallel
        ds["train_batch_size"] = (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
                                  * deepspeed_data_parallel_size(config.parallel, dp))
    given = ds if stage0_fp32_clip is None else {**ds, "gradient_clipping": 0.0}  # the optimizer clips instead
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=given,
                                      mpu=mpu)
    undo_states_of_a_zero_gradient_step(engine.optimizer)
    return engine, ds


def undo_states_of_a_zero_gradient_step(optimizer) -> None:
    """DeepSpeed's ZeRO-0 bf16 wrapper (``FP16_UnfusedOptimizer``) creates AdamW's states by one step
    on zero gradients: AdamW then counts a step more than it took, so its bias correction shrinks the
    first updates (by a quarter at the first), and that step decays the fp32 master weights, unlike
    ZeRO 1-3 and fp32 runs of the same config. Drop the states (AdamW creates them at its first real
    step) and copy the masters back from the bf16 weights they were made from."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return
    optimizer.optimizer.state.clear()
    for masters, weights in zip(optimizer.fp32_groups, optimizer.fp16_groups):
        for master, weight in zip(masters, weights):
            master.data.copy_(weight.data)
