"""The embedded sample corpus is deterministic, split, and real prose."""
from __future__ import annotations

import json
import os
import re

import pytest
from data_helpers import StopAtRename, makefile_target

from doge_dist.data.sample_corpus import build_corpus, is_valid_split


def test_corpus_is_deterministic_and_split(tmp_path) -> None:
    sources = ("pydoc_topics", "json")  # a slice of the default sources, to stay fast
    first = build_corpus(tmp_path / "a", sources, valid_percent=10)
    build_corpus(tmp_path / "b", sources, valid_percent=10)
    for split in ("train", "valid"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        assert first[split]["documents"] > 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert all(not is_valid_split(row["source"], 10) for row in rows)
    words = " ".join(row["text"] for row in rows).split()
    assert sum(w.lower() in {"the", "a", "is", "of", "to"} for w in words) / len(words) > 0.05  # English prose
    assert not list(tmp_path.glob("*/*.partial"))


def test_default_corpus_has_at_least_5_mb_of_prose(tmp_path) -> None:
    """The embedded default corpus (all sources, as make demo builds it) is large enough to pretrain on."""
    report = build_corpus(tmp_path / "default")
    size = sum((tmp_path / "default" / f"{split}.jsonl").stat().st_size for split in ("train", "valid"))
    assert size >= 5 * 2**20, report
    assert report["valid"]["documents"] > 0


def test_a_build_stopped_between_its_renames_leaves_no_corpus_make_takes_as_complete(tmp_path, monkeypatch) -> None:
    """make builds the corpus when its target (train.jsonl) is missing: train.jsonl was renamed first, so a
    build stopped before valid.jsonl's rename left a corpus make took as complete (and an old
    valid.jsonl, or none). The target goes first and comes back last."""
    target = makefile_target(r"^CORPUS := \$\(DATA\)/sample_corpus/(\S+)$")
    assert target == "train.jsonl"
    sources = ("pydoc_topics", "json")
    build_corpus(tmp_path, sources, valid_percent=10)  # an earlier, complete corpus
    monkeypatch.setattr(os, "replace", StopAtRename(at=2))
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path, sources, valid_percent=10)
    assert not (tmp_path / target).exists()


@pytest.mark.parametrize("sources, valid_percent, output, message", [
    (("pydoc_topics", "nonexistent_pkg_xyz"), 10, "dir", "--sources 'nonexistent_pkg_xyz' is not an installed package"),
    (("pydoc_topics", "../x"), 10, "dir", "--sources '../x' is not an installed package"),
    (("pydoc_topics",), 150, "dir", "--valid-percent 150 is not in [0, 100)"),
    (("pydoc_topics",), -1, "dir", "--valid-percent -1 is not in [0, 100)"),
    (("pydoc_topics",), 10, "file", "is a file, not a directory"),
])
def test_bad_arguments_are_refused_before_any_file_is_written(sources, valid_percent, output, message, tmp_path) -> None:
    """An unknown source was a ModuleNotFoundError traceback after the sources before it were written,
    with the .partial files left; --valid-percent 150 wrote an empty train.jsonl; a file as the output a traceback."""
    from doge_dist.data import DataError

    out = tmp_path / "out"
    if output == "file":
        out.write_text("x")
    with pytest.raises(DataError, match=re.escape(message)):
        build_corpus(out, sources, valid_percent=valid_percent)
    assert out.is_file() if output == "file" else not out.exists()


def test_a_source_failing_half_way_leaves_no_partial_files(tmp_path, monkeypatch) -> None:
    """A build stopped in the middle of the walk (an error, Ctrl-C) removes its .partial files."""
    from doge_dist.data import sample_corpus

    def failing(sources):
        yield "pydoc_topics:x", "some text"
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_corpus, "iter_documents", failing)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path, ("pydoc_topics",), valid_percent=10)
    assert list(tmp_path.iterdir()) == []
