"""The trainer's view of the data pipeline (doge_dist.data): this rank's micro-batches per step,
and a fixed validation set.

Sample counts follow Megatron-LM: the training split is sized max_steps x global batch, so the
megatron-core shuffle is a function of the config alone and a resumed run (any dp size) sees the same
global order; the ``ResumableSampler`` position is the global ``consumed_samples``.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..config import Config, TrainConfig
from ..data import load_tokenizer
from ..data.blend import build_datasets
from ..data.sampler import build_dataloader
from ..model import IGNORE_INDEX


class TrainData:
    def __init__(self, config: Config, dp_rank: int, dp_size: int, consumed_samples: int, cache_dir: str) -> None:
        train = config.train
        self.micro_batches_per_step = train.gradient_accumulation_steps
        self.global_batch = train.micro_batch_size * train.gradient_accumulation_steps * dp_size
        eval_samples = max(1, train.eval_iters) * self.global_batch
        tokenizer = load_tokenizer(config.data.tokenizer)
        train_set, valid_set, _ = build_datasets(
            config.data, tokenizer, [train.max_steps * self.global_batch, eval_samples, eval_samples], cache_dir=cache_dir
        )
        self.reset_position_ids = config.data.reset_position_ids
        self.eod = tokenizer.eod_id if config.data.reset_attention_mask else None
        self.train_samples = len(train_set)
        loader = build_dataloader(train_set, consumed_samples, train.micro_batch_size, dp_rank, dp_size, config.data.num_workers)
        self._train: Iterator[dict] = iter(loader)
        self._valid = None
        if valid_set is not None and train.eval_interval > 0:
            rounds = validation_rounds(train, len(valid_set), dp_size)
            valid_loader = build_dataloader(valid_set, 0, train.micro_batch_size, dp_rank, dp_size)
            self._valid = [batch for _, batch in zip(range(rounds), valid_loader)]

    def next_step(self) -> Optional[list[dict]]:
        """This rank's micro-batches for one optimizer step, or None when the data is exhausted."""
        batches = []
        for _ in range(self.micro_batches_per_step):
            batch = next(self._train, None)
            if batch is None:
                return None
            batches.append(self._prepare(batch))
        return batches

    def validation_batches(self) -> list[dict]:
        return [self._prepare(batch) for batch in self._valid or []]

    def _prepare(self, batch: dict) -> dict:
        """``input_ids``, ``labels`` (IGNORE_INDEX where the loss mask is 0) and optional
        ``position_ids`` and ``document_ids``."""
        labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, IGNORE_INDEX)
        prepared = {"input_ids": batch["input_ids"], "labels": labels}
        if self.reset_position_ids:
            prepared["position_ids"] = batch["position_ids"]
        if self.eod is not None:
            prepared["document_ids"] = document_ids(batch["input_ids"], self.eod)
        return prepared


def validation_rounds(train: TrainConfig, valid_samples: int, dp_size: int) -> int:
    """Validation micro-batches per rank: ``train.eval_iters`` global batches, as Megatron-LM counts
    them, so that every layout of the same global batch (2 ranks, or 1 with twice the accumulation)
    scores the same sequences; fewer when the validation set is smaller (whole rounds of all ranks)."""
    return min(train.eval_iters * train.gradient_accumulation_steps, valid_samples // (train.micro_batch_size * dp_size))


def document_ids(input_ids: torch.Tensor, eod: int) -> torch.Tensor:
    """[B, T] document number of each token, as Megatron's ``reset_attention_mask`` splits a row: a
    document ends with its end-of-document token, and the tokens after it start the next one. (The
    GPT dataset can build the [T, T] mask itself; the model takes these ids instead and builds the
    mask once per batch, or a block mask on CUDA.)"""
    eod_tokens = (input_ids == eod).long()
    return eod_tokens.cumsum(-1) - eod_tokens


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
