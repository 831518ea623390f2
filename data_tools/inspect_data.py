#!/usr/bin/env python
"""Validate a Megatron .bin/.idx pair and show what is inside; exits 1 on a damaged pair.

    python data_tools/inspect_data.py data/sample_train_text_document --tokenizer-model data/tokenizer

Prints documents (and how many are zero-length: empty fields, as preprocess_data.py and Megatron-LM
write them), sequences, tokens, dtype, the largest token id, a histogram of sequence lengths and
(with --tokenizer-model) the start of a few decoded documents (document i: the i-th record written).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from doge_dist.data import DataError, load_tokenizer, validate_prefix
from doge_dist.data.errors import at_least

BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536)


def histogram(lengths: np.ndarray) -> list[str]:
    longest = int(lengths.max(initial=0))
    edges = [edge for edge in BUCKETS if edge <= longest] + [longest + 1]
    counts, _ = np.histogram(lengths, bins=edges)
    width = max(int(counts.max(initial=1)), 1)
    return [
        f"  {lo:>6}-{hi - 1:<6} {count:>8}  {'#' * round(40 * count / width)}"
        for lo, hi, count in zip(edges[:-1], edges[1:], counts)
    ]


def document_tokens(dataset, index: int) -> list[int]:
    """The token ids of document ``index``: its sequences (sentences) in order; none for a zero-length one."""
    first, last = dataset.document_indices[index : index + 2]
    return [token for sequence in range(first, last) for token in dataset[int(sequence)].tolist()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="path without .bin/.idx")
    parser.add_argument("--tokenizer-model", help="sentencepiece .model or HF directory: check the vocabulary and decode samples")
    parser.add_argument("--tokenizer-type", default=None)
    parser.add_argument("--samples", type=at_least(0), default=2, help="documents to decode")
    parser.add_argument("--chars", type=int, default=300, help="characters shown per decoded document")
    args = parser.parse_args()
    try:
        tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type) if args.tokenizer_model else None
        info = validate_prefix(args.prefix, tokenizer.vocab_size if tokenizer else None)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(args.prefix, mmap=False)  # an empty .bin cannot be memory-mapped
    lengths = info.sequence_lengths
    zero_length = int(np.sum(np.diff(dataset.document_indices) == 0))
    print(f"{info.prefix}: OK")
    print(f"  documents {info.documents}, sequences {info.sequences}, tokens {info.tokens}, dtype {info.dtype.name}")
    if zero_length:
        print(f"  zero-length documents {zero_length} (empty fields of the input)")
    print(f"  largest token id {info.max_token}" + (f" (vocabulary {tokenizer.vocab_size})" if tokenizer else ""))
    if len(lengths):
        print(f"  sequence length: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}")
        print("  length histogram (tokens per sequence):")
        print("\n".join(histogram(lengths)))
    if tokenizer and info.documents:
        for index in np.linspace(0, info.documents - 1, num=min(args.samples, info.documents), dtype=int):
            ids = document_tokens(dataset, int(index))
            print(f"--- document {index} ({len(ids)} tokens) ---\n{tokenizer.decode(ids)[: args.chars]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
