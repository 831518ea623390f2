"""Shared, built-once assets for the tests/test_data_*.py files (plain module, cached per process).

A small corpus (the Python reference topics), a 512-piece BPE tokenizer with its Hugging Face twin,
and the corpus preprocessed into a .bin/.idx prefix.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

from doge_dist.data import load_tokenizer, preprocess  # noqa: E402
from doge_dist.data.sample_corpus import build_corpus  # noqa: E402
from doge_dist.data.train_tokenizer import train_tokenizer  # noqa: E402

VOCAB = 512


@dataclass(frozen=True)
class Assets:
    root: Path
    train_jsonl: Path
    valid_jsonl: Path
    tokenizer_model: Path  # sentencepiece .model
    tokenizer_dir: Path  # the Hugging Face directory (same folder)
    train_prefix: str  # train_jsonl preprocessed with --append-eod

    def texts(self, split: str = "train") -> list[str]:
        path = self.train_jsonl if split == "train" else self.valid_jsonl
        return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def quiet(_line: str) -> None:
    """A log sink for preprocess/train_tokenizer in tests."""


@lru_cache(maxsize=None)
def assets() -> Assets:
    root = Path(tempfile.mkdtemp(prefix="doge_data_tests_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    corpus = root / "corpus"
    build_corpus(corpus, sources=("pydoc_topics",), valid_percent=10)
    model = train_tokenizer(corpus / "train.jsonl", root / "tokenizer", vocab_size=VOCAB, threads=2, log=quiet)
    prefix = str(root / "train")
    preprocess(corpus / "train.jsonl", prefix, str(model), append_eod=True, workers=1, log=quiet)
    return Assets(root, corpus / "train.jsonl", corpus / "valid.jsonl", model, model.parent, prefix + "_text_document")


@lru_cache(maxsize=None)
def tokenizer():
    return load_tokenizer(assets().tokenizer_model)


def makefile_target(pattern: str) -> str:
    """What the Makefile's ``pattern`` (a regex with one group) captures: the files ``make demo`` goes by."""
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no {pattern!r} in the Makefile"
    return match.group(1)


class StopAtRename:
    """An ``os.replace`` that stops the process (KeyboardInterrupt, as a kill would) at its ``at``-th call:
    what a tool leaves when it dies between the renames that put its outputs in place."""

    def __init__(self, at: int) -> None:
        self.at, self.calls, self.replace = at, 0, os.replace

    def __call__(self, source, target) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        self.replace(source, target)


def write_jsonl(path: Path, records: list) -> Path:
    """Records are dicts (written as JSON) or raw bytes/str lines (written as they are)."""
    with open(path, "wb") as out:
        for record in records:
            if isinstance(record, dict):
                record = json.dumps(record)
            out.write((record.encode() if isinstance(record, str) else record) + b"\n")
    return path
