"""build_datasets: weighted blends, splits, and index caches built once by rank 0 (two gloo ranks)."""
from __future__ import annotations

import logging
import os
import socket
import warnings

import numpy as np
import torch
import torch.multiprocessing as mp
from data_helpers import assets, quiet, tokenizer, write_jsonl

from doge_dist.config import DataConfig
from doge_dist.data import build_datasets, preprocess, validate_prefix

SEQ = 32


def second_prefix(tmp_path) -> str:
    """A dataset whose samples are recognisably different: the same word over and over."""
    path = write_jsonl(tmp_path / "other.jsonl", [{"text": "zebra " * 200} for _ in range(40)])
    preprocess(path, str(tmp_path / "other"), str(assets().tokenizer_model), append_eod=True, log=quiet)
    return str(tmp_path / "other_text_document")


def test_blend_proportions_follow_the_weights(tmp_path) -> None:
    other = second_prefix(tmp_path)
    config = DataConfig(train_data=[0.3, assets().train_prefix, 0.7, other], seq_length=SEQ, split="98,2,0",
                        cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_datasets(config, tokenizer(), [2000, 200, 0])
    assert (len(train), len(valid), test) == (2000, 200, None)
    share = np.bincount(np.asarray(train.dataset_index), minlength=2) / len(train)
    assert abs(share[1] - 0.7) < 0.01
    zebra = set(tokenizer().encode("zebra " * 200)) | {tokenizer().eod_id}
    from_other = [set(train[i]["tokens"].tolist()) <= zebra for i in range(300)]
    assert abs(np.mean(from_other) - 0.7) < 0.1  # the samples themselves, not only the index
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,) and torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_zero_length_documents_change_no_sample(tmp_path) -> None:
    """preprocess_data.py writes an empty field as a zero-length document (as Megatron-LM); megatron-core's
    GPTDataset samples sequences, so a prefix with them splits, blends and samples exactly like one without."""
    texts = assets().texts("valid")
    records = [{"text": text if number % 3 else ""} for number, text in enumerate(texts)]
    prefixes = {}
    for name, kept in (("with", records), ("without", [r for r in records if r["text"]])):
        path = write_jsonl(tmp_path / f"{name}.jsonl", kept)
        preprocess(path, str(tmp_path / name), str(assets().tokenizer_model), append_eod=True, log=quiet)
        prefixes[name] = str(tmp_path / f"{name}_text_document")
    zero_length = validate_prefix(prefixes["with"])
    assert zero_length.documents == len(records) > zero_length.sequences == len(records) - len(records[::3])
    samples = {}
    for name, prefix in prefixes.items():
        config = DataConfig(train_data=[0.5, prefix, 0.5, assets().train_prefix], seq_length=SEQ, split="90,10,0",
                            cache_dir=str(tmp_path / f"cache_{name}"))
        train, valid, _ = build_datasets(config, tokenizer(), [200, 20, 0])
        samples[name] = [split[i]["tokens"] for split in (train, valid) for i in range(len(split))]
    assert len(samples["with"]) == 220
    assert all(torch.equal(a, b) for a, b in zip(samples["with"], samples["without"], strict=True))


def test_separate_validation_blend_and_cache_reuse(tmp_path) -> None:
    other = second_prefix(tmp_path)
    config = DataConfig(train_data=[assets().train_prefix], valid_data=[other], seq_length=SEQ,
                        cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_datasets(config, tokenizer(), [100, 10, None])
    assert test is None and len(train) >= 100 and len(valid) >= 10
    files = sorted(os.listdir(tmp_path / "cache"))
    again, _, _ = build_datasets(config, tokenizer(), [100, 10, None])
    assert sorted(os.listdir(tmp_path / "cache")) == files  # cache hit, nothing new written
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(5))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _rank(rank: int, port: int, cache: str, prefix: str, model: str, out: str) -> None:
    from doge_dist.data import load_tokenizer

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    collect = _Collect()
    logger = logging.getLogger("megatron.core.datasets")
    logger.setLevel(logging.INFO)
    logger.addHandler(collect)
    config = DataConfig(train_data=[0.5, prefix, 0.5, prefix], seq_length=SEQ, split="90,10,0", cache_dir=cache)
    train, _, _ = build_datasets(config, load_tokenizer(model), [500, 50, 0])
    built = sum("Build and save" in m for m in collect.messages)
    np.save(f"{out}/rank{rank}.npy", np.stack([train[i]["tokens"].numpy() for i in range(20)]))
    np.save(f"{out}/built{rank}.npy", np.array(built))
    torch.distributed.destroy_process_group()


def test_two_ranks_build_the_cache_once(tmp_path) -> None:
    args = (_free_port(), str(tmp_path / "cache"), assets().train_prefix, str(assets().tokenizer_model), str(tmp_path))
    mp.spawn(_rank, args=args, nprocs=2, join=True)
    assert np.load(tmp_path / "built0.npy") > 0 and np.load(tmp_path / "built1.npy") == 0
    assert np.array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))


def test_an_index_cache_cut_short_is_built_again(tmp_path) -> None:
    """A run killed (or out of disk) while megatron-core wrote its index cache leaves a short .npy that
    megatron-core would load ("mmap length is greater than file size" in every later run)."""
    config = DataConfig(train_data=[assets().train_prefix], seq_length=SEQ, split="90,10,0", cache_dir=str(tmp_path / "cache"))
    train, _, _ = build_datasets(config, tokenizer(), [100, 10, 0])
    shuffle_index = next((tmp_path / "cache").glob("*-train-shuffle_index.npy"))
    complete = shuffle_index.read_bytes()
    shuffle_index.write_bytes(complete[: len(complete) // 2])
    again, _, _ = build_datasets(config, tokenizer(), [100, 10, 0])
    assert shuffle_index.read_bytes() == complete
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(len(train)))


def test_a_prefix_written_again_gets_a_new_index_cache(tmp_path) -> None:
    """Preprocessing to the same prefix again and training with the same data cache: megatron-core names
    its index caches by the prefix path, so it read the old document/sample indices against the new
    files (an IndexError, or other tokens without a word). The cache is rebuilt, with a notice."""
    prefix, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    config = DataConfig(train_data=[prefix + "_text_document"], seq_length=SEQ, split="90,10,0", cache_dir=cache)
    for texts in (assets().texts("train")[:40], assets().texts("valid")):
        preprocess(write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts]), prefix,
                   str(assets().tokenizer_model), append_eod=True, log=quiet)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = build_datasets(config, tokenizer(), [300, 30, 0])
    fresh = build_datasets(DataConfig(**{**config.__dict__, "cache_dir": str(tmp_path / "fresh")}), tokenizer(), [300, 30, 0])
    for split, expected in zip(again[:2], fresh[:2]):
        assert len(split) == len(expected)
        assert all(torch.equal(split[i]["tokens"], expected[i]["tokens"]) for i in range(len(split)))
    assert any("Rebuilding the index cache" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:  # the files as they are: the cache is used, no notice
        warnings.simplefilter("always")
        files = sorted(os.listdir(cache))
        build_datasets(config, tokenizer(), [300, 30, 0])
    assert sorted(os.listdir(cache)) == files and not any("index cache" in str(w.message) for w in caught)


def test_an_unweighted_list_is_blended_by_size_for_as_many_epochs_as_asked(tmp_path) -> None:
    """data.train_data: [a, b] without weights, as Megatron-LM: the prefixes in proportion to their
    sizes, for the whole run (megatron-core alone built one epoch, and the run ran out of data early)."""
    other = second_prefix(tmp_path)
    tokens = np.array([validate_prefix(p).tokens for p in (assets().train_prefix, other)], dtype=float)
    asked = 3 * int(tokens.sum()) // SEQ  # three epochs
    config = DataConfig(train_data=[assets().train_prefix, other], seq_length=SEQ, split="98,2,0",
                        cache_dir=str(tmp_path / "cache"))
    train, valid, _ = build_datasets(config, tokenizer(), [asked, 100, 0])
    assert len(train) >= asked and len(valid) >= 100
    share = np.bincount(np.asarray(train.dataset_index), minlength=2) / len(train)
    assert abs(share[1] - tokens[1] / tokens.sum()) < 0.01


def test_an_unweighted_list_with_a_prefix_smaller_than_a_sample(tmp_path) -> None:
    """A prefix (or its share of a split) with fewer tokens than one sample in an unweighted list failed
    megatron-core's assert after the model was built; it is blended by its size like any other."""
    path = write_jsonl(tmp_path / "small.jsonl", [{"text": "def"}, {"text": "class"}])
    preprocess(path, str(tmp_path / "small"), str(assets().tokenizer_model), append_eod=True, log=quiet)
    small = str(tmp_path / "small_text_document")
    assert validate_prefix(small).tokens < SEQ + 1
    config = DataConfig(train_data=[assets().train_prefix, small], seq_length=SEQ, split="50,50,0",
                        cache_dir=str(tmp_path / "cache"))
    train, valid, _ = build_datasets(config, tokenizer(), [1000, 100, 0])
    assert len(train) >= 1000 and len(valid) >= 100
    assert train[len(train) - 1]["tokens"].shape == (SEQ,)
