"""Batches keyed by consumed samples: resume anywhere, also with a different data-parallel size.

Written by hand after Megatron-LM's ``MegatronPretrainingSampler`` (megatron/training/datasets/
data_samplers.py, not part of megatron-core): the datasets are already shuffled by megatron-core,
so the global sample order is simply 0, 1, 2, ...; each step takes the next
``micro_batch_size * dp_size`` indices and rank r gets the r-th slice. The position is the single
number ``consumed_samples`` (global), so a checkpoint from DP 2 resumes at DP 1 or 4 on exactly the
sample the interrupted run would have read next.
"""
from __future__ import annotations

import signal
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset


class ResumableSampler:
    """A batch sampler for ``DataLoader(batch_sampler=...)``; yields lists of ``micro_batch_size`` indices.

    The last incomplete global batch is dropped so that every rank takes the same number of steps.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples} (is the dataset empty?).")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples = {consumed_samples} is outside the dataset of {total_samples} samples; "
                "the checkpoint belongs to a longer run or another data config."
            )
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"Need micro_batch_size > 0 and 0 <= dp_rank < dp_size, got {micro_batch_size}, {dp_rank}, {dp_size}.")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def global_micro_batch(self) -> int:
        """Samples consumed by all ranks together per micro-step."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        offset = self.dp_rank * self.micro_batch_size
        for step in range(len(self)):
            first = self.consumed_samples + step * self.global_micro_batch + offset
            yield list(range(first, first + self.micro_batch_size))


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into ``input_ids``/``labels`` [B, T] (labels already shifted), loss_mask, position_ids."""
    return {
        "input_ids": torch.stack([s["tokens"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]),
        "position_ids": torch.stack([s["position_ids"] for s in samples]),
    }


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """``worker_init_fn`` of the trainer's DataLoaders: a worker ignores SIGTERM and SIGUSR1. Slurm
    signals every process of a job step (and ``kill -TERM -- -<pid>`` a process group), workers
    included; by default the signal ends a worker and torch then fails the trainer mid-step, before the
    checkpoint its stop handler would save. The workers end with the trainer as they always do."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_dataloader(
    dataset: Optional[Dataset], consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int = 0
) -> Optional[DataLoader]:
    """A DataLoader over ``dataset`` starting after ``consumed_samples`` (global); None for an absent split."""
    if dataset is None:
        return None
    sampler = ResumableSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        worker_init_fn=leave_stop_signals_to_the_trainer,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
