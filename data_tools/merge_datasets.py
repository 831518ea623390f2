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

from doge_dist.data.errors import DataError, log_to_stderr, run_tool
from doge_dist.data.indexed import merge_prefixes


def expand(inputs: list[str]) -> list[str]:
    """The prefixes named: a directory's pairs in sorted order; a .bin there without its .idx (a copy cut
    short) is refused, not left out of the merge without a word (Megatron-LM's tool asserts)."""
    prefixes: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pairs = sorted(idx.with_suffix("") for idx in path.glob("*.idx"))
            lone = sorted(str(data) for data in path.glob("*.bin") if data.with_suffix("") not in pairs)
            if lone:
                raise DataError(f"'{path}' holds {', '.join(lone)} without its .idx (a copy cut short?); complete the "
                                "pair or move the file out of the directory.")
            prefixes += map(str, pairs)
        else:
            prefixes.append(item[: -len(".idx")] if item.endswith((".idx", ".bin")) else item)
    return prefixes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="prefixes or directories of prefixes")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args()

    def merge() -> str:
        prefixes = expand(args.input)
        info = merge_prefixes(prefixes, args.output_prefix, log=log_to_stderr)
        return f"Merged {len(prefixes)} prefixes into {args.output_prefix}: {info.documents} documents, {info.tokens} tokens"

    return run_tool(merge)


if __name__ == "__main__":
    sys.exit(main())
