"""The embedded sample corpus: English documentation text that ships with Python and our dependencies.

Why: ``make demo`` and the tests need real prose on a machine with no network. Docstrings of the
standard library, the Python reference topics (``pydoc_data``) and the installed dependencies from
setup.py are such text. Files are walked in sorted order and duplicate docstrings are dropped, so
the corpus is byte-for-byte the same for the same Python and package versions. Each source file
becomes one document; a document goes to the validation split when a hash of its name says so,
which keeps the split stable when a package adds or removes files.
"""
from __future__ import annotations

import ast
import collections
import hashlib
import importlib.util
import json
import logging
import os
import sysconfig
import time
from pathlib import Path
from typing import Iterator

from .errors import DataError, check_output_dir

logger = logging.getLogger(__name__)

# Sources in the order they are written; "stdlib" and "pydoc_topics" ship with Python, the rest are
# install_requires of setup.py.
DEFAULT_SOURCES = ("pydoc_topics", "stdlib", "numpy", "torch", "datasets", "deepspeed", "megatron")
SKIP_DIRS = {"test", "tests", "testing", "idle_test", "__pycache__", "site-packages", "_vendor", "vendored"}
MIN_WORDS = 8


def _source_root(source: str) -> Path:
    if source == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    try:
        spec = importlib.util.find_spec(source)
    except ImportError:  # a relative name, or a dotted one whose parent package is missing
        spec = None
    if spec is None:
        raise DataError(f"--sources '{source}' is not an installed package (nor pydoc_topics or stdlib): pass installed "
                        "package names, or pip install -e . first for the default sources.")
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0] if locations else os.path.dirname(spec.origin))


def _prose(docstring: str) -> str:
    """Drop interactive-session lines (``>>>``/``...``): they are code, not prose."""
    lines = [line for line in docstring.splitlines() if not line.lstrip().startswith((">>>", "... "))]
    return "\n".join(lines).strip()


_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)


def _blocks(tree: ast.AST) -> Iterator[ast.AST]:
    """The statements (and except/case clauses) of ``tree``, in ``ast.walk``'s order: only they can hold a
    module, class or function, and an expression holds no statement, so leaving expressions out keeps
    the order of the rest (breadth first, each node's fields in order) as ast.walk has it. ast.walk
    visited every node, most of them expressions: more than half the time of a default corpus build."""
    todo = collections.deque([tree])
    while todo:
        node = todo.popleft()
        yield node
        for name in node._fields:
            value = getattr(node, name, None)
            if isinstance(value, list):
                todo.extend(item for item in value if isinstance(item, _BLOCKS))


def _file_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return []
    found = []
    for node in _blocks(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                text = _prose(text)
                if len(text.split()) >= MIN_WORDS:
                    found.append(text)
    return found


def iter_documents(sources: tuple[str, ...] = DEFAULT_SOURCES) -> Iterator[tuple[str, str]]:
    """Yield ``(name, text)`` per document, deterministically ordered and de-duplicated."""
    seen: set[bytes] = set()

    def fresh(text: str) -> bool:
        digest = hashlib.sha1(text.encode()).digest()
        if digest in seen:
            return False
        seen.add(digest)
        return True

    for source in sources:
        if source == "pydoc_topics":
            from pydoc_data.topics import topics

            for key in sorted(topics):
                text = topics[key].strip()
                if fresh(text):
                    yield f"pydoc_topics:{key}", text
            continue
        root = _source_root(source)
        for directory, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = Path(directory, name)
                texts = [t for t in _file_docstrings(path) if fresh(t)]
                if texts:
                    yield f"{source}:{path.relative_to(root).as_posix()}", "\n\n".join(texts)


def is_valid_split(name: str, valid_percent: float) -> bool:
    """Stable train/valid assignment from the document name alone."""
    bucket = int.from_bytes(hashlib.sha1(name.encode()).digest()[:4], "little") % 10000
    return bucket < valid_percent * 100


def check_arguments(out_dir: str | os.PathLike, sources: tuple[str, ...], valid_percent: float) -> Path:
    """Bad arguments fail before the walk over the sources (minutes for all of them), not after it or
    half-way through with a traceback: the output is a directory, every source exists and the split
    leaves documents for train.jsonl. Returns the output directory."""
    if not 0 <= valid_percent < 100:
        raise DataError(f"--valid-percent {valid_percent} is not in [0, 100): it is the share of documents that go to "
                        "valid.jsonl, and the rest make train.jsonl.")
    for source in sources:
        if source not in ("pydoc_topics", "stdlib"):
            _source_root(source)
    return check_output_dir(out_dir)


def build_corpus(
    out_dir: str | os.PathLike, sources: tuple[str, ...] = DEFAULT_SOURCES, valid_percent: float = 2.0
) -> dict[str, dict[str, int]]:
    """Write ``train.jsonl`` and ``valid.jsonl`` (``{"text", "source"}`` per line) under ``out_dir``.

    Files are written under temporary names and renamed at the end, so an interrupted build never
    leaves a corpus that looks complete: ``train.jsonl``, the Makefile's target, goes first and comes
    back last, after ``valid.jsonl``. Returns documents and bytes per split.
    """
    out = check_arguments(out_dir, sources, valid_percent)
    out.mkdir(parents=True, exist_ok=True)
    stats = {split: {"documents": 0, "bytes": 0} for split in ("train", "valid")}
    paths = {split: out / f"{split}.jsonl" for split in stats}
    partial = {split: out / f"{split}.jsonl.partial" for split in stats}
    start = last_log = time.time()
    handles = {split: open(partial[split], "w", encoding="utf-8") for split in stats}
    try:
        for name, text in iter_documents(sources):
            split = "valid" if is_valid_split(name, valid_percent) else "train"
            line = json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n"
            handles[split].write(line)
            stats[split]["documents"] += 1
            stats[split]["bytes"] += len(line.encode())
            if time.time() - last_log > 5:
                last_log = time.time()
                total = sum(s["bytes"] for s in stats.values())
                logger.info("%s: %.1f MB so far (%.1f MB/s)", name.split(":")[0], total / 1e6, total / 1e6 / (last_log - start))
    except BaseException:
        for file in partial.values():
            file.unlink(missing_ok=True)
        raise
    finally:
        for handle in handles.values():
            handle.close()
    paths["train"].unlink(missing_ok=True)  # an old train.jsonl must not pass for the new valid.jsonl's twin
    for split in ("valid", "train"):
        os.replace(partial[split], paths[split])
    return stats
