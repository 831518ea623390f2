#!/usr/bin/env python
"""Build the embedded sample corpus (data/sample_corpus/{train,valid}.jsonl) offline, deterministically.

    python data_tools/build_sample_corpus.py --output-dir data/sample_corpus
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from doge_dist.data.errors import DataError, run_tool
from doge_dist.data.sample_corpus import DEFAULT_SOURCES, build_corpus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="data/sample_corpus")
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES),
                        help="pydoc_topics, stdlib and/or installed package names (default: %(default)s)")
    parser.add_argument("--valid-percent", type=float, default=2.0, help="share of documents in valid.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.time()

    def build() -> str:
        stats = build_corpus(args.output_dir, tuple(args.sources), args.valid_percent)
        lines = [f"{args.output_dir}/{split}.jsonl: {s['documents']} documents, {s['bytes'] / 1e6:.2f} MB"
                 for split, s in stats.items()]
        return "\n".join(lines + [f"built in {time.time() - start:.1f} s"])

    return run_tool(build, errors=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
