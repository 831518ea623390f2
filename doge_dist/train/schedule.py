"""Learning-rate schedules as a multiplier of the peak lr: warmup-stable-decay (WSD) and cosine.

WSD is the Doge recipe: linear warmup, a constant stable phase, then a decay over the last
``decay_steps`` to ``min_lr_ratio``. Its linear decay is the curve of ``transformers.get_wsd_schedule``
(tested); cosine and 1-sqrt decay shapes are the common alternatives. ``cosine`` is the small-doge
SFT/DPO recipes' ``cosine_with_min_lr`` (``transformers.get_cosine_with_min_lr_schedule_with_warmup``,
tested): unlike WSD it warms up from 0, not from ``min_lr_ratio``. The multiplier is a pure function
of the optimizer-step count, so a resumed run (or a different rank count) recomputes the same lr.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch

from ..config import ConfigError, TrainConfig

SCHEDULERS = ("wsd", "cosine")
DECAY_TYPES = ("linear", "cosine", "1-sqrt")


def _decay_shape(progress: float, decay_type: str) -> float:
    """1 at the start of the decay, 0 at its end."""
    if decay_type == "linear":
        return 1.0 - progress
    if decay_type == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """Multiplier of ``train.lr`` for optimizer step ``step`` (0 = the first update)."""
    warmup, total, floor = train.warmup_steps, train.max_steps, train.min_lr_ratio
    if step < warmup:  # transformers' WSD warms up from min_lr_ratio, its cosine_with_min_lr from 0
        start = 0.0 if train.scheduler == "cosine" else floor
        return start + (1.0 - start) * step / max(1, warmup)
    if train.scheduler == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * _decay_shape(progress, "cosine")
    decay_start = total - train.decay_steps
    if step < decay_start:
        return 1.0
    if step >= total:
        return floor
    progress = min(1.0, (step - decay_start) / max(1, train.decay_steps))
    return floor + (1.0 - floor) * _decay_shape(progress, train.decay_type)


def check_schedule(train: TrainConfig) -> None:
    """Reject schedules that cannot be laid out over ``max_steps``, and WSD's settings under cosine (it would ignore them)."""
    if train.scheduler not in SCHEDULERS:
        raise ConfigError(f"train.scheduler = {train.scheduler!r} is not one of {', '.join(SCHEDULERS)}.")
    if train.decay_type not in DECAY_TYPES:
        raise ConfigError(f"train.decay_type = {train.decay_type!r} is not one of {', '.join(DECAY_TYPES)}.")
    if train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be at least 1, got {train.max_steps}.")
    if train.scheduler == "cosine":  # it decays over every step after the warmup, to min_lr_ratio, always as a cosine
        for key in ("decay_steps", "decay_type"):
            if getattr(train, key) != getattr(TrainConfig, key):
                raise ConfigError(f"train.{key} = {getattr(train, key)!r} applies to the wsd scheduler only; train.scheduler "
                                  f"= 'cosine' decays over all steps after the warmup, as a cosine. Remove train.{key} "
                                  f"(or set train.scheduler=wsd).")
    phases = train.warmup_steps + train.decay_steps
    if train.warmup_steps < 0 or train.decay_steps < 0 or phases > train.max_steps:
        raise ConfigError(
            f"train.warmup_steps ({train.warmup_steps}) + train.decay_steps ({train.decay_steps}) must be "
            f"non-negative and fit in train.max_steps ({train.max_steps})."
        )
    if train.freeze_dense_steps >= train.max_steps:
        raise ConfigError(f"train.freeze_dense_steps ({train.freeze_dense_steps}) is not less than train.max_steps "
                          f"({train.max_steps}): the dense weights would never train; lower it or raise train.max_steps.")
    if train.freeze_dense_steps and phases > train.max_steps - train.freeze_dense_steps:
        raise ConfigError(
            f"train.freeze_dense_steps ({train.freeze_dense_steps}) leaves {train.max_steps - train.freeze_dense_steps} "
            f"steps for the whole model, fewer than its schedule's warmup and decay ({phases}); lower one of them."
        )
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be within [0, 1], got {train.min_lr_ratio}.")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that DeepSpeed steps once per applied optimizer step (and checkpoints with it).

    A group marked ``frozen_until`` N (upcycled dense weights) keeps lr 0, so AdamW leaves it exactly
    as it is, then follows a fresh schedule of its own over the remaining steps (re-warmup included)."""

    def multiplier(group: dict):
        start = group.get("frozen_until", 0)
        if not start:
            return lambda step: lr_multiplier(step, train)
        rest = dataclasses.replace(train, max_steps=train.max_steps - start)
        return lambda step: 0.0 if step < start else lr_multiplier(step - start, rest)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [multiplier(group) for group in optimizer.param_groups])


def reapply_optimizer_settings(scheduler: torch.optim.lr_scheduler.LambdaLR, train: TrainConfig) -> None:
    """Every optimizer group's lr (at the scheduler's step) and AdamW settings from this run's ``train``
    section, after a checkpoint load: DeepSpeed restores ``base_lrs`` and the groups' current lr from the checkpoint,
    that is from the config of the run that wrote it, so a changed ``train.lr`` would be ignored and a
    changed ``train.max_steps`` (or phase lengths) would leave the first step at the old schedule's
    lr; a continuation with the optimizer state (fresh scheduler) starts at its step 0, each group
    by its own multiplier (frozen groups at 0). AdamW's other settings are restored from the checkpoint
    too: this run's weight decay (for the groups marked ``decayed``; a checkpoint older than that mark
    tells them by a decay > 0), betas and eps replace them."""
    scheduler.base_lrs = [train.lr] * len(scheduler.optimizer.param_groups)
    for group, base, multiplier in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(scheduler.last_epoch)
        group["weight_decay"] = train.weight_decay if group.get("decayed", group["weight_decay"] > 0) else 0.0
        group["betas"], group["eps"] = (train.adam_beta1, train.adam_beta2), train.adam_eps
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def lr_multipliers(scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[Optional[float]]:
    """Each optimizer group's lr over its base lr, as the scheduler holds them (right after a checkpoint
    load: the saving run's schedule at its last step); None for a base lr of 0."""
    return [group["lr"] / base if base else None for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs)]


def warn_if_lr_jumps(saved: list[Optional[float]], scheduler: torch.optim.lr_scheduler.LambdaLR, train: TrainConfig,
                     step: int) -> None:
    """A resume whose schedule (a larger train.max_steps, other phase lengths) puts the lr above the
    checkpoint's own schedule after the warmup: a decayed run raised back to the peak lr at once. Megatron-LM
    refuses a changed schedule unless told to override it; here it is said, with the way to a re-warmup
    (doge_reference.md: continuing from a checkpoint, a short re-warmup)."""
    for old, new in zip(saved, lr_multipliers(scheduler)):
        if old is not None and new is not None and step >= train.warmup_steps and new > old * (1 + 1e-6):
            warnings.warn(
                f"The checkpoint's schedule had the lr at {old:.4g} x train.lr for step {step + 1}; this run's "
                f"train.max_steps and phase lengths put it at {new:.4g} x train.lr: a jump with no warmup. To go on "
                "from a decayed run, start a new run.dir with run.init_from=<this run> (a fresh schedule with its "
                "warmup); raising train.max_steps continues smoothly only from the stable phase."
            )
            return
