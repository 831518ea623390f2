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
    run's ds_config.json) keeps the threshold the optimizer clips at; a missing one is DeepSpeed's default.
    In bf16 the fp32 master weights start from the model's fp32 weights (``start_masters_from``)."""
    import deepspeed

    ds = copy.deepcopy(ds)
    model = parallelize(initial_model(config, weights), config.parallel, zero_stage(ds) == 3)
    fp32 = {param: param.detach() for param in model.parameters()} if bf16_enabled(ds) else None
    model = model.to(device)
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
    if fp32 is not None:
        start_masters_from(engine.optimizer, fp32)
    return engine, ds


def start_masters_from(optimizer, fp32: dict[nn.Parameter, torch.Tensor]) -> None:
    """Set a bf16 run's fp32 master weights to ``fp32``: each parameter's values before DeepSpeed cast
    the module to bf16 (this rank's shard; no copy: the host tensors the model was built in, which the
    move to the device and the cast let go of). DeepSpeed makes the masters from the bf16 copy, which
    rounded the starting weights (a fresh init or run.init_from's) to bf16 for good, unlike the HF
    Trainer's bf16 (autocast over fp32 parameters) that the recipes follow. ZeRO 1-3 through
    DeepSpeed's setters; ZeRO-0's wrapper (``FP16_UnfusedOptimizer``) keeps its masters in
    ``fp32_groups``, in the order of its bf16 ``fp16_groups``."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        # The wrapper created AdamW's states by one step on zero gradients: AdamW would count a step more
        # than it took, its bias correction shrinking the first updates (by a quarter at the first), unlike
        # ZeRO 1-3 and fp32 runs of the same config. Drop them (AdamW creates them at its first real step);
        # that step also decayed the masters, set below.
        optimizer.optimizer.state.clear()
        for masters, weights in zip(optimizer.fp32_groups, optimizer.fp16_groups):
            for master, weight in zip(masters, weights):
                master.data.copy_(fp32[weight])
        return
    for param, value in fp32.items():
        if hasattr(param, "ds_id"):  # ZeRO-3
            safe_set_local_fp32_param(param, zero3_partition(param, value))
        else:
            safe_set_full_fp32_param(param, value)


def zero3_partition(param: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``value`` (``param``'s full value), zero-padded as DeepSpeed pads
    the last one. DeepSpeed 0.19's ``safe_set_full_fp32_param`` cuts it without the padding: the last
    rank reads past the end of a parameter whose size the data-parallel ranks do not divide."""
    size = param.ds_tensor.ds_numel
    start = size * torch.distributed.get_rank(group=param.ds_process_group)
    part = value.flatten()[start:start + size]
    return torch.nn.functional.pad(part, (0, size - part.numel()))

