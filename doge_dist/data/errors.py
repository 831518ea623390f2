"""The one exception type for bad data, tokenizer or blend input, how the data tools report it, and the
small helpers their command lines share."""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Callable

WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a full disk, a file size limit (ulimit -f), a quota


class DataError(ValueError):
    """Input the data pipeline cannot use; the message names the file (and line), the problem and the fix."""


def is_write_failure(error: BaseException) -> bool:
    """A write that failed for lack of space: an OSError with one of ``WRITE_ERRNOS``, or the I/O error
    of a Rust writer (safetensors, tokenizers), which says only "... (os error 28)"."""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    return any(f"(os error {number})" in str(error) for number in WRITE_ERRNOS)


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for a count flag: a value below ``minimum`` (0 workers, -1 samples) would
    otherwise be taken as is and fail later with a traceback, or be silently treated as another value."""
    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    count.__name__ = "int"  # argparse names the type in "invalid int value: ..."
    return count


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> Path:
    """An output directory that is an existing file fails only when the first file is written into it,
    after the long work and with a traceback: refuse it before."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} '{path}' is a file, not a directory: name a new or existing directory to write into.")
    return path


def log_to_stderr(line: str) -> None:
    """Progress lines go to stderr, as Megatron-LM's tools do; stdout keeps the summary."""
    print(line, file=sys.stderr, flush=True)


def run_tool(work: Callable[[], str], errors: tuple[type[BaseException], ...] = (DataError,)) -> int:
    """A data tool's exit code: ``work()`` returns the summary printed on stdout (0); a bad-input error
    prints one ``error: ...`` paragraph on stderr instead of a traceback (1); Ctrl-C one line (130, as
    a shell reports SIGINT; the tools' partial outputs are removed as the interrupt unwinds)."""
    try:
        summary = work()
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    print(summary)
    return 0
