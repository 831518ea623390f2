#!/usr/bin/env python
"""Throughput of preprocess_data.py against tokenizing the same input with datasets.map.

    python data_tools/bench_preprocess.py --input data/sample_corpus/train.jsonl \\
        --tokenizer-model data/tokenizer/tokenizer.model --workers 2

Both sides start from the jsonl file and end with token ids on disk, use the same tokenizer
(megatron-core's wrapper, so the same ids) and the same number of processes; the datasets side is
load_dataset("json") + map(batched=True, num_proc=workers) into a fresh cache directory.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from doge_dist.data import load_tokenizer, preprocess
from doge_dist.cpus import usable_cpus
from doge_dist.data.errors import DataError, at_least, run_tool

_TOKENIZER = None


def _encode_batch(batch: dict, tokenizer_path: str, key: str) -> dict:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = load_tokenizer(tokenizer_path)
    return {"input_ids": [_TOKENIZER.encode(text) + [_TOKENIZER.eod_id] for text in batch[key]]}


def bench_datasets(path: str, tokenizer_path: str, key: str, workers: int, cache_dir: str) -> tuple[float, int, int]:
    """-> (seconds, documents, tokens) for load_dataset + map."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    start = time.time()
    dataset = load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
    tokenized = dataset.map(
        _encode_batch,
        batched=True,
        num_proc=workers if workers > 1 else None,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer_path": tokenizer_path, "key": key},
    )
    seconds = time.time() - start
    tokens = sum(len(ids) for batch in tokenized.iter(batch_size=1000) for ids in batch["input_ids"])
    return seconds, len(tokenized), tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="data/sample_corpus/train.jsonl")
    parser.add_argument("--tokenizer-model", default="data/tokenizer/tokenizer.model")
    parser.add_argument("--json-keys", "--json-key", dest="json_key", default="text", metavar="KEY",
                        help="the one key holding the text (preprocess_data.py's --json-keys, one key)")
    parser.add_argument("--workers", type=at_least(1), default=usable_cpus(),
                        help="processes on each side (default: the CPUs this process may use)")
    parser.add_argument("--repeat", type=at_least(1), default=1,
                        help="concatenate the input N times for a longer, steadier run")
    args = parser.parse_args()
    return run_tool(lambda: bench(args))


def bench(args: argparse.Namespace) -> str:
    """Time both tokenizations of ``args.input``; return the report. A missing input or tokenizer, or a
    wrong --json-keys, is a DataError (from preprocess, before the datasets.map timing)."""
    if not os.path.isfile(args.input):
        raise DataError(f"--input '{args.input}' is not a file: pass a .jsonl file to benchmark on.")
    load_tokenizer(args.tokenizer_model)  # import megatron-core and sentencepiece once, outside both timings
    with tempfile.TemporaryDirectory() as scratch:
        path = args.input
        if args.repeat > 1:
            path = os.path.join(scratch, "input.jsonl")
            with open(args.input, "rb") as source, open(path, "wb") as sink:
                data = source.read()
                for _ in range(args.repeat):
                    sink.write(data)
                    if not data.endswith(b"\n"):  # else its last line and the next copy's first would be one
                        sink.write(b"\n")
        megabytes = os.path.getsize(path) / 1e6
        start = time.time()
        report = preprocess(path, os.path.join(scratch, "bench"), args.tokenizer_model, json_keys=[args.json_key],
                            append_eod=True, workers=args.workers, log_interval=0, log=lambda line: None)
        ours = time.time() - start
        theirs, documents, tokens = bench_datasets(path, args.tokenizer_model, args.json_key, args.workers,
                                                   os.path.join(scratch, "hf_cache"))
    lines = [f"input {args.input} x{args.repeat}: {megabytes:.1f} MB, {report.documents} documents; workers {args.workers}"]
    for name, seconds, docs, toks in (("preprocess_data.py", ours, report.documents, report.tokens),
                                      ("datasets.map", theirs, documents, tokens)):
        lines.append(f"{name:>20}: {seconds:6.2f} s  {docs / seconds:8.0f} docs/s  {megabytes / seconds:6.2f} MB/s  "
                     f"{toks / seconds / 1e6:6.2f} M tokens/s  ({toks} tokens)")
    if tokens != report.tokens:
        lines.append(f"warning: token counts differ ({report.tokens} vs {tokens})")
    lines.append(f"speedup (datasets.map time / preprocess_data.py time): {theirs / ours:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
