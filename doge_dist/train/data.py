"""The trainer's view of the data pipeline (doge_dist.data): this rank's micro-batches per step,
and a fixed validation set.

Sample counts follow Megatron-LM: the training split is sized max_steps x global batch, so the
megatron-core shuffle is a function of the config alone and a resumed run with the same global batch
(any dp size) sees the same global order; the ``ResumableSampler`` position is the global
``consumed_samples``. A resume at a smaller global batch (or fewer train.max_steps) keeps the
checkpoint's split and so its order; one that needs more samples gets them (``split_samples``).
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import Config, TrainConfig
from ..data import load_tokenizer
from ..data.blend import build_datasets
from ..data.sampler import build_dataloader
from ..model import IGNORE_INDEX


def split_samples(train: TrainConfig, global_batch: int, consumed_samples: int, step: int, saved_split: int = 0) -> int:
    """Samples the training split is sized for: train.max_steps x global batch (Megatron-LM's count, on
    which the shuffle depends), or more on a resume whose checkpoint took more samples per step (it ran
    on more data-parallel ranks): its ``consumed_samples`` lie beyond ``step`` x global batch, and the
    remaining train.max_steps - ``step`` steps still need a global batch each after them. Such a
    checkpoint's own split (``saved_split``, larger) is kept, so that the resume reads on in its order
    (another size is another number of epochs, another shuffle)."""
    return max(train.max_steps * global_batch, consumed_samples + (train.max_steps - step) * global_batch, saved_split)


class TrainData:
    def __init__(self, config: Config, dp_rank: int, dp_size: int, consumed_samples: int, cache_dir: str,
                 step: int = 0, saved_split: int = 0) -> None:
        """This rank's data of a run at ``step`` (a resume's; 0 for a new run) after ``consumed_samples``;
        ``saved_split``: the resumed checkpoint's ``split_samples``."""
        train = config.train
        self.micro_batches_per_step = train.gradient_accumulation_steps
        self.global_batch = train.micro_batch_size * train.gradient_accumulation_steps * dp_size
        self.split_samples = split_samples(train, self.global_batch, consumed_samples, step, saved_split)
        eval_samples = max(1, train.eval_iters) * self.global_batch
        tokenizer = load_tokenizer(config.data.tokenizer)
        train_set, valid_set, _ = build_datasets(
            config.data, tokenizer, [self.split_samples, eval_samples, eval_samples], cache_dir=cache_dir
        )
        self.reset_position_ids = config.data.reset_position_ids
        self.eod = tokenizer.eod_id if config.data.reset_attention_mask else None
        self.train_samples = len(train_set)
        self.train_set = train_set
        loader = build_dataloader(train_set, consumed_samples, train.micro_batch_size, dp_rank, dp_size, config.data.num_workers)
        self._train: Iterator[dict] = iter(loader)
        self._valid = None
        if valid_set is not None and train.eval_interval > 0:
            rounds = validation_rounds(train, len(valid_set), dp_size)
            valid_loader = build_dataloader(valid_set, 0, train.micro_batch_size, dp_rank, dp_size)
            with torch.random.fork_rng(devices=[]):  # the iterator draws its seed from the CPU generator, which
                # the training's dropout masks come from: a run that validates would draw them all shifted
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


def order_fingerprint(train_set: Dataset, consumed_samples: int) -> str:
    """A digest of the first and the last sample a run consumed (positions 0 and consumed - 1 of the
    global order). A resume compares it with the checkpoint's: megatron-core shuffles over as many
    epochs as train.max_steps needs, so extending a run past an epoch boundary, or another blend,
    split, seq_length, seed or tokenizer, puts other sequences at the same positions, and
    ``consumed_samples`` would then skip some and repeat others."""
    digest = hashlib.sha256()
    for index in sorted({0, max(0, consumed_samples - 1)}):
        _digest_update(digest, train_set[index])
    return digest.hexdigest()[:16]


# What places a sample in the order: its token ids (GPT datasets: tokens; chat data: input_ids) and, in
# a blend, the dataset it comes from. Not its loss mask, positions or labels: data.reset_position_ids or
# data.eod_mask_loss turned on at a resume change those, not which sequences come where.
ORDER_FIELDS = ("tokens", "input_ids", "dataset_id")


def _digest_update(digest, sample: dict) -> None:
    """Feed the ``ORDER_FIELDS`` of a sample into ``digest``, also those of nested samples (a DPO pair's
    chosen and rejected)."""
    for key in sorted(sample):
        value = sample[key]
        if isinstance(value, dict):
            digest.update(str(key).encode())
            _digest_update(digest, value)
        elif key in ORDER_FIELDS:
            digest.update(str(key).encode())
            digest.update(np.ascontiguousarray(np.asarray(value)).tobytes())


ORDER_KEYS = ("train_data", "valid_data", "split", "seq_length", "seed", "tokenizer")  # data.* that set the sample order


def data_order(config: Config, data, consumed_samples: int) -> dict:
    """What fixed the global sample order a checkpoint's ``consumed_samples`` counts in: the data keys,
    the number of samples the shuffle was sized for, and a digest of the samples (data.order_fingerprint)."""
    return {"fingerprint": order_fingerprint(data.train_set, consumed_samples),
            "train_samples": data.split_samples,
            "data": {key: getattr(config.data, key) for key in ORDER_KEYS}}


def warn_if_data_order_changed(saved: dict, current: dict, consumed_samples: int) -> None:
    """A resume continues at ``consumed_samples`` of its own sample order; when that order is not the
    checkpoint's (another blend, seq_length..., or a train.max_steps that changes the number of epochs
    megatron-core shuffles over), say what changed: the run would repeat some sequences and skip others."""
    before = saved.get("data_order")
    if not before or before["fingerprint"] == current["fingerprint"]:
        return
    changed = [f"data.{key} {before['data'].get(key)!r} -> {current['data'][key]!r}"
               for key in ORDER_KEYS if before["data"].get(key) != current["data"][key]]
    if before["train_samples"] != current["train_samples"]:
        changed.append(f"train.max_steps x global batch {before['train_samples']} -> {current['train_samples']} samples "
                       "(megatron-core shuffles over as many epochs as they need: another number of epochs is another order)")
    warnings.warn(f"The training data is not in the order the checkpoint's run read it ({'; '.join(changed) or 'the data files changed'}): "
                  f"this run goes on at sample {consumed_samples} of another order, so some sequences come again and others "
                  "are never read. Resume with the checkpoint's settings to continue its order exactly (a longer run: set "
                  "train.max_steps to its final value from the start, as with Megatron's --train-iters); for a deliberate "
                  "change of data this is expected.")


def validation_rounds(train: TrainConfig, valid_samples: int, dp_size: int) -> int:
    """Pretraining's validation micro-batches per rank: ``train.eval_iters`` global batches, as Megatron-LM
    counts them, so that every layout of the same global batch (2 ranks, or 1 with twice the accumulation)
    scores the same sequences (megatron-core sizes the validation split to them, wrapping a smaller one;
    SFT/DPO score a smaller held-out set whole: ``finetune.validation_batches``)."""
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
