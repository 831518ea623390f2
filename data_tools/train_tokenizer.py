#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE or unigram) with Doge's special ids (bos 0, eos 1, pad 2, unk 3).

    python data_tools/train_tokenizer.py --input data/sample_corpus/train.jsonl \\
        --output-dir data/tokenizer --vocab-size 8192

Writes OUTPUT_DIR/tokenizer.model (for --tokenizer-model) and, in the same directory, a Hugging Face
tokenizer (tokenizer.json + tokenizer_config.json) that AutoTokenizer.from_pretrained(OUTPUT_DIR)
loads with identical ids, and OUTPUT_DIR/chat: the same tokenizer with Doge's chat template (for SFT/DPO
data and exports, see doge_dist/data/chat_template.py).
"""
from __future__ import annotations

import argparse
import sys
import time

from doge_dist.data.errors import DataError, log_to_stderr, run_tool
from doge_dist.data.train_tokenizer import train_tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl(.gz), parquet, txt files, directories or globs")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    parser.add_argument("--bos-id", type=int, default=0)
    parser.add_argument("--eos-id", type=int, default=1)
    parser.add_argument("--pad-id", type=int, default=2)
    parser.add_argument("--unk-id", type=int, default=3)
    args = parser.parse_args()
    special = {"bos": args.bos_id, "eos": args.eos_id, "pad": args.pad_id, "unk": args.unk_id}
    start = time.time()

    def train() -> str:
        train_tokenizer(args.input, args.output_dir, args.vocab_size, args.model_type, args.json_keys,
                        args.max_sentences, special, log=log_to_stderr)
        return f"tokenizer written in {time.time() - start:.1f} s"

    return run_tool(train, errors=(DataError, ValueError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
