#!/usr/bin/env python
"""Tokenize raw text into Megatron .bin/.idx files (Megatron-LM's tools/preprocess_data.py flags for GPT data;
not its --split-sentences, --partitions or vocab/merge-file tokenizers).

    python data_tools/preprocess_data.py --input data/sample_corpus/train.jsonl \\
        --output-prefix data/sample_train --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model data/tokenizer/tokenizer.model --append-eod --workers 2

Inputs: .jsonl/.json(.gz), .parquet, .txt(.gz) (blank-line separated documents), directories and
globs of those, and datasets directories saved with save_to_disk. Writes
{output-prefix}_{key}_document.bin/.idx for every --json-keys key.
"""
from __future__ import annotations

import argparse
import sys

from doge_dist.data import preprocess
from doge_dist.cpus import usable_cpus
from doge_dist.data.errors import at_least, log_to_stderr, run_tool
from doge_dist.data.tokenizer import TOKENIZER_TYPES


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, help="files, directories or glob patterns")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys (columns) holding the text")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=list(TOKENIZER_TYPES), default=None,
                       help="default: HuggingFaceTokenizer for a directory, SentencePieceTokenizer for a file")
    group.add_argument("--tokenizer-model", required=True, help="sentencepiece .model or Hugging Face tokenizer directory")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document (eos) id to each document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="path without the _{key}_document.bin/.idx suffix")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=at_least(1), default=usable_cpus(),
                       help="tokenizer processes (default: the CPUs this process may use)")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    group.add_argument("--strict", action="store_true", help="stop at the first malformed record instead of skipping it")
    return parser.parse_args()


def main() -> int:
    args = get_args()
    return run_tool(lambda: preprocess(
        args.input, args.output_prefix, args.tokenizer_model, args.tokenizer_type, args.json_keys,
        args.append_eod, args.workers, args.log_interval, args.strict, log_to_stderr,
    ).summary())


if __name__ == "__main__":
    sys.exit(main())
