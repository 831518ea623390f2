#!/usr/bin/env python
"""Build the synthetic chat (SFT) and preference (DPO) sample offline, deterministically.

    python data_tools/build_sample_chat.py --output-dir data/sample_chat

Writes sft_train.jsonl, sft_valid.jsonl, dpo_train.jsonl, dpo_valid.jsonl (see doge_dist/data/sample_chat.py).
"""
from __future__ import annotations

import argparse
import sys

from doge_dist.data.errors import at_least, run_tool
from doge_dist.data.sample_chat import build_sample_chat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="data/sample_chat")
    parser.add_argument("--sft", type=at_least(0), default=2000, help="training conversations")
    parser.add_argument("--dpo", type=at_least(0), default=1000, help="training preference pairs")
    parser.add_argument("--valid", type=at_least(0), default=64, help="validation records of each kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def build() -> str:
        counts = build_sample_chat(args.output_dir, args.sft, args.dpo, args.valid, args.seed)
        return "\n".join(f"{args.output_dir}/{name}: {count} records" for name, count in counts.items())

    return run_tool(build)


if __name__ == "__main__":
    sys.exit(main())
