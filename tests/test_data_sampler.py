"""ResumableSampler: the global sample order survives a restart, also when the data-parallel size changes."""
from __future__ import annotations

import pytest
import torch
from data_helpers import assets, tokenizer

from doge_dist.config import DataConfig
from doge_dist.data import ResumableSampler, build_dataloader, build_datasets

TOTAL, MICRO = 103, 3


def global_order(consumed: int, steps: int, dp_size: int) -> list[int]:
    """Indices read by all ranks together, step by step, rank by rank, starting after ``consumed``."""
    iterators = [iter(ResumableSampler(TOTAL, consumed, MICRO, rank, dp_size)) for rank in range(dp_size)]
    order: list[int] = []
    for _ in range(steps):
        for it in iterators:
            order += next(it)
    return order


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1), (2, 4)])
def test_resume_with_another_dp_size_continues_the_sequence(before: int, after: int) -> None:
    uninterrupted = global_order(0, 24, 1)
    first = global_order(0, 4 // before, before)  # 4 micro-batches of work, then a checkpoint
    second = global_order(len(first), 8 // after, after)  # resume from consumed_samples alone
    assert first + second == uninterrupted[: len(first) + len(second)]


def test_each_rank_gets_its_slice_and_incomplete_batches_drop() -> None:
    samplers = [ResumableSampler(TOTAL, 0, MICRO, rank, 2) for rank in range(2)]
    assert [len(s) for s in samplers] == [TOTAL // (MICRO * 2)] * 2
    assert next(iter(samplers[0])) == [0, 1, 2] and next(iter(samplers[1])) == [3, 4, 5]
    assert max(max(b) for b in samplers[1]) < TOTAL


def test_bad_positions() -> None:
    with pytest.raises(ValueError, match="outside the dataset"):
        ResumableSampler(TOTAL, TOTAL + 1, MICRO, 0, 1)
    with pytest.raises(ValueError, match="dp_rank"):
        ResumableSampler(TOTAL, 0, MICRO, 2, 2)


def test_dataloader_resumes_identical_token_batches(tmp_path) -> None:
    config = DataConfig(train_data=[assets().train_prefix], seq_length=16, split="90,10,0", cache_dir=str(tmp_path))
    train, _, _ = build_datasets(config, tokenizer(), [96, 8, 0])

    def tokens(consumed: int, dp_size: int, steps: int) -> list[torch.Tensor]:
        loaders = [iter(build_dataloader(train, consumed, 2, rank, dp_size)) for rank in range(dp_size)]
        rows = []
        for _ in range(steps):
            for loader in loaders:
                batch = next(loader)
                assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
                rows += list(batch["input_ids"])
        return rows

    reference = tokens(0, 1, 8)
    resumed = tokens(0, 2, 2) + tokens(8, 1, 4)  # 2 steps at DP 2, then DP 1 from consumed_samples=8
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed)) and len(resumed) == len(reference)
