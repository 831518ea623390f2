"""Chat (SFT) and preference (DPO) jsonl/parquet -> Megatron indexed datasets with a loss mask.

Layout, per output prefix (megatron-core ``IndexedDatasetBuilder`` files, readable by any Megatron tool):

    {prefix}_text_document.bin/.idx        token ids
    {prefix}_loss_mask_document.bin/.idx   uint8, 1 where the token is trained on; same sequence lengths

SFT: one document = one conversation (``messages``, or TRL's ``prompt`` + ``completion``) = one sequence.
DPO: one document = one pair = two sequences, prompt + chosen then prompt + rejected (the mask marks
the completion). Bad records are skipped and reported with file and line (or stop the run with
``strict``), like data_tools/preprocess_data.py.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Callable, Optional, Sequence

import numpy as np

from doge_dist.data.chat import encode_conversation, encode_preference, sft_messages
from doge_dist.data.chat_template import load_chat_tokenizer
from doge_dist.data.errors import DataError
from doge_dist.data.indexed import atomic_builders, document_prefix
from doge_dist.data.inputs import UTF8, BadRecord, InputFile, check_columns, columns_of, iter_records, list_inputs
from doge_dist.data.preprocess import MAX_REPORTED, PreprocessReport, Progress

# each kind's record formats (their keys): SFT conversations or TRL's prompt-completion records, DPO pairs
KINDS = {"sft": (("messages",), ("prompt", "completion")), "dpo": (("prompt", "chosen", "rejected"),)}
FORMATS = ("--kind sft reads a 'messages' column (or 'prompt' and 'completion'), "
           "--kind dpo 'prompt', 'chosen' and 'rejected'")
TEXT_KEY, MASK_KEY = "text", "loss_mask"


def chat_prefixes(output_prefix: str) -> tuple[str, str]:
    """(token prefix, loss-mask prefix) written for ``output_prefix``."""
    return document_prefix(output_prefix, TEXT_KEY), document_prefix(output_prefix, MASK_KEY)


def mask_prefix(text_prefix: str) -> str:
    """The loss-mask prefix next to a token prefix (``..._text_document`` -> ``..._loss_mask_document``)."""
    if not text_prefix.endswith(f"_{TEXT_KEY}_document"):
        raise DataError(f"'{text_prefix}' is not a chat data prefix (..._text_document from data_tools/preprocess_chat.py).")
    return text_prefix[: -len(f"_{TEXT_KEY}_document")] + f"_{MASK_KEY}_document"


def check_chat_columns(inputs: Sequence[InputFile], kind: str) -> None:
    """Before any work: a parquet file or datasets directory holds the columns of ``kind`` (its rows
    would otherwise read as records without keys, or fail inside ``datasets`` with a traceback); the
    error says which --kind its columns fit, if one does."""
    for item in inputs:
        columns = columns_of(item)
        if columns is None or _fits(columns, kind):
            continue
        fits = [other for other in KINDS if other != kind and _fits(columns, other)]
        advice = f"Its columns are {fits[0]} data: pass --kind {fits[0]}." if fits else f"{FORMATS}."
        check_columns(item, KINDS[kind][0], advice)


def _fits(columns: list[str], kind: str) -> bool:
    return any(set(columns).issuperset(keys) for keys in KINDS[kind])


def record_keys(kind: str) -> list[str]:
    """The keys of every record format of ``kind`` (the columns read from parquet and datasets inputs)."""
    return list(dict.fromkeys(key for keys in KINDS[kind] for key in keys))


def _record(kind: str, payload) -> Optional[dict]:
    if kind == "row":
        return payload
    if not payload.strip():
        return None
    try:
        data = json.loads(payload.decode(UTF8))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRecord(f"malformed JSON ({error})") from None
    except RecursionError:  # e.g. 100,000 "[": json's decoder recurses once per level
        raise BadRecord("JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise BadRecord(f"a JSON {type(data).__name__}, not an object")
    return data


def preprocess_chat(
    input: str | Sequence[str],
    output_prefix: str,
    tokenizer_dir: str,
    kind: str = "sft",
    assistant_only: bool = True,
    max_length: int = 0,
    max_prompt_length: int = 512,
    max_completion_length: int = 512,
    strict: bool = False,
    log: Callable[[str], None] = print,
    log_interval: int = 1000,
) -> PreprocessReport:
    """Tokenize conversations (``kind="sft"``) or preference pairs (``"dpo"``); see the module doc."""
    from megatron.core.datasets.indexed_dataset import DType

    if kind not in KINDS:
        raise DataError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    start = time.time()
    inputs = list_inputs(input)
    plain_text = [str(item.path) for item in inputs if item.kind == "text"]
    if plain_text:
        raise DataError(f"{', '.join(plain_text)}: chat data must be jsonl, parquet or a datasets directory, not plain text.")
    check_chat_columns(inputs, kind)
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    dtype = DType.optimal_dtype(len(tokenizer))
    prefixes = chat_prefixes(output_prefix)
    report = PreprocessReport(list(prefixes))
    progress = Progress(log_interval, inputs, log)
    log(f"Tokenizing {kind} records of {len(inputs)} input file(s) into {prefixes[0]} (+ loss mask)")
    trained, truncated = 0, Counter()
    with atomic_builders(list(zip(prefixes, (dtype, np.uint8)))) as (tokens, masks):
        for done, (index, line, record_kind, payload) in enumerate(iter_records(inputs, record_keys(kind))):
            progress(report, done)
            report.input_bytes += len(payload) if isinstance(payload, bytes) else 0
            where = f"{inputs[index].path}:{line}"
            cut = Counter()  # counted only for records that are written
            try:
                record = _record(record_kind, payload)
                if record is None:
                    report.blank_lines += 1
                    continue
                if kind == "sft":
                    prompt, messages = sft_messages(record)
                    sequences = [encode_conversation(tokenizer, messages, assistant_only, max_length, cut, prompt)]
                else:
                    prompt, chosen, rejected = encode_preference(tokenizer, record, max_prompt_length, max_completion_length, cut)
                    sequences = [(prompt + c, [0] * len(prompt) + [1] * len(c)) for c in (chosen, rejected)]
            except BadRecord as problem:
                if strict:
                    raise DataError(f"{where}: {problem} (--strict stops at the first bad record; without it, bad records are skipped and reported)") from None
                report.bad += 1
                if len(report.bad_locations) < MAX_REPORTED:
                    report.bad_locations.append(f"{where}: {problem}")
                continue
            lengths = [len(ids) for ids, _ in sequences]
            tokens.add_document(np.concatenate([np.asarray(ids, dtype=dtype) for ids, _ in sequences]), lengths)
            masks.add_document(np.concatenate([np.asarray(m, dtype=np.uint8) for _, m in sequences]), lengths)
            report.documents += 1
            truncated.update(cut)
            report.tokens += sum(lengths)
            trained += sum(sum(m) for _, m in sequences)
        report.check_usable(f"{FORMATS}: is --kind right?")
    report.seconds = time.time() - start
    log(f"{trained} of {report.tokens} tokens carry loss")
    if any(truncated.values()):
        log(truncation_line(kind, truncated, report.documents, max_length))
    return report


def truncation_line(kind: str, truncated: Counter, documents: int, max_length: int) -> str:
    """How many sequences the length limits cut, and from which side (the rest was kept whole)."""
    if kind == "sft":
        return f"Truncated from the right to --max-length = {max_length} tokens: {truncated['conversations']} of {documents} conversations."
    return (f"Truncated: {truncated['prompts']} of {documents} prompts from the left to --max-prompt-length, "
            f"{truncated['completions']} of {2 * documents} completions from the right to --max-completion-length.")
