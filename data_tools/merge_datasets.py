#!/usr/bin/env python
"""Concatenate Megatron .bin/.idx prefixes into one (megatron-core IndexedDatasetBuilder.add_index).

    python data_tools/merge_datasets.py --input data/part_a_text_document data/part_b_text_document \\
        --output-prefix data/merged_text_document

--input takes prefixes (without .bin/.idx) or directories, whose prefixes are merged in sorted order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from doge_dist.data.errors import log_to_stderr, run_tool
from doge_dist.data.indexed import merge_prefixes


def expand(inputs: list[str]) -> list[str]:
    prefixes: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            prefixes += sorted(str(idx.with_suffix("")) for idx in path.glob("*.idx"))
        else:
            prefixes.append(item[: -len(".idx")] if item.endswith((".idx", ".bin")) else item)
    return prefixes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="prefixes or directories of prefixes")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args()
    prefixes = expand(args.input)

    def merge() -> str:
        info = merge_prefixes(prefixes, args.output_prefix, log=log_to_stderr)
        return f"Merged {len(prefixes)} prefixes into {args.output_prefix}: {info.documents} documents, {info.tokens} tokens"

    return run_tool(merge)


if __name__ == "__main__":
    sys.exit(main())
