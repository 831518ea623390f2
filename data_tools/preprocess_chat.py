#!/usr/bin/env python
"""Tokenize chat conversations (SFT) or preference pairs (DPO) into Megatron .bin/.idx with a loss mask.

    python data_tools/preprocess_chat.py --kind sft --input data/sample_chat/sft_train.jsonl \\
        --tokenizer data/tokenizer/chat --output-prefix data/sample_sft_train
    python data_tools/preprocess_chat.py --kind dpo --input data/sample_chat/dpo_train.jsonl \\
        --tokenizer data/tokenizer/chat --output-prefix data/sample_dpo_train --max-prompt-length 512

SFT records: {"messages": [{"role": "system"|"user"|"assistant"|"tool"|"ipython", "content": "..."}, ...]}: an
optional system message first (an empty one is dropped), then turns alternating user, assistant, user, ...; tool
results (tool or ipython) may follow an assistant turn, and the assistant answers them. The loss is on the assistant
turns. Or TRL's prompt-completion records {"prompt": str or messages, "completion": str or messages}: the loss is on
the completion only (TRL's completion_only_loss).
DPO records: {"prompt": str or messages, "chosen": str or messages, "rejected": str or messages}.
An --input directory holding several splits (a Hugging Face Hub download: train-*.parquet beside test-*.parquet,
or train/ beside test/) is refused: pass one split's files, e.g. --input 'DIR/data/train*'.
The tokenizer is a Hugging Face directory with the chat template (data_tools/make_chat_tokenizer.py).
Writes {output-prefix}_text_document.bin/.idx and {output-prefix}_loss_mask_document.bin/.idx.
Malformed records are reported with file:line and skipped; --strict stops at the first one.
"""
from __future__ import annotations

import argparse
import sys

from doge_dist.data.errors import log_to_stderr, run_tool
from doge_dist.data.preprocess_chat import KINDS, preprocess_chat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=list(KINDS), required=True)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl(.gz), parquet files, directories or globs")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory with the chat template")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--loss-on", choices=["assistant", "all"], help="SFT: tokens that carry loss (default assistant)")
    parser.add_argument("--max-length", type=int, help="SFT: truncate conversations (tokens, from the right); 0 = keep (default)")
    parser.add_argument("--max-prompt-length", type=int, help="DPO: prompt tokens kept (from the left; default 512, 0 = no limit)")
    parser.add_argument("--max-completion-length", type=int, help="DPO: completion tokens kept (from the right; default 512, 0 = no limit)")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed record instead of skipping it")
    parser.add_argument("--log-interval", type=int, default=1000, help="records between progress lines")
    args = parser.parse_args()
    for flag, value, kind in (("--loss-on", args.loss_on, "sft"), ("--max-length", args.max_length, "sft"),
                              ("--max-prompt-length", args.max_prompt_length, "dpo"),
                              ("--max-completion-length", args.max_completion_length, "dpo")):
        if value is not None and kind != args.kind:  # it would be ignored
            parser.error(f"{flag} applies to --kind {kind}, not {args.kind}")
        if isinstance(value, int) and value < 0:
            parser.error(f"{flag} must be 0 (no limit) or a positive number of tokens, not {value}")
    prompt_limit = 512 if args.max_prompt_length is None else args.max_prompt_length  # 0 is no limit, not the default
    completion_limit = 512 if args.max_completion_length is None else args.max_completion_length
    return run_tool(lambda: preprocess_chat(
        args.input, args.output_prefix, args.tokenizer, args.kind, args.loss_on != "all", args.max_length or 0,
        prompt_limit, completion_limit, args.strict, log=log_to_stderr, log_interval=args.log_interval).summary())


if __name__ == "__main__":
    sys.exit(main())
