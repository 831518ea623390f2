"""Raw text -> Megatron ``{prefix}_{key}_document.bin/.idx``, the engine of data_tools/preprocess_data.py.

Same output as Megatron-LM's tools/preprocess_data.py for the same input, tokenizer and flags: each
document is ``tokenizer.tokenize(text)`` (+ eod with --append-eod, when not empty), a list of strings
is encoded sentence by sentence, and megatron-core's ``IndexedDatasetBuilder`` writes with
``DType.optimal_dtype(vocab_size)``. Every record is one document in the prefix of every key, an
empty (or null) field a zero-length document, as there: document i of each prefix comes from the
same record. Differences, on purpose: blank jsonl lines are skipped (Megatron-LM's json.loads fails
on them), bad records are skipped for every key and reported (or stop the run with ``strict``; a
missing key stops it when no document was written yet, as that means a wrong --json-keys), every
--json-keys key is finalized, and files appear only when complete.

Workers: a ``multiprocessing.Pool`` with ``imap`` keeps input order, so the bytes do not depend on the
worker count. Reading is throttled to a fixed number of batches in flight (Pool's feeder thread would
otherwise read the whole input into memory ahead of the workers). A worker that dies stops the run
with an error (``_watched``): Pool would wait for its batch for ever.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.pool import IMapIterator, Pool
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from doge_dist.data.errors import DataError
from doge_dist.data.indexed import atomic_builders, document_prefix
from doge_dist.data.inputs import BadRecord, InputFile, Record, check_keys, decode_record, iter_records, list_inputs
from doge_dist.data.tokenizer import Tokenizer, load_tokenizer

BATCH_RECORDS = 128
BATCHES_IN_FLIGHT_PER_WORKER = 8
MAX_REPORTED = 20

# Per worker process: (tokenizer, keys, append_eod, dtype), set by _init_worker.
_STATE: tuple = ()


def _init_worker(tokenizer_path: str, tokenizer_type: Optional[str], keys: Sequence[str], append_eod: bool, dtype) -> None:
    global _STATE
    _STATE = (load_tokenizer(tokenizer_path, tokenizer_type), tuple(keys), append_eod, dtype)


def _init_pool_worker(*init_args) -> None:
    """A pool worker leaves the tool's process group and ignores Ctrl-C: a signal to the group (Ctrl-C in
    a terminal, ``kill -TERM -- -PID``) reaches the main process only, which stops the workers itself
    (Pool.terminate's SIGTERM). A worker that died of it mid-read left half a task in the pool's pipe,
    and Pool.terminate then waited for the rest for ever. Should the main process die, the workers
    read the end of the pool's pipe and exit."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*init_args)


def _encode_record(record: Record) -> tuple:
    """-> (file index, line, input bytes, problem, fatal, {key: (ids, sentence lengths)}); the dict is
    None for a blank jsonl line, which is no record."""
    tokenizer, keys, append_eod, dtype = _STATE
    index, line, kind, payload = record
    size = len(payload) if isinstance(payload, bytes) else sum(len(str(v)) for v in payload.values())
    if kind == "json" and not payload.strip():
        return index, line, size, None, None, None
    try:
        fields = decode_record(kind, payload, keys)
    except BadRecord as problem:
        return index, line, size, str(problem), None, {}
    except DataError as fatal:
        return index, line, size, None, str(fatal), {}
    encoded = {}
    for key in keys:
        text = fields[key]
        ids: list[int] = []
        lengths: list[int] = []
        for sentence in text if isinstance(text, list) else [text]:
            sentence_ids = tokenizer.encode(sentence)
            if sentence_ids:
                ids.extend(sentence_ids)
                lengths.append(len(sentence_ids))
        if ids and append_eod:
            ids.append(tokenizer.eod_id)
            lengths[-1] += 1
        encoded[key] = (np.asarray(ids, dtype=dtype), lengths)
    return index, line, size, None, None, encoded


def _encode_batch(batch: list[Record]) -> list[tuple]:
    return [_encode_record(record) for record in batch]


def _batches(records: Iterator[Record], slots: Optional[threading.Semaphore], stop: threading.Event) -> Iterator[list]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) == BATCH_RECORDS:
            while slots is not None and not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield batch
            batch = []
    if batch:
        yield batch


def _watched(results: IMapIterator, pool: Pool, poll: float = 1.0) -> Iterator[list]:
    """``imap``'s results in order, or a DataError when a worker process died (the out-of-memory killer
    on a huge document, a crash in the tokenizer's C code): Pool starts a replacement, but the dead
    worker's batch is lost and ``imap`` would wait for it for ever, the partial files left in place.
    Pool's public API neither reports a lost task nor exposes its workers, so this reads the private
    ``Pool._pool`` (its live worker processes; a test covers it across Python upgrades): a changed set
    of worker ids means one died. (ProcessPoolExecutor reports a dead worker, but its ``map`` submits
    the whole input at once.)"""
    started = {process.pid for process in pool._pool}  # now, not at the first result: a worker may die before

    def in_order() -> Iterator[list]:
        while True:
            try:
                yield results.next(timeout=poll)
            except StopIteration:
                return
            except multiprocessing.TimeoutError:
                if {process.pid for process in pool._pool} != started:
                    raise DataError("A tokenizer worker process died (killed for lack of memory, or a crash in the "
                                    "tokenizer), and its records with it; nothing was written. Use fewer --workers or "
                                    "a machine with more memory, or leave out the huge documents.") from None

    return in_order()


@dataclass
class PreprocessReport:
    """Totals of one run; ``summary()`` is what the tool prints at the end."""

    prefixes: list[str]
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    blank_lines: int = 0  # skipped: no record
    bad: int = 0
    bad_locations: list[str] = field(default_factory=list)
    empty_fields: dict[str, int] = field(default_factory=dict)  # per key: written as zero-length documents

    def summary(self) -> str:
        rate = self.documents / max(self.seconds, 1e-9)
        lines = [
            f"Done: {self.documents} documents, {self.tokens} tokens, {self.input_bytes / 1e6:.1f} MB in "
            f"{self.seconds:.1f} s ({rate:.0f} docs/s, {self.input_bytes / 1e6 / max(self.seconds, 1e-9):.2f} MB/s).",
        ]
        if self.empty_fields:
            counts = ", ".join(f"{key} {count}" for key, count in self.empty_fields.items())
            lines.append(f"Empty fields, written as zero-length documents (as Megatron-LM does): {counts}.")
        lines.append(f"Skipped: {self.blank_lines} blank lines, {self.bad} bad records.")
        lines += [f"  bad record: {where}" for where in self.bad_locations]
        if self.bad > len(self.bad_locations):
            lines.append(f"  ... and {self.bad - len(self.bad_locations)} more")
        lines += [f"Wrote {prefix}.bin/.idx" for prefix in self.prefixes]
        return "\n".join(lines)

    def check_usable(self, hint: str) -> None:
        """Raise (before the outputs are finalized) when every record was bad: an empty prefix would
        only fail later, in the trainer."""
        if self.bad and not self.documents:
            raise DataError(f"None of the {self.bad} records could be used (the first: {self.bad_locations[0]}); "
                            f"{hint}. Nothing was written.")


class Progress:
    """A log line every ``interval`` records: documents/s, MB/s, tokens so far, and ETA when the input
    size is known (uncompressed inputs)."""

    def __init__(self, interval: int, inputs: Sequence[InputFile], log: Callable[[str], None]) -> None:
        plain = not any(item.compressed for item in inputs)
        self.interval, self.log = interval, log
        self.total_bytes = sum(item.size for item in inputs) if plain else None
        self.start = time.time()

    def __call__(self, report: PreprocessReport, records: int) -> None:
        if self.interval <= 0 or not records or records % self.interval:
            return
        elapsed = max(time.time() - self.start, 1e-9)
        line = (
            f"Processed {records} documents ({records / elapsed:.0f} docs/s, "
            f"{report.input_bytes / elapsed / 1e6:.2f} MB/s), {report.tokens} tokens"
        )
        if self.total_bytes:
            done = min(report.input_bytes / self.total_bytes, 1.0)
            eta = elapsed * (1 - done) / max(done, 1e-9)
            line += f", {100 * done:.1f}% of input, ETA {eta:.0f} s"
        self.log(line)


def check_eod(tokenizer: Tokenizer, tokenizer_model: str | os.PathLike) -> None:
    """--append-eod needs an end-of-text id to separate documents with: a tokenizer without one (a Hugging
    Face directory without eos_token, a sentencepiece model trained with eos_id=-1) gives None or -1,
    which failed inside the workers with a TypeError or an OverflowError."""
    eod = tokenizer.eod_id
    if eod is None or eod < 0:
        raise DataError(f"--append-eod: tokenizer '{tokenizer_model}' has no end-of-text (eos) token to end documents "
                        "with; drop --append-eod, or use a tokenizer with one (data_tools/train_tokenizer.py makes one).")


def preprocess(
    input: str | Sequence[str],
    output_prefix: str,
    tokenizer_model: str,
    tokenizer_type: Optional[str] = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 1000,
    strict: bool = False,
    log: Callable[[str], None] = print,
) -> PreprocessReport:
    """Tokenize ``input`` into ``{output_prefix}_{key}_document.bin/.idx`` for every key; see the module doc."""
    from megatron.core.datasets.indexed_dataset import DType

    start = time.time()
    repeated = sorted({key for key in json_keys if list(json_keys).count(key) > 1})
    if repeated:
        raise DataError(f"--json-keys names {', '.join(map(repr, repeated))} more than once; each key gets one prefix, list it once.")
    tokenizer = load_tokenizer(tokenizer_model, tokenizer_type)
    if append_eod:
        check_eod(tokenizer, tokenizer_model)
    inputs: list[InputFile] = list_inputs(input)
    check_keys(inputs, json_keys)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    init_args = (str(tokenizer_model), tokenizer_type, tuple(json_keys), append_eod, dtype)
    prefixes = [document_prefix(output_prefix, key) for key in json_keys]
    report = PreprocessReport(prefixes, empty_fields=dict.fromkeys(json_keys, 0))
    progress = Progress(log_interval, inputs, log)
    log(f"Tokenizing {len(inputs)} input file(s) with {workers} worker(s) into {', '.join(prefixes)}")

    stop = threading.Event()
    slots = threading.Semaphore(workers * BATCHES_IN_FLIGHT_PER_WORKER) if workers > 1 else None
    batches = _batches(iter_records(inputs, json_keys), slots, stop)
    with contextlib.ExitStack() as stack:
        # The pool first: its workers are forked before atomic_builders installs its SIGTERM handler. A
        # worker forked with it could lose Pool.terminate's SIGTERM (arriving before the at-fork reset)
        # and the pool would wait for it for ever.
        if workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=init_args))
            stack.callback(stop.set)  # runs before the pool terminates: the feeder must not block
            results = _watched(pool.imap(_encode_batch, batches, chunksize=1), pool)
        else:
            _init_worker(*init_args)
            results = map(_encode_batch, batches)
        builders = dict(zip(json_keys, stack.enter_context(atomic_builders([(p, dtype) for p in prefixes]))))
        records = 0
        for batch in results:
            if slots is not None:
                slots.release()
            for index, line, size, problem, fatal, encoded in batch:
                records += 1
                report.input_bytes += size
                progress(report, records)  # also when this record is bad or blank
                where = f"{inputs[index].path}:{line}"
                if fatal and not report.documents:
                    raise DataError(f"{where}: {fatal}")  # no record had the key so far: --json-keys is wrong
                problem = problem or fatal
                if problem:
                    if strict:
                        raise DataError(f"{where}: {problem} (--strict stops at the first bad record; without it, bad records are skipped and reported)")
                    report.bad += 1
                    if len(report.bad_locations) < MAX_REPORTED:
                        report.bad_locations.append(f"{where}: {problem}")
                    continue
                if encoded is None:
                    report.blank_lines += 1
                    continue
                for key, (ids, lengths) in encoded.items():  # every key, so that the prefixes stay aligned
                    builders[key].add_document(ids, lengths)
                    report.tokens += len(ids)
                    report.empty_fields[key] += not lengths
                report.documents += 1
        report.check_usable("check the input format and --json-keys")
    report.seconds = time.time() - start
    return report
