"""Train/valid/test datasets from a weighted blend of prefixes, with megatron-core's builders.

``build_datasets`` is megatron-core's ``BlendedMegatronDatasetBuilder`` + ``GPTDataset`` configured
from ``DataConfig``. What it adds: every prefix is validated first (on rank 0, the verdict broadcast
so all ranks fail alike), a split that would get no tokens is an error (megatron-core's GPTDataset
would loop forever), and config mistakes become ``DataError``s instead of asserts.

Index caches: with torch.distributed initialized, megatron-core builds each dataset on rank 0
first, then ``barrier()``, then the other ranks build it and hit the cache
(``BlendedMegatronDatasetBuilder.build_generic_dataset``); inside GPTDataset/BlendedDataset only
rank 0 writes .npy files. So the cache is written once and never raced (tests/test_data_blend.py
checks this with two gloo ranks). Rank 0 first removes cache files cut short by an interrupted run,
and those not built from the prefixes' files as they are now (``index_caches_of``).
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from doge_dist.config import DataConfig
from doge_dist.data.errors import DataError
from doge_dist.data.indexed import file_stamp, token_count, validate_prefix
from doge_dist.data.tokenizer import Tokenizer
from doge_dist.parallel.rank0 import check_on_rank0

Blend = tuple[list[str], Optional[list[float]]]
SPLIT_FIXES = {  # what else helps a split of data.split that gets no tokens
    "train": 'a larger share of data.split for it, such as "969,30,1"',
    "valid": 'a larger share of data.split for it, such as "90,10,0", or a separate data.valid_data',
    "test": 'a data.split that gives the test split none, such as "99,1,0"',
}


def parse_blend(entries: Sequence, where: str = "data.train_data") -> Optional[Blend]:
    """``[w1, p1, w2, p2, ...]`` or ``[p1, p2, ...]`` -> (prefixes, weights or None), as Megatron's --data-path."""
    from megatron.core.datasets.utils import get_blend_from_list

    if isinstance(entries, str):  # one prefix (DataConfig normalizes this too; a field assigned later does not)
        entries = [entries]
    if not entries:
        return None
    entries = [str(entry) for entry in entries]
    numbers = [_is_number(entry) for entry in entries]
    weighted = len(entries) % 2 == 0 and all(numbers[0::2]) and not any(numbers[1::2])
    if any(numbers) and not weighted:
        raise DataError(
            f"{where} = {entries} mixes weights and prefixes; write [weight, prefix, weight, prefix, ...] "
            "or only prefixes."
        )
    prefixes, weights = get_blend_from_list(entries)
    if weights is not None and not all(0 < w < math.inf for w in weights):  # megatron-core asserts weights > 0
        raise DataError(f"{where} weights {weights} must be finite and positive: leave a prefix out of the blend "
                        "rather than give it weight 0.")
    return list(prefixes), weights


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def split_weights(split) -> list[float]:
    """The train, valid, test weights of data.split: 1-3 comma-separated non-negative numbers, not all
    zero ("969,30,1"; "100" is all train); absent trailing weights are 0."""
    parts = split.split(",") if isinstance(split, str) else []
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\s*\d+(\.\d*)?\s*", p) for p in parts) or not any(
        float(p) > 0 for p in parts
    ):
        raise DataError(f"data.split = {split!r}: write train,valid,test weights such as \"969,30,1\".")
    return [float(p) for p in parts] + [0.0] * (3 - len(parts))


def _check_data(splits: list[Optional[Blend]], split_matrix: list, vocab_size: Optional[int],
                scans: Optional[Path] = None) -> None:
    """Every prefix is intact and every requested split gets tokens from every prefix of its blend;
    with ``vocab_size``, every token id is within it (a scan of all the tokens, remembered in ``scans``).

    megatron-core's GPTDataset loops forever when a split it must sample from has no tokens (a small
    dataset with split "969,30,1" gives the test split no document), so that is an error here.
    """
    infos = {}
    for blend in splits:
        for prefix in blend[0] if blend else []:
            if prefix not in infos:
                infos[prefix] = validate_prefix(prefix, vocab_size, scan_tokens=vocab_size is not None, scans=scans)
    for name, blend, bookends in zip(SPLIT_FIXES, splits, split_matrix):
        if blend is None or bookends is None:
            continue
        for prefix in blend[0]:
            info = infos[prefix]
            begin, end = (int(round(edge * info.sequences)) for edge in bookends)
            if info.sequence_lengths[begin:end].sum() == 0:
                raise DataError(
                    f"The {name} split gets no tokens from '{prefix}' ({info.documents} documents, "
                    f"split bookends {bookends}): use more data, or {SPLIT_FIXES[name]}."
                )


def check_splits(config: DataConfig) -> None:
    """``_check_data`` without the token scan, for launch/pretrain.py before any model is built (the ids
    are scanned by ``build_datasets``, on rank 0)."""
    _check_data(*split_plan(config), vocab_size=None)


TOKEN_SCANS = "largest_token_ids.json"  # in the data cache: indexed.largest_token


def check_data(splits: list[Optional[Blend]], split_matrix: list, vocab_size: int, scans: Optional[Path] = None) -> None:
    """``_check_data`` on rank 0 only when distributed; every rank raises the same DataError."""
    check_on_rank0(lambda: _check_data(splits, split_matrix, vocab_size, scans), DataError)


@contextlib.contextmanager
def _process_group_for_megatron() -> Iterator[None]:
    """A throwaway 1-rank gloo group when none exists.

    megatron-core's BlendedDataset calls ``torch.distributed.get_rank()`` on a cache miss even in a
    single process (Megatron-LM always initializes one); this lets tools and tests build blends.
    """
    if torch.distributed.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as scratch:
        store = torch.distributed.FileStore(os.path.join(scratch, "store"), 1)
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            torch.distributed.destroy_process_group()


def parse_blends(config) -> tuple:
    """(train blend, valid blend or None) of a DataConfig, checking that there is training data and,
    without a separate validation blend, a usable split string."""
    train = parse_blend(config.train_data, "data.train_data")
    if train is None:
        raise DataError("data.train_data is empty: list prefixes written by data_tools/preprocess_data.py.")
    valid = parse_blend(config.valid_data, "data.valid_data")
    if valid is None and split_weights(config.split)[0] == 0:
        raise DataError(f"data.split = {config.split!r} gives the training split no weight: megatron-core would build no "
                        "training dataset. Give train the first weight, such as \"969,30,1\".")
    return train, valid


def split_plan(config: DataConfig) -> tuple[list[Optional[Blend]], list]:
    """The blend and the bookends (fractions of each prefix's documents) of the train, valid and test
    splits, as ``build_datasets`` has megatron-core cut them: with ``data.valid_data``, train reads all of
    train_data and valid all of valid_data (no test split); otherwise ``data.split`` cuts every prefix."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    train, valid = parse_blends(config)
    if valid:
        return [train, valid, None], [(0.0, 1.0), (0.0, 1.0), None]
    return [train] * 3, convert_split_vector_to_split_matrix(parse_and_normalize_split(config.split))


def build_datasets(
    config: DataConfig,
    tokenizer: Tokenizer,
    num_samples: Sequence[Optional[int]],
    cache_dir: Optional[str] = None,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple:
    """Build (train, valid, test) megatron-core datasets; an absent split is None.

    ``num_samples``: samples per split (train iters x global batch, ...); None means one epoch,
    which a weighted blend does not allow. ``cache_dir`` (else ``config.cache_dir``, else
    ``data_cache`` beside the first prefix) holds the shuffle/sample indices. With
    ``config.valid_data`` set, train uses all of ``train_data`` and valid all of ``valid_data``
    (no split, no test set). A list of several prefixes without weights is weighted by their sizes
    (``size_weighted``). Samples are dicts of tokens, labels, loss_mask, position_ids.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    train, valid = parse_blends(config)
    if config.seq_length < 1:
        raise DataError(f"data.seq_length must be positive, got {config.seq_length}.")
    cache = cache_dir or config.cache_dir or os.path.join(os.path.dirname(train[0][0]) or ".", "data_cache")
    sizes = list(num_samples) + [None] * (3 - len(num_samples))
    splits, split_matrix = split_plan(config)
    for blend, bookends, size in zip(splits, split_matrix, sizes):
        if blend and bookends and blend[1] is not None and size is None:
            raise DataError(f"A weighted blend needs a sample count for every split; got num_samples={list(num_samples)}.")
    check_data(splits, split_matrix, tokenizer.vocab_size, Path(cache) / TOKEN_SCANS)
    if valid:
        train, valid = size_weighted(train, sizes[:1]), size_weighted(valid, sizes[1:2])
    else:
        train = size_weighted(train, [size for size, bookends in zip(sizes, split_matrix) if bookends])
    gpt_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        blend=None if valid else train,
        blend_per_split=[train, valid, None] if valid else None,
        split=None if valid else config.split,
        path_to_cache=cache,
        tokenizer=tokenizer.megatron,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=config.reset_attention_mask,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank, gpt_config)
    prefixes = sorted({prefix for blend in splits if blend for prefix in blend[0]})
    with _process_group_for_megatron():
        if torch.distributed.get_rank() != 0:
            return tuple(builder.build())
        with index_caches_of(cache, prefixes):  # the rank that writes the cache, before any rank reads it
            return tuple(builder.build())


def size_weighted(blend: Blend, sizes: Sequence[Optional[int]]) -> Blend:
    """Several prefixes without weights, weighted by their token counts, when every split they serve
    has a sample count (None asks for one epoch, which only an unweighted blend gives).

    megatron-core (so Megatron-LM) samples such a list in proportion to the prefixes' sizes but builds
    one epoch only (the blend's length is capped at the sum of the datasets'): a run that needed more
    ran out of data before the end (before the learning-rate decay), and a prefix holding less than
    one sample failed its assert. Weights in those proportions (tokens, as its samples per epoch)
    give every prefix as many epochs as the run needs, as a single prefix or a weighted blend gets.
    """
    prefixes, weights = blend
    if weights is not None or len(prefixes) == 1 or None in sizes:
        return blend
    return prefixes, [float(token_count(prefix)) for prefix in prefixes]


CACHE_STAMPS = "prefix_stamps.json"  # beside each index cache set's description: the files it was built from


@contextlib.contextmanager
def index_caches_of(cache: str, prefixes: Sequence[str]) -> Iterator[None]:
    """Around megatron-core's build on the rank that writes the cache: index caches of ``prefixes``
    that were not built from their current files are removed first (megatron-core would build them
    again), and the sets built inside are stamped with the files they were built from.

    megatron-core names a cache set by a hash of its description (the prefix path, the seed, the
    split, the sample count ...), not of the files' contents: preprocessing to the same prefix again
    and training with the same data cache read the old document/sample indices against the new files
    (an IndexError, or other tokens than the run's data without a word). The stamp is each .bin and
    .idx file's ``file_stamp`` (size and modification time), as for the token scan. Sets cut short
    by an interrupted run are removed too (``remove_cut_short_caches``).
    """
    current = {prefix: [list(file_stamp(Path(prefix + suffix))) for suffix in (".bin", ".idx")] for prefix in prefixes}
    remove_cut_short_caches(cache)
    stale: set[str] = set()
    for description, arrays in _index_caches(cache):
        described = _described_prefixes(description)
        if described and set(described) <= current.keys() and _stamps_of(description) != _pick(current, described):
            _remove_index_cache(description, arrays)
            stale.update(described)
    if stale:
        warnings.warn(f"Rebuilding the index cache of {', '.join(sorted(stale))} in '{cache}': it was not built "
                      "from these files as they are now (written again since, or the cache predates this check).", stacklevel=3)
    yield
    for description, _ in _index_caches(cache):
        described = _described_prefixes(description)
        stamps = Path(description[: -len("description.txt")] + CACHE_STAMPS)
        if described and set(described) <= current.keys() and not stamps.exists():
            partial = stamps.with_name(stamps.name + f".{os.getpid()}.partial")
            partial.write_text(json.dumps(_pick(current, described), indent=1))
            os.replace(partial, stamps)


def _pick(stamps: dict, prefixes: Sequence[str]) -> dict:
    return {prefix: stamps[prefix] for prefix in prefixes}


def _index_caches(cache: str) -> Iterator[tuple[str, list[str]]]:
    """megatron-core's index cache sets in ``cache``: each a description
    (``<hash>-<class>-<split>-description.txt``) with its ``<hash>-<class>-<split>-*.npy`` arrays."""
    for description in glob.glob(os.path.join(glob.escape(cache), "*-description.txt")):
        yield description, glob.glob(glob.escape(description[: -len("description.txt")]) + "*.npy")


def _described_prefixes(description: str) -> list[str]:
    """The prefixes (``dataset_path``) a cache set was built from: a GPTDataset's own, every one of a
    BlendedDataset's datasets; none when the description cannot be read."""
    def paths(node) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("dataset_path"), str):
                yield node["dataset_path"]
            node = list(node.values())
        for child in node if isinstance(node, list) else []:
            yield from paths(child)

    try:
        return sorted(set(paths(json.loads(Path(description).read_text()))))
    except (OSError, ValueError):
        return []


def _stamps_of(description: str) -> Optional[dict]:
    try:
        return json.loads(Path(description[: -len("description.txt")] + CACHE_STAMPS).read_text())
    except (OSError, ValueError):  # none (built before stamps were written, or cut short): not known to match
        return None


def _remove_index_cache(description: str, arrays: Sequence[str]) -> None:
    for path in (description, *arrays, description[: -len("description.txt")] + CACHE_STAMPS):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_cut_short_caches(cache: str) -> None:
    """megatron-core writes each index cache in place (a description, then .npy files) and loads any set
    whose files exist: a file cut short by a kill or a full disk failed every later run of the data
    with "mmap length is greater than file size". Such a set is removed, so megatron-core builds it again."""
    import numpy as np

    for description, arrays in _index_caches(cache):
        try:
            for array in arrays:
                np.load(array, mmap_mode="r", allow_pickle=True)
        except (ValueError, OSError, EOFError):
            _remove_index_cache(description, arrays)
