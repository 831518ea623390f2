"""merge_datasets: concatenation with megatron-core's add_index."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import assets, quiet, write_jsonl
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from doge_dist.data import DataError, preprocess
from doge_dist.data.indexed import merge_prefixes

ROOT = Path(__file__).resolve().parents[1]


def test_merge_is_the_concatenation(tmp_path) -> None:
    other = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in assets().texts("valid")])
    preprocess(other, str(tmp_path / "b"), str(assets().tokenizer_model), append_eod=True, log=quiet)
    parts = [assets().train_prefix, str(tmp_path / "b_text_document")]
    result = subprocess.run([sys.executable, str(ROOT / "data_tools" / "merge_datasets.py"), "--input", *parts,
                             "--output-prefix", str(tmp_path / "merged")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    merged = IndexedDataset(str(tmp_path / "merged"))
    expected = [seq.tolist() for part in parts for seq in IndexedDataset(part)]
    assert [merged[i].tolist() for i in range(len(merged))] == expected
    assert Path(str(tmp_path / "merged") + ".bin").read_bytes() == b"".join(Path(p + ".bin").read_bytes() for p in parts)
    progress = [line for line in result.stderr.splitlines() if line.startswith("merged ")]
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"] and "MB/s, ETA 0 s)" in progress[-1]


def test_merge_keeps_zero_length_documents(tmp_path) -> None:
    """preprocess_data.py writes an empty field as a zero-length document; merged, every document keeps its place."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": ""}, {"text": "three"}])
    preprocess(path, str(tmp_path / "a"), str(assets().tokenizer_model), append_eod=True, log=quiet)
    part, again = str(tmp_path / "a_text_document"), str(tmp_path / "again")
    for suffix in (".bin", ".idx"):
        shutil.copy(part + suffix, again + suffix)
    merge_prefixes([part, again], str(tmp_path / "merged"), log=quiet)
    assert IndexedDataset(str(tmp_path / "merged")).document_indices.tolist() == [0, 1, 1, 2, 3, 3, 4]


def test_merge_refuses_its_own_output_as_input(tmp_path, monkeypatch) -> None:
    """Also spelled differently: merging a directory again into ./DIR/merged must not read the old merged pair."""
    (tmp_path / "parts").mkdir()
    for suffix in (".bin", ".idx"):
        Path(str(tmp_path / "parts" / "a") + suffix).write_bytes(Path(assets().train_prefix + suffix).read_bytes())
    monkeypatch.chdir(tmp_path)
    merge_prefixes(["parts/a"], "parts/merged", log=quiet)
    with pytest.raises(DataError, match="is also an input"):
        merge_prefixes(["parts/a", "parts/merged"], "./parts/merged", log=quiet)


def test_merge_refuses_mixed_dtypes(tmp_path) -> None:
    wide = str(tmp_path / "wide")
    builder = IndexedDatasetBuilder(wide + ".bin", dtype=np.int32)
    builder.add_document(np.array([1, 2, 3]), [3])
    builder.finalize(wide + ".idx")
    with pytest.raises(DataError, match="different token dtypes"):
        merge_prefixes([assets().train_prefix, wide], str(tmp_path / "out"))
    assert not IndexedDataset.exists(str(tmp_path / "out"))


@pytest.mark.parametrize("spelling", ["prefix and prefix.idx", "directory and a prefix in it"])
def test_merge_refuses_a_prefix_named_twice(tmp_path, spelling) -> None:
    """`--input parts/a parts/a.idx`, or `--input parts parts/a`, merged the prefix twice without a word."""
    (tmp_path / "parts").mkdir()
    prefix = str(tmp_path / "parts" / "a")
    for suffix in (".bin", ".idx"):
        shutil.copy(assets().train_prefix + suffix, prefix + suffix)
    inputs = [prefix, prefix + ".idx"] if spelling.startswith("prefix") else [str(tmp_path / "parts"), prefix]
    result = subprocess.run([sys.executable, str(ROOT / "data_tools" / "merge_datasets.py"), "--input", *inputs,
                             "--output-prefix", str(tmp_path / "merged")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: Prefix '{prefix}' is named twice in --input; list each prefix once" in result.stderr
    assert "larger weight in data.train_data" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


def test_a_bin_without_its_idx_in_an_input_directory_is_refused(tmp_path) -> None:
    """`--input DIR` merged the pairs it found by their .idx: a .bin whose .idx is missing (a copy cut
    short) was left out of the merge without a word (Megatron-LM's tool asserts)."""
    (tmp_path / "parts").mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(assets().train_prefix + suffix, tmp_path / "parts" / f"a{suffix}")
    shutil.copy(assets().train_prefix + ".bin", tmp_path / "parts" / "b.bin")
    result = subprocess.run([sys.executable, str(ROOT / "data_tools" / "merge_datasets.py"), "--input", str(tmp_path / "parts"),
                             "--output-prefix", str(tmp_path / "merged")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"holds {tmp_path / 'parts' / 'b.bin'} without its .idx" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]
