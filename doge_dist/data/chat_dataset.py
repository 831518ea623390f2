"""Training samples from chat prefixes (data_tools/preprocess_chat.py): SFT sequences, packed or
padded, and DPO pairs; plus the epoch-wise shuffle that makes both resumable by consumed samples.

Labels are next-token targets: position t predicts token t+1, counted only where the loss mask of
token t+1 is 1 (assistant content and its eos), and never across two packed conversations.
Sequences are right-padded, so with causal attention no real token ever sees a pad; packed
conversations carry document ids, so none sees another conversation either.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from doge_dist.data.errors import DataError
from doge_dist.data.indexed import validate_prefix
from doge_dist.data.preprocess_chat import mask_prefix

IGNORE_INDEX = -100  # = doge_dist.model.IGNORE_INDEX (the data package does not import the model)


class MaskedSequences:
    """Token and loss-mask sequences of one or more chat prefixes, concatenated in order."""

    def __init__(self, prefixes: Sequence[str], pairs: bool, vocab_size: Optional[int] = None) -> None:
        """With ``vocab_size`` every token id is read and checked against it (before training)."""
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if not prefixes:
            raise DataError("No chat data prefixes given: set data.train_data to prefixes written by data_tools/preprocess_chat.py.")
        self.tokens, self.masks, lengths = [], [], []
        tool = f"data_tools/preprocess_chat.py --kind {'dpo' if pairs else 'sft'}"
        for prefix in map(str, prefixes):
            tokens_info = validate_prefix(prefix, vocab_size, scan_tokens=vocab_size is not None, tool=tool)
            mask_info = validate_prefix(mask_prefix(prefix), scan_tokens=False, tool=tool)
            if not np.array_equal(tokens_info.sequence_lengths, mask_info.sequence_lengths):
                raise DataError(f"'{prefix}' and its loss mask '{mask_prefix(prefix)}' have different sequence lengths; re-run data_tools/preprocess_chat.py.")
            tokens = IndexedDataset(prefix, mmap=True)
            per_document = np.diff(tokens.document_indices)
            if pairs and not np.all(per_document == 2):
                raise DataError(f"'{prefix}' is not preference data (each document must hold chosen and rejected); use data_tools/preprocess_chat.py --kind dpo.")
            if not pairs and not np.all(per_document == 1):
                raise DataError(f"'{prefix}' holds preference pairs, not conversations; use data_tools/preprocess_chat.py --kind sft.")
            self.tokens.append(tokens)
            self.masks.append(IndexedDataset(mask_prefix(prefix), mmap=True))
            lengths.append(tokens_info.sequence_lengths)
        self.lengths = np.concatenate(lengths)
        self._starts = np.cumsum([0] + [len(x) for x in lengths])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[part])
        return self.tokens[part][local].astype(np.int64), self.masks[part][local].astype(np.int64)


def lm_sample(pieces: Sequence[tuple[np.ndarray, np.ndarray]], documents: bool = False) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``position_ids`` of one or more (packed) sequences; with ``documents``
    also ``document_ids`` (the piece each token belongs to), so that attention stays within each
    packed conversation and it is scored as it would be alone in a padded row."""
    ids, labels, positions, pieces_of = [], [], [], []
    for number, (tokens, mask) in enumerate(pieces):
        target = np.where(mask[1:] > 0, tokens[1:], IGNORE_INDEX)
        ids.append(tokens)
        labels.append(np.append(target, IGNORE_INDEX))
        positions.append(np.arange(len(tokens)))
        pieces_of.append(np.full(len(tokens), number))
    names = (("input_ids", ids), ("labels", labels), ("position_ids", positions)) + ((("document_ids", pieces_of),) if documents else ())
    return {name: torch.from_numpy(np.concatenate(parts)) for name, parts in names}


def pack(lengths: np.ndarray, seq_length: int) -> list[list[int]]:
    """Whole sequences, in order, into bins of at most ``seq_length`` tokens (a longer one gets its own
    bin and is truncated). Next-fit: deterministic, and each bin is a run of consecutive indices."""
    bins: list[list[int]] = []
    used = seq_length
    for index, length in enumerate(lengths.tolist()):
        if used + length > seq_length:
            bins.append([])
            used = 0
        bins[-1].append(index)
        used += length
    return bins


class SFTDataset(Dataset):
    """One sample = one conversation (padded) or several whole conversations (``packing``)."""

    def __init__(self, sequences: MaskedSequences, seq_length: int, packing: bool) -> None:
        self.sequences, self.seq_length, self.packing = sequences, seq_length, packing
        self.samples = pack(sequences.lengths, seq_length) if packing else [[i] for i in range(len(sequences))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pieces = [self.sequences[i] for i in self.samples[index]]
        return {k: v[: self.seq_length] for k, v in lm_sample(pieces, documents=self.packing).items()}


class PreferenceDataset(Dataset):
    """One sample = one pair: chosen and rejected (prompt + completion, loss on the completion)."""

    def __init__(self, sequences: MaskedSequences, seq_length: int) -> None:
        self.sequences, self.seq_length = sequences, seq_length

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def __getitem__(self, index: int) -> dict:
        chosen, rejected = (lm_sample([self.sequences[2 * index + k]]) for k in (0, 1))
        trim = lambda sample: {k: v[: self.seq_length] for k, v in sample.items()}  # noqa: E731
        return {"chosen": trim(chosen), "rejected": trim(rejected), "index": index}


def pairs_without_loss(sequences: MaskedSequences, seq_length: int) -> int:
    """Pairs that train nothing when cut to ``seq_length`` tokens: a chosen or rejected completion
    wholly beyond it (a prompt as long as the sequence), or chosen and rejected identical within it
    (they differ only later). Such a pair has reward margin 0 and is never accurate."""
    def without_loss(pair: int) -> bool:
        (chosen, chosen_mask), (rejected, rejected_mask) = sequences[2 * pair], sequences[2 * pair + 1]
        targets = slice(1, seq_length + 1)  # positions 0 .. seq_length - 1 predict tokens 1 .. seq_length
        if not (chosen_mask[targets].any() and rejected_mask[targets].any()):
            return True
        return np.array_equal(chosen[: seq_length + 1], rejected[: seq_length + 1])

    return sum(without_loss(pair) for pair in range(len(sequences) // 2))


def conversations_without_loss(sequences: MaskedSequences, seq_length: int) -> int:
    """Conversations whose assistant tokens lie wholly beyond ``seq_length`` tokens: cut there, they
    carry no loss (a micro-batch of only such conversations would report loss 0)."""
    longer = np.flatnonzero(sequences.lengths > seq_length)
    return sum(not sequences[int(index)][1][1 : seq_length + 1].any() for index in longer)


def collate_lm(samples: list[dict[str, torch.Tensor]], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample of the micro-batch, rounded up to ``multiple`` (sequence
    parallelism splits the sequence over the tensor-parallel ranks), labels with IGNORE_INDEX, packed
    rows' ``document_ids`` with -1 (the padding is a document of its own); ``token_mask`` marks the real
    tokens (the MoE balance loss leaves the padding out, as transformers does)."""
    length = -(-max(len(s["input_ids"]) for s in samples) // multiple) * multiple
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": 0}
    if "document_ids" in samples[0]:
        fill["document_ids"] = -1
    batch = {key: torch.stack([torch.nn.functional.pad(s[key], (0, length - len(s[key])), value=value) for s in samples])
             for key, value in fill.items()}
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    batch["token_mask"] = (torch.arange(length)[None] < lengths[:, None]).long()
    return batch


def collate_pairs(samples: list[dict], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """One [2B, T] batch: the B chosen sequences, then the B rejected ones; ``index`` [B] of the pairs."""
    batch = collate_lm([s["chosen"] for s in samples] + [s["rejected"] for s in samples], pad_id, multiple)
    batch["index"] = torch.tensor([s["index"] for s in samples])
    return batch


def scoring_nothing(sample: dict) -> dict:
    """A copy of ``sample`` that adds nothing to a validation: every label IGNORE_INDEX (no token
    scored) and, for a pair, ``index`` -1 (DPO weighs such a pair 0). It fills up a rank's last
    validation micro-batch, so that every rank runs as many forwards."""
    return {key: scoring_nothing(value) if isinstance(value, dict)
            else torch.full_like(value, IGNORE_INDEX) if key == "labels"
            else -1 if key == "index" else value
            for key, value in sample.items()}


class EpochShuffled(Dataset):
    """``total`` samples drawn epoch after epoch, each epoch a fresh seeded permutation of ``dataset``:
    sample k depends on k and the seed only, so a run resumes at any consumed-sample count."""

    def __init__(self, dataset: Dataset, total: int, seed: int) -> None:
        self.dataset, self.total, self.seed = dataset, total, seed
        self._epoch: Optional[int] = None
        self._order: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, k: int):
        epoch, position = divmod(k, len(self.dataset))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return self.dataset[int(self._order[position])]
