"""Streaming readers for raw text inputs: jsonl, jsonl.gz, parquet, plain text, datasets directories.

Why by hand: Megatron-LM's tool reads one jsonl file; ``datasets`` reads everything but loads each
file into an Arrow cache first (disk and time before the first token) and hides line numbers. Here
every record keeps its file and line, so a bad line is reported where it is, and nothing is read
ahead of the tokenizer workers. Raw jsonl lines are handed to the workers as bytes: JSON parsing and
UTF-8 decoding happen in parallel there (``decode_record``).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from doge_dist.data.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
PARQUET_SUFFIXES = (".parquet",)
DATA_STEMS = (".jsonl", ".json", ".txt", ".parquet")  # x.jsonl.zst: data, compressed in a form not read here
COMPRESSIONS = (".zst", ".zstd", ".bz2", ".xz", ".lzma", ".lz4", ".zip", ".7z", ".br", ".z", ".snappy")
ROW_BATCH = 1024
UTF8 = "utf-8-sig"  # UTF-8 that drops a leading byte order mark
# A split in a file or folder name, as the Hugging Face Hub lays them out (data/train-00000-of-00001.parquet, train/0000.parquet)
SPLIT_NAME = re.compile(r"(train|test|validation|valid|dev|eval)(?:[-_.]|$)", re.IGNORECASE)

# A record travels to a worker as (file index, line or row number, kind, payload):
# kind "json" -> payload is the raw line (bytes); "text" -> a paragraph (bytes); "row" -> a dict.
Record = tuple[int, int, str, Union[bytes, dict]]


class BadRecord(ValueError):
    """One record that cannot be used (skipped, or fatal with --strict)."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # jsonl | text | parquet | arrow

    @property
    def size(self) -> int:
        """Bytes on disk (compressed size for .gz/parquet/arrow)."""
        if self.path.is_dir():
            return sum(f.stat().st_size for f in self.path.glob("*.arrow"))
        return self.path.stat().st_size

    @property
    def compressed(self) -> bool:
        return self.kind in ("parquet", "arrow") or _gzipped(self.path)


def _gzipped(path: Path) -> bool:
    """A .gz file, whatever the case of its suffix: ``_kind`` takes ``x.jsonl.GZ`` as jsonl, so reading
    it uncompressed would turn every line into a bad record."""
    return path.suffix.lower() == ".gz"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir():
        return "arrow" if (path / "state.json").is_file() and (path / "dataset_info.json").is_file() else None
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("text", TEXT_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _refuse_unreadable(paths: Sequence[Path], spec: str | os.PathLike) -> None:
    """A data file in a compression this tool cannot read (``part-1.jsonl.zst``, ``.bz2``, ``.xz``) that a
    directory or pattern holds would otherwise be left out without a word, where naming it fails. Other files
    (x.parquet.lock, x.jsonl.bak, a Hub download's .cache metadata) are skipped, as before."""
    unreadable = sorted(str(path) for path in paths if path.suffix.lower() in COMPRESSIONS
                        and path.stem.lower().endswith(DATA_STEMS) and not path.is_dir())
    if unreadable:
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise DataError(f"--input '{spec}' holds {', '.join(unreadable[:3])}{more}, compressed in a form this tool cannot "
                        "read: decompress (or gzip) them, or name only the files to read.")


def _expand(path: Path) -> list[InputFile]:
    kind = _kind(path)
    if kind is not None:
        return [InputFile(path, kind)]
    if path.is_dir():
        found = []
        for directory, dirs, files in os.walk(path):
            _refuse_dataset_dict(Path(directory))
            dirs.sort()
            if _kind(Path(directory)) == "arrow":  # a save_to_disk folder inside: one input, not its .json metadata
                found.append(InputFile(Path(directory), "arrow"))
                dirs.clear()
                continue
            _refuse_unreadable([Path(directory, name) for name in files], path)
            for name in sorted(files):
                child = Path(directory, name)
                if _kind(child) is not None:
                    found.append(InputFile(child, _kind(child)))
        _refuse_mixed_splits(path, found)
        return found
    raise DataError(
        f"Input '{path}' is not a supported file: use .jsonl/.json(.gz), .txt(.gz), .parquet, "
        "a directory of those, or a datasets directory saved with save_to_disk."
    )


def _refuse_dataset_dict(path: Path) -> None:
    """A DatasetDict folder holds several splits; reading them all would mix train and test."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(
            f"'{path}' is a datasets DatasetDict with splits {', '.join(splits)}; "
            f"pass one split directory, for example --input {path / (splits[0] if splits else 'train')}."
        )


def _refuse_mixed_splits(directory: Path, found: Sequence[InputFile]) -> None:
    """A directory of several splits (a Hugging Face Hub download: train-00000-of-00001.parquet beside
    test-00000-of-00001.parquet, or train/ beside test/) read whole would mix the held-out data into
    training, as a DatasetDict folder would (``_refuse_dataset_dict``)."""
    splits: dict[str, Path] = {}  # split -> where its first file says so
    for item in found:
        path = item.path.relative_to(directory)
        for depth, name in enumerate(reversed(path.parts)):  # the file's own name first, then its folders upward
            match = SPLIT_NAME.match(name)
            if match:
                splits.setdefault(match.group(1).lower(), directory.joinpath(*path.parts[: len(path.parts) - depth]))
                break
    if len(splits) > 1:
        split = "train" if "train" in splits else next(iter(splits))
        where = splits[split]
        example = where if where.is_dir() else where.parent / f"{where.name[: len(split)]}*"
        raise DataError(
            f"'{directory}' holds several splits ({', '.join(splits)}); reading it whole would mix them. "
            f"Pass one split's files, for example --input '{example}'."
        )


def list_inputs(specs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[InputFile]:
    """Expand files, directories and glob patterns into a sorted, de-duplicated list of inputs. A path
    that exists is taken as it is, also when its name holds pattern characters (``part[1].jsonl``)."""
    specs = [str(specs)] if isinstance(specs, (str, os.PathLike)) else [str(spec) for spec in specs]
    files: list[InputFile] = []
    for spec in specs:
        if glob.has_magic(spec) and not Path(spec).exists():
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"--input pattern '{spec}' matches no files.")
            _refuse_unreadable(list(map(Path, matches)), spec)
            for match in matches:
                path = Path(match)
                files.extend(_expand(path) if path.is_dir() or _kind(path) else [])
        else:
            path = Path(spec)
            if not path.exists():
                raise DataError(f"--input '{spec}' does not exist.")
            files.extend(_expand(path))
    unique = list(_first_of_each_file(files))
    if not unique:
        raise DataError(f"--input {' '.join(specs)} contains no .jsonl/.txt/.parquet files or datasets directory.")
    return unique


def _first_of_each_file(files: Sequence[InputFile]) -> Iterator[InputFile]:
    """Each file once, where first named: a file given twice, also by two spellings (a directory given
    absolute and a file in it relative, a symlink), would be tokenized twice."""
    seen: set[Path] = set()
    for item in files:
        resolved = item.path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            yield item


def check_keys(inputs: Sequence[InputFile], keys: Sequence[str]) -> None:
    """Fail before any work when a columnar input lacks a --json-keys column (jsonl is checked per line)."""
    for item in inputs:
        if item.kind == "text" and len(keys) != 1:
            raise DataError(f"'{item.path}' is plain text: it has one field; pass a single --json-keys.")
        check_columns(item, keys, "Pass --json-keys with one of those.")


def columns_of(item: InputFile) -> Optional[list[str]]:
    """The column names of a parquet file or datasets directory, read from its schema; None for jsonl
    and text, whose keys are only known record by record."""
    if item.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(item.path).schema_arrow.names
        except _read_errors() as error:
            raise _unreadable(item, error, 0) from None
    if item.kind == "arrow":
        return list(json.loads((item.path / "dataset_info.json").read_text()).get("features", {}))
    return None


def check_columns(item: InputFile, keys: Sequence[str], advice: str) -> None:
    """A DataError naming the file, the columns it lacks and those it has (then ``advice``) when a
    columnar input lacks some of ``keys``: its rows would read as records without them (parquet) or
    fail inside ``datasets`` with a traceback (save_to_disk directories)."""
    columns = columns_of(item)
    missing = [key for key in keys if key not in columns] if columns is not None else []
    if missing:
        raise DataError(f"'{item.path}' has no column {', '.join(map(repr, missing))}; it has "
                        f"{', '.join(columns) or 'none'}. {advice}")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if _gzipped(path) else open(path, "rb")


def _paragraphs(stream) -> Iterator[tuple[int, bytes]]:
    """Blank-line separated blocks of a text file, with the line number each starts on."""
    block: list[bytes] = []
    start = 0
    for number, line in enumerate(stream, start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield start, b"".join(block).rstrip(b"\r\n")
            block = []
    if block:
        yield start, b"".join(block).rstrip(b"\r\n")


def _rows(item: InputFile, keys: Sequence[str]) -> Iterator[dict]:
    """The rows of a columnar input, with those of ``keys`` it has (chat data has more than one record format)."""
    keys = [key for key in keys if key in columns_of(item)]
    if item.kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(item.path).iter_batches(batch_size=ROW_BATCH, columns=keys):
            yield from batch.to_pylist()
    else:
        from datasets import load_from_disk

        dataset = load_from_disk(str(item.path)).select_columns(keys)
        for batch in dataset.iter(batch_size=ROW_BATCH):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                yield dict(zip(columns, values))


def _file_records(item: InputFile, keys: Sequence[str]) -> Iterator[tuple[int, str, Union[bytes, dict]]]:
    """(line or row number, kind, payload) of every record of one input."""
    if item.kind == "jsonl":
        with _open_binary(item.path) as stream:
            for number, line in enumerate(stream, start=1):
                yield number, "json", line
    elif item.kind == "text":
        with _open_binary(item.path) as stream:
            for number, block in _paragraphs(stream):
                yield number, "text", block
    else:
        for number, row in enumerate(_rows(item, keys), start=1):
            yield number, "row", row


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a truncated or damaged input raises while it is read: gzip's errors, pyarrow's."""
    import pyarrow

    return OSError, EOFError, zlib.error, pyarrow.ArrowException


def _unreadable(item: InputFile, error: BaseException, records: int) -> DataError:
    where = f" past its first {records} records" if records else ""
    return DataError(
        f"'{item.path}' cannot be read{where} ({type(error).__name__}: {error}): "
        "the file is truncated, damaged or unreadable; re-create it or leave it out of --input."
    )


def iter_records(inputs: Sequence[InputFile], keys: Sequence[str]) -> Iterator[Record]:
    """Yield every record of every input in order, reading lazily (memory stays flat); a file that
    cannot be read to its end raises a ``DataError`` naming it."""
    for index, item in enumerate(inputs):
        records = 0
        try:
            for number, kind, payload in _file_records(item, keys):
                yield index, number, kind, payload
                records += 1
        except _read_errors() as error:
            raise _unreadable(item, error, records) from None


def _check_text(key: str, value: Any) -> Union[str, list]:
    if isinstance(value, str):
        return check_unicode(value, f"field '{key}'")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        for number, item in enumerate(value, start=1):  # pre-split sentences, as Megatron-LM accepts
            check_unicode(item, f"field '{key}' item {number}")
        return value
    raise BadRecord(f"field '{key}' is {type(value).__name__}, not a string")


def check_unicode(text: str, what: str) -> str:
    """``text``, or BadRecord when it holds a lone UTF-16 surrogate: JSON's ``\\ud800`` escape without its
    pair decodes to a str that is no Unicode text, which no tokenizer can encode (sentencepiece and
    the Hugging Face tokenizers raise a RuntimeError or TypeError that names no record)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRecord(f"{what} holds a lone UTF-16 surrogate (\\u{ord(text[error.start]):04x} at character "
                        f"{error.start}), which is not Unicode text; fix or drop the record") from None
    return text


def decode_record(kind: str, payload: Union[bytes, dict], keys: Sequence[str]) -> dict[str, Union[str, list]]:
    """Turn one record into {key: text}; raises BadRecord for malformed input, DataError for a missing key.
    A UTF-8 byte order mark (what Windows tools write at the start of a file) is dropped."""
    if kind == "text":
        try:
            return {keys[0]: payload.decode(UTF8)}
        except UnicodeDecodeError as error:
            raise BadRecord(f"undecodable bytes (invalid UTF-8 at byte {error.start} of the paragraph)") from None
    if kind == "json":
        if not payload.strip():
            return {key: "" for key in keys}
        try:
            data = json.loads(payload.decode(UTF8))
        except UnicodeDecodeError as error:
            raise BadRecord(f"undecodable bytes (invalid UTF-8 at byte {error.start} of the line)") from None
        except json.JSONDecodeError as error:
            raise BadRecord(f"malformed JSON ({error.msg.removesuffix(' at')} at column {error.colno})") from None
        except RecursionError:  # e.g. 100,000 "[": json's decoder recurses once per level
            raise BadRecord("JSON nested too deeply to read") from None
        if not isinstance(data, dict):
            raise BadRecord(f"a JSON {type(data).__name__}, not an object")
    else:
        data = payload
    missing = [key for key in keys if key not in data]
    if missing:
        raise DataError(
            f"no key {', '.join(map(repr, missing))}; this record has keys {', '.join(map(repr, data)) or '(none)'}. "
            "Pass --json-keys with the key that holds the text."
        )
    return {key: _check_text(key, data[key]) if data[key] is not None else "" for key in keys}
