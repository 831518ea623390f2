#!/usr/bin/env python
"""Validate a Megatron .bin/.idx pair and show what is inside; exits 1 on a damaged pair.

    python data_tools/inspect_data.py data/sample_train_text_document --tokenizer-model data/tokenizer

Prints documents, sequences, tokens, dtype, the largest token id, a histogram of document lengths
and (with --tokenizer-model) the start of a few decoded documents.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from doge_dist.data import DataError, load_tokenizer, validate_prefix

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="path without .bin/.idx")
    parser.add_argument("--tokenizer-model", help="sentencepiece .model or HF directory: check the vocabulary and decode samples")
    parser.add_argument("--tokenizer-type", default=None)
    parser.add_argument("--samples", type=int, default=2, help="documents to decode")
    parser.add_argument("--chars", type=int, default=300, help="characters shown per decoded document")
    args = parser.parse_args()
    try:
        tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type) if args.tokenizer_model else None
        info = validate_prefix(args.prefix, tokenizer.vocab_size if tokenizer else None)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    lengths = info.sequence_lengths
    print(f"{info.prefix}: OK")
    print(f"  documents {info.documents}, sequences {info.sequences}, tokens {info.tokens}, dtype {info.dtype.name}")
    print(f"  largest token id {info.max_token}" + (f" (vocabulary {tokenizer.vocab_size})" if tokenizer else ""))
    if len(lengths):
        print(f"  sequence length: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}")
        print("  length histogram (tokens per sequence):")
        print("\n".join(histogram(lengths)))
    if tokenizer and info.sequences:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(args.prefix)
        for index in np.linspace(0, info.sequences - 1, num=min(args.samples, info.sequences), dtype=int):
            text = tokenizer.decode(dataset[int(index)].tolist())
            print(f"--- sequence {index} ({lengths[index]} tokens) ---\n{text[: args.chars]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
