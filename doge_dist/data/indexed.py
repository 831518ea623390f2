"""Megatron .bin/.idx pairs: write them atomically, and check them before training.

Writing uses megatron-core's ``IndexedDatasetBuilder`` (what Megatron-LM's tool uses), pointed at
``*.partial`` files that are renamed only when the index is complete: an interrupted run never
leaves a prefix that ``IndexedDataset.exists`` accepts, and Ctrl-C, SIGTERM or a failed write (a full
disk) removes the partial files.

Checking is by hand because megatron-core's reader only ``assert``s (or reads garbage) on a bad
file: ``validate_prefix`` checks the header, the index size, the document index, the sequence
pointers against the .bin size and, optionally, every token id against the vocabulary, and raises
a ``DataError`` that names the file and the fix. The arrays themselves are read by megatron-core.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Type

import numpy as np

from doge_dist.data.errors import DataError, is_write_failure

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
SCAN_CHUNK_TOKENS = 1 << 26
PREPROCESS_TOOL = "data_tools/preprocess_data.py"  # what writes a pretraining .bin/.idx pair


def document_prefix(output_prefix: str, key: str = "text") -> str:
    """The prefix Megatron-LM's tool writes for a json key: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


def _exit_on_sigterm(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def _default_sigterm_in_forked_child() -> None:
    """A forked child (a preprocessing pool worker) does not inherit ``_exit_on_sigterm``: Pool.terminate
    stops workers with SIGTERM, which a Python handler runs only between bytecodes, so a worker still
    starting up or blocked in C would never die and the pool's join would wait for ever."""
    if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_forked_child)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While partial files exist, a SIGTERM that would kill the process outright (the default action)
    raises SystemExit(143) instead, so they are removed; a handler the program installed is kept."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_builders(outputs: Sequence[tuple[str, Type[np.number]]]) -> Iterator[list]:
    """Yield one megatron-core ``IndexedDatasetBuilder`` per (prefix, dtype), whose files appear under
    their prefixes only on success (also when the process is stopped with SIGTERM: ``kill``, a
    scheduler's time limit). Every index is written before any file is renamed, so neither a failure (a full
    disk) nor a kill leaves one new prefix beside an old one that belonged with it (chat tokens and loss mask)."""
    partials = [(Path(prefix + ".bin.partial"), Path(prefix + ".idx.partial")) for prefix, _ in outputs]
    written = " and ".join(f"{prefix}.bin/.idx" for prefix, _ in outputs)
    builders = []
    with _sigterm_unwinds():
        try:
            for (_, dtype), (partial_bin, _) in zip(outputs, partials):
                builders.append(_open_builder(partial_bin, dtype, written))
            yield builders
            for builder, (_, partial_idx) in zip(builders, partials):
                builder.finalize(str(partial_idx))
        except BaseException as error:
            for builder in builders:
                with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                    builder.data_file.close()
            for path in (path for pair in partials[: len(builders)] for path in pair):
                path.unlink(missing_ok=True)
            if is_write_failure(error):
                raise DataError(f"Writing {written} failed: {error} (a full disk or a file size limit?). Nothing was "
                                "written; files already there are untouched.") from error
            raise
    # Every old .idx goes first, so that no stale index pairs with a new .bin and a kill in here never leaves
    # an old prefix beside a new one, and the new ones come last: a prefix with its .idx is complete (the
    # Makefile's target; a stopped run is redone).
    for prefix, _ in outputs:
        Path(prefix + ".idx").unlink(missing_ok=True)
    for (prefix, _), (partial_bin, _) in zip(outputs, partials):
        os.replace(partial_bin, prefix + ".bin")
    for (prefix, _), (_, partial_idx) in zip(outputs, partials):
        os.replace(partial_idx, prefix + ".idx")


def _open_builder(partial_bin: Path, dtype: Type[np.number], written: str):
    """A megatron-core builder writing ``partial_bin``; a place this process cannot write (a read-only
    directory, a path under a file) is a ``DataError`` before any input is read."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    try:
        partial_bin.parent.mkdir(parents=True, exist_ok=True)
        return IndexedDatasetBuilder(str(partial_bin), dtype=dtype)
    except OSError as error:
        if is_write_failure(error):
            raise
        raise DataError(f"Cannot write {written}: {error}; choose another --output-prefix, in a directory this "
                        "user can write.") from None


@contextlib.contextmanager
def atomic_builder(prefix: str, dtype: Type[np.number]) -> Iterator:
    """``atomic_builders`` for one prefix: yields its builder."""
    with atomic_builders([(prefix, dtype)]) as (builder,):
        yield builder


@dataclass
class PrefixInfo:
    """What ``validate_prefix`` learned about a .bin/.idx pair."""

    prefix: str
    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int
    max_token: Optional[int]  # None when token ids were not scanned
    sequence_lengths: np.ndarray


def _read_header(idx_path: Path, fix: str) -> tuple[np.dtype, int, int]:
    from megatron.core.datasets.indexed_dataset import DType

    with open(idx_path, "rb") as stream:
        header = stream.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise DataError(f"'{idx_path}' is truncated ({len(header)} bytes, the header alone is {HEADER_BYTES}); {fix}.")
    if header[:9] != INDEX_HEADER:
        raise DataError(f"'{idx_path}' is not a Megatron index file (wrong magic {header[:9]!r}); {fix}.")
    version = struct.unpack("<Q", header[9:17])[0]
    if version != INDEX_VERSION:
        raise DataError(f"'{idx_path}' has index version {version}; only version {INDEX_VERSION} is supported; {fix}.")
    code = header[17]
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except ValueError:
        raise DataError(f"'{idx_path}' names an unknown token dtype code {code}; {fix}.") from None
    sequences, documents = struct.unpack("<QQ", header[18:34])
    return dtype, sequences, documents


def validate_prefix(prefix: str, vocab_size: Optional[int] = None, scan_tokens: bool = True,
                    tool: str = PREPROCESS_TOOL, scans: Optional[Path] = None) -> PrefixInfo:
    """Check a .bin/.idx pair and return its shape; raise ``DataError`` naming the file on any damage
    and ``tool``, the command that writes such a pair (chat data: ``preprocess_chat.py --kind ...``).

    With ``vocab_size`` and ``scan_tokens`` every token id is read (chunked, memory-mapped) and
    compared with the vocabulary, so an id the embedding cannot hold fails here, not on step N;
    ``scans`` remembers the result (``largest_token``).
    """
    fix = f"re-create it with {tool}"
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    missing = [str(p) for p in (bin_path, idx_path) if not p.is_file()]
    if missing:
        hint = " (pass the prefix without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
        raise DataError(f"Data prefix '{prefix}'{hint}: missing {' and '.join(missing)}{_written_from(prefix)}; "
                        f"{fix} or fix the path.")
    dtype, sequences, documents = _read_header(idx_path, fix)
    expected_idx = HEADER_BYTES + sequences * (4 + 8) + documents * 8
    actual_idx = idx_path.stat().st_size
    if actual_idx != expected_idx:
        raise DataError(
            f"'{idx_path}' is {actual_idx} bytes but its header promises {sequences} sequences and {documents} "
            f"document boundaries ({expected_idx} bytes): truncated or not written to the end; {fix}."
        )
    if documents < 1:
        raise DataError(f"'{idx_path}' has no document index; {fix}.")
    if not _document_index_ok(idx_path, sequences, documents):
        raise DataError(f"'{idx_path}' has a document index that is not increasing from 0 to {sequences}; {fix}.")
    dataset = IndexedDataset(prefix, mmap=False)  # only the index is read here; an empty .bin cannot be mmapped
    lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    pointers = np.asarray(dataset.index.sequence_pointers)
    if np.any(lengths < 0):
        raise DataError(f"'{idx_path}' has negative sequence lengths; {fix}.")
    tokens = int(lengths.sum())
    expected_pointers = np.concatenate([[0], np.cumsum(lengths[:-1])]) * dtype.itemsize if sequences else pointers
    if not np.array_equal(pointers, expected_pointers):
        raise DataError(f"'{idx_path}' has sequence pointers that do not follow its lengths; {fix}.")
    expected_bin = tokens * dtype.itemsize
    actual_bin = bin_path.stat().st_size
    if actual_bin != expected_bin:
        raise DataError(
            f"'{bin_path}' is {actual_bin} bytes but '{idx_path}' describes {tokens} {dtype.name} tokens "
            f"({expected_bin} bytes): the pair is truncated or mismatched; {fix}."
        )
    max_token = largest_token(bin_path, dtype, scans) if scan_tokens and tokens else None
    if vocab_size is not None and max_token is not None and max_token >= vocab_size:
        raise DataError(
            f"'{bin_path}' holds token id {max_token} but the tokenizer/model vocabulary has {vocab_size} ids: "
            f"it was tokenized with a different tokenizer. Re-run {tool} with the "
            "tokenizer of this run, or set data.tokenizer to the one the data was made with."
        )
    return PrefixInfo(prefix, dtype, sequences, documents - 1, tokens, max_token, lengths)


def _written_from(prefix: str) -> str:
    """A hint when ``prefix`` is a preprocessing run's --output-prefix, the classic wrong training prefix:
    the pairs that run wrote are ``{output-prefix}_{key}_document``."""
    written = sorted(path[: -len(".idx")] for path in glob.glob(document_prefix(glob.escape(prefix), "*") + ".idx"))
    if not written:
        return ""
    names = " or ".join(f"'{name}'" for name in written)
    return f" (the data tools write {{output-prefix}}_{{key}}_document: did you mean {names}?)"


def token_count(prefix: str) -> int:
    """Tokens in a prefix's .bin: its size over the token size its .idx header names (no scan of the
    lengths, so every rank can afford it); for a prefix ``validate_prefix`` passed."""
    dtype, _, _ = _read_header(Path(prefix + ".idx"), f"re-create it with {PREPROCESS_TOOL}")
    return Path(prefix + ".bin").stat().st_size // dtype.itemsize


def _document_index_ok(idx_path: Path, sequences: int, documents: int) -> bool:
    offset = HEADER_BYTES + sequences * (4 + 8)
    index = np.memmap(idx_path, dtype=np.int64, mode="r", offset=offset, shape=(documents,))
    return bool(index[0] == 0 and index[-1] == sequences and np.all(np.diff(index) >= 0))


def largest_token(bin_path: Path, dtype: np.dtype, scans: Optional[Path] = None) -> int:
    """The largest token id in a .bin: a read of every token, minutes for a terabyte on a network file
    system at every start and Slurm requeue. ``scans`` (a JSON file in the data cache) remembers it
    per file with the file's size and modification time, so the same data is read once; a rewritten
    file is read again. One writer (the checks run on rank 0), replaced whole."""
    key, stamp = str(bin_path.resolve()), list(file_stamp(bin_path))
    known = _read_scans(scans) if scans else {}
    if known.get(key, {}).get("stamp") == stamp:
        return known[key]["max_token"]
    value = _max_token(bin_path, dtype)
    if scans:
        known[key] = {"stamp": stamp, "max_token": value}
        scans.parent.mkdir(parents=True, exist_ok=True)
        partial = scans.with_name(scans.name + f".{os.getpid()}.partial")
        partial.write_text(json.dumps(known, indent=1))
        os.replace(partial, scans)
    return value


def file_stamp(path: Path) -> tuple[int, int]:
    """(size, modification time in ns): what tells a file written again from the one a result was
    computed from (a token scan here, DPO's reference table)."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _read_scans(scans: Path) -> dict:
    try:
        return json.loads(scans.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: scan again
        return {}


SCAN_LOG_SECONDS = 10.0  # a progress line at most this often while a large .bin is scanned


def _max_token(bin_path: Path, dtype: np.dtype, log: Callable[[str], None] = print) -> int:
    """The largest id, read in chunks; a progress line (rate, ETA) every ``SCAN_LOG_SECONDS`` while the
    other ranks wait."""
    data = np.memmap(bin_path, dtype=dtype, mode="r")
    largest, start = 0, time.time()
    last = start
    for i in range(0, data.shape[0], SCAN_CHUNK_TOKENS):
        largest = max(largest, int(data[i : i + SCAN_CHUNK_TOKENS].max()))
        now = time.time()
        if now - last >= SCAN_LOG_SECONDS:
            done = min(i + SCAN_CHUNK_TOKENS, data.shape[0])
            rate = done / max(now - start, 1e-9)
            log(f"[doge-dist] checking the token ids of {bin_path}: {100 * done / data.shape[0]:.0f}% "
                f"({rate * dtype.itemsize / 1e6:.0f} MB/s, ETA {(data.shape[0] - done) / rate:.0f} s; remembered afterwards)")
            last = now
    return largest


def merge_prefixes(prefixes: list[str], output_prefix: str, log: Callable[[str], None] = print) -> PrefixInfo:
    """Concatenate .bin/.idx pairs in order with megatron-core's ``IndexedDatasetBuilder.add_index``;
    a log line after each input with the rate and ETA. A prefix named twice (also spelled differently:
    ``a`` and ``a.idx``, a directory and a prefix in it) is refused: its documents would be in the
    output twice, silently."""
    if not prefixes:
        raise DataError("Nothing to merge: pass at least one input prefix.")
    seen: set[str] = set()
    for prefix in prefixes:
        real = os.path.realpath(prefix)
        if real in seen:
            raise DataError(f"Prefix '{prefix}' is named twice in --input; list each prefix once (to upsample "
                            "it, give it a larger weight in data.train_data).")
        seen.add(real)
    infos = [validate_prefix(prefix, scan_tokens=False) for prefix in prefixes]
    dtypes = {info.dtype for info in infos}
    if len(dtypes) > 1:
        listing = ", ".join(f"{info.prefix} ({info.dtype.name})" for info in infos)
        raise DataError(f"Cannot merge prefixes with different token dtypes: {listing}; re-tokenize with one tokenizer.")
    if any(os.path.realpath(prefix) == os.path.realpath(output_prefix) for prefix in prefixes):
        raise DataError(f"--output-prefix {output_prefix} is also an input; choose a new prefix.")
    sizes = [Path(prefix + ".bin").stat().st_size for prefix in prefixes]
    start, done = time.time(), 0
    with atomic_builder(output_prefix, infos[0].dtype.type) as builder:
        for number, (prefix, size) in enumerate(zip(prefixes, sizes), 1):
            builder.add_index(prefix)
            done += size
            rate = done / max(time.time() - start, 1e-9)
            log(f"merged {number}/{len(prefixes)} {prefix}: {done / 1e6:.1f} of {sum(sizes) / 1e6:.1f} MB "
                f"({rate / 1e6:.1f} MB/s, ETA {(sum(sizes) - done) / max(rate, 1e-9):.0f} s)")
    return validate_prefix(output_prefix, scan_tokens=False)
