#!/usr/bin/env python
"""Write the chat twin of a tokenizer: a Hugging Face directory with Doge's chat template.

    python data_tools/make_chat_tokenizer.py --tokenizer data/tokenizer/tokenizer.model --output-dir data/tokenizer/chat

data_tools/train_tokenizer.py already writes OUTPUT_DIR/chat; this tool makes one for an existing
tokenizer (a sentencepiece .model or a Hugging Face directory such as SmallDoge/Doge-tokenizer).
"""
from __future__ import annotations

import argparse
import sys

from doge_dist.data.errors import run_tool
from doge_dist.data.chat_template import write_chat_tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model or Hugging Face tokenizer directory")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    return run_tool(lambda: f"wrote {write_chat_tokenizer(args.tokenizer, args.output_dir)}")


if __name__ == "__main__":
    sys.exit(main())
