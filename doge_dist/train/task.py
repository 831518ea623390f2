"""What the training loop (loop.py) asks of an objective, so pretraining, SFT and DPO share one loop,
one engine, one checkpoint format and one Reporter.

A task supplies the data (``build_data``, at a resume's step and consumed samples: an object with
``next_step()``, ``validation_batches()``, ``global_batch`` and ``split_samples``), the loss of one
micro-batch as a *sum* over its loss units plus the unit count (``forward_loss``, ``count``: tokens
for language modelling, pairs for DPO, so the loop's exact global-batch mean works for every
objective; ``forward_loss`` sees training micro-batches with gradients enabled and validation ones
under ``no_grad``; ``end_step`` follows each optimizer step's training micro-batches), and extra
TensorBoard scalars at log points and after each validation;
``check_data`` runs with the other input checks, before any process group or model exists, ``setup``
once the checkpoint to resume from is known (before the engine: it may refuse the run),
``prepare`` once between the engine's set-up and step 1, and ``checkpoint_meta`` goes into every
checkpoint's meta file (under "task"), for ``setup`` of a resume to read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import torch

from ..config import Config, TrainConfig
from ..model import IGNORE_INDEX
from ..model.moe_stats import MoEStats
from .distributed import DistEnv


class Task(Protocol):
    def check_data(self, config: Config) -> None: ...

    def setup(self, config: Config, start: Optional[tuple[Path, str]]) -> None: ...

    def checkpoint_meta(self) -> Optional[dict]: ...

    def build_data(self, config: Config, env: DistEnv, dp_rank: int, dp_size: int, consumed_samples: int, cache_dir: str,
                   step: int = 0, saved_split: int = 0): ...

    def count(self, batch: dict) -> int: ...

    def prepare(self, engine) -> None: ...

    def forward_loss(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]: ...

    def end_step(self) -> None: ...

    def log_metrics(self, device: torch.device) -> dict[str, float]: ...

    def monitor_state(self, copies: int) -> Optional[dict]: ...

    def restore_monitor_state(self, state: Optional[dict], config: Config, owner: bool, device: torch.device,
                              copies: int) -> None: ...

    def validation_metrics(self, device: torch.device) -> dict[str, float]: ...

    # whether the loss is a mean token cross entropy, so that validation reports its perplexity
    reports_perplexity: bool

    # sequences of data.seq_length slots in one sample of ``global_batch`` (DPO: chosen and rejected)
    sequences_per_sample: int


class PretrainTask:
    """Next-token prediction on megatron-core GPT datasets: the loop's own ``forward_loss``; for MoE
    models it also reports the routing statistics (``moe/*``) of the training micro-batches."""

    reports_perplexity = True
    sequences_per_sample = 1

    def __init__(self) -> None:
        self.moe_stats: Optional[MoEStats] = None
        self.moe_stats_window = TrainConfig.moe_stats_window  # setup: the run's train.moe_stats_window

    def check_data(self, config: Config) -> None:
        """Before any process group or model exists: every prefix is intact and every split that data.split
        asks for gets tokens from each (``build_data`` would refuse it only after the model and engine were built)."""
        from ..data.blend import check_splits

        check_splits(config.data)

    def setup(self, config: Config, start: Optional[tuple[Path, str]]) -> None:
        """Before the engine is built, with the (root, tag) of the checkpoint the run resumes from (None
        for a new run): DPO fixes its reference model here (a resume: the one recorded in that checkpoint);
        a MoE model's routing statistics take their window (``train.moe_stats_window``)."""
        self.moe_stats_window = config.train.moe_stats_window

    def checkpoint_meta(self) -> Optional[dict]:
        """What the task records in a checkpoint's meta file (DPO: the reference model it trains against)."""
        return None

    def build_data(self, config: Config, env: DistEnv, dp_rank: int, dp_size: int, consumed_samples: int, cache_dir: str,
                   step: int = 0, saved_split: int = 0):
        from .data import TrainData

        return TrainData(config, dp_rank, dp_size, consumed_samples, cache_dir, step, saved_split)

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def prepare(self, engine) -> None:
        """Once the engine exists, before the first step (DPO readies its reference model here)."""

    def forward_loss(self, engine, batch: dict):
        from .loop import forward_loss

        return forward_loss(engine, batch, self.routing_stats(engine))

    def routing_stats(self, engine) -> Optional[MoEStats]:
        """Where a training micro-batch's routing is recorded: None for a dense model and in validation."""
        config = engine.module.config
        if config.is_moe and self.moe_stats is None and engine.module.training:
            self.moe_stats = MoEStats(config.num_experts, self.moe_stats_window)
        return self.moe_stats if engine.module.training else None

    def end_step(self) -> None:
        """After every optimizer step's training micro-batches on every rank, whether or not the update
        is applied (their routing was counted): the step's expert counts enter the routing window."""
        if self.moe_stats is not None:
            self.moe_stats.end_step()

    def monitor_state(self, copies: int) -> Optional[dict]:
        """What the logged statistics accumulate over more than one step (the MoE routing window), summed
        over all ranks for the checkpoint (``copies``: ranks that see the same tokens, counted once); None
        when nothing does. A collective call."""
        return self.moe_stats.global_state(copies) if self.moe_stats is not None else None

    def restore_monitor_state(self, state: Optional[dict], config: Config, owner: bool, device: torch.device,
                              copies: int) -> None:
        """Continue ``monitor_state`` of the checkpoint a run resumes from (``owner``: one rank for all)."""
        if state is not None and config.model.is_moe:
            self.moe_stats = MoEStats(config.model.num_experts, config.train.moe_stats_window)
            self.moe_stats.load_global_state(state, owner, device, copies)

    def log_metrics(self, device: torch.device) -> dict[str, float]:
        """Scalars beyond the loop's own (averaged since the previous log point); a collective call.

        The routing statistics sum over all ranks: under sequence parallelism each tensor-parallel rank
        routes its own part of the sequences (the data-parallel group alone would count one part);
        without it they route the same tokens, which scales every count alike and leaves the ratios as they are."""
        if self.moe_stats is None:
            return {}
        return self.moe_stats.summary()

    def validation_metrics(self, device: torch.device) -> dict[str, float]:
        """Scalars beyond the validation loss, over the last validation; a collective call."""
        return {}
