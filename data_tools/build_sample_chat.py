#!/usr/bin/env python
"""Build the synthetic chat (SFT) and preference (DPO) sample offline, deterministically.

    python data_tools/build_sample_chat.py --output-dir data/sample_chat

Writes sft_train.jsonl, sft_valid.jsonl, dpo_train.jsonl, dpo_valid.jsonl (see doge_dist/data/sample_chat.py).
"""
from __future__ import annotations

import argparse

from doge_dist.data.sample_chat import build_sample_chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="data/sample_chat")
    parser.add_argument("--sft", type=int, default=2000, help="training conversations")
    parser.add_argument("--dpo", type=int, default=1000, help="training preference pairs")
    parser.add_argument("--valid", type=int, default=64, help="validation records of each kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, count in build_sample_chat(args.output_dir, args.sft, args.dpo, args.valid, args.seed).items():
        print(f"{args.output_dir}/{name}: {count} records")


if __name__ == "__main__":
    main()
