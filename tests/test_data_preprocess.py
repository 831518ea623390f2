"""preprocess_data: megatron-core reads what we write, with the ids and bytes Megatron-LM's tool gives."""
from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from data_helpers import StopAtRename, assets, makefile_target, quiet, tokenizer, write_jsonl
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from doge_dist.data import DataError, preprocess
from doge_dist.data.inputs import list_inputs

ROOT = Path(__file__).resolve().parents[1]


def read_prefix(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def read_documents(prefix: str) -> list[list[int]]:
    """Token ids per document: its sequences joined, none for a zero-length document."""
    dataset = IndexedDataset(prefix)
    return [[token for sequence in range(first, last) for token in dataset[sequence].tolist()]
            for first, last in itertools.pairwise(dataset.document_indices)]


def files_of(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def test_megatron_reads_tokens_equal_encode_plus_eod() -> None:
    texts, tok = assets().texts(), tokenizer()
    dataset = IndexedDataset(assets().train_prefix)
    assert dataset.index.dtype == np.uint16  # vocab < 65500
    assert len(dataset) == len(texts) and dataset.document_indices.tolist() == list(range(len(texts) + 1))
    assert read_prefix(assets().train_prefix) == [tok.encode(text) + [tok.eos_id] for text in texts]


def megatron_lm_write(input_jsonl: Path, output_prefix: str, model: Path, keys: tuple[str, ...] = ("text",)) -> None:
    """What Megatron-LM's tools/preprocess_data.py --append-eod does (its tokenizer builder, Encoder.encode,
    builder loop): every record is one document per key, an empty field a zero-length one."""
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

    args = Namespace(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(model), tokenizer_metadata=None,
                     tokenizer_sentencepiece_legacy=False, tokenizer_special_tokens=None)
    megatron_tokenizer = build_tokenizer(args)
    dtype = DType.optimal_dtype(megatron_tokenizer.vocab_size)
    builders = {key: IndexedDatasetBuilder(f"{output_prefix}_{key}_document.bin", dtype=dtype) for key in keys}
    for line in input_jsonl.read_text().splitlines():
        for key in keys:
            ids = megatron_tokenizer.tokenize(json.loads(line)[key])
            ids, lengths = (ids + [megatron_tokenizer.eod], [len(ids) + 1]) if ids else ([], [])
            builders[key].add_document(ids, lengths)
    for key in keys:
        builders[key].finalize(f"{output_prefix}_{key}_document.idx")


def test_byte_identical_to_megatron_lm_tool_and_worker_count(tmp_path) -> None:
    megatron_lm_write(assets().train_jsonl, str(tmp_path / "reference"), assets().tokenizer_model)
    reference = files_of(str(tmp_path / "reference_text_document"))
    assert files_of(assets().train_prefix) == reference  # written with workers=1
    preprocess(assets().train_jsonl, str(tmp_path / "two"), str(assets().tokenizer_dir), append_eod=True, workers=2, log=quiet)
    assert files_of(str(tmp_path / "two_text_document")) == reference  # 2 workers, HF tokenizer directory


def test_all_input_formats_give_the_same_tokens(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    texts = assets().texts("valid")
    expected = [tokenizer().encode(t) for t in texts]
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    half = len(texts) // 2
    write_jsonl(tmp_path / "dir" / "a.jsonl", [{"text": t} for t in texts[:half]])
    with gzip.open(tmp_path / "dir" / "sub" / "b.jsonl.gz", "wb") as out:
        out.writelines(json.dumps({"text": t}).encode() + b"\n" for t in texts[half:])
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "x.parquet", row_group_size=3)
    Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    plain = [" ".join(t.split()) for t in texts]  # in .txt, blank lines separate documents
    (tmp_path / "x.txt").write_text("\n\n".join(plain) + "\n")
    cases = {
        "dir": ([str(tmp_path / "dir")], expected),
        "glob": ([str(tmp_path / "dir" / "**" / "*.json*")], expected),
        "parquet": ([str(tmp_path / "x.parquet")], expected),
        "saved": ([str(tmp_path / "saved")], expected),
        "txt": ([str(tmp_path / "x.txt")], [tokenizer().encode(t) for t in plain]),
    }
    for name, (inputs, want) in cases.items():
        report = preprocess(inputs, str(tmp_path / name), str(assets().tokenizer_model), workers=1, log=quiet)
        assert read_prefix(str(tmp_path / f"{name}_text_document")) == want, name
        assert report.documents == len(want) and report.bad == 0


def test_several_json_keys_and_sentence_lists(tmp_path) -> None:
    tok = tokenizer()
    path = write_jsonl(tmp_path / "in.jsonl", [{"title": "A title", "body": ["First sentence.", "Second one."]}])
    preprocess(path, str(tmp_path / "out"), str(assets().tokenizer_model), json_keys=["title", "body"], append_eod=True, log=quiet)
    assert read_prefix(str(tmp_path / "out_title_document")) == [tok.encode("A title") + [tok.eod_id]]
    body = IndexedDataset(str(tmp_path / "out_body_document"))
    first, second = tok.encode("First sentence."), tok.encode("Second one.") + [tok.eod_id]
    assert [body[0].tolist(), body[1].tolist()] == [first, second]  # one sequence per sentence, one document
    assert body.document_indices.tolist() == [0, 2]


def test_several_json_keys_stay_aligned_when_fields_are_empty(tmp_path) -> None:
    """Document i of every key's prefix comes from record i: an empty field is a zero-length document
    (as Megatron-LM writes it, byte for byte), a bad record or a blank line is skipped for every key."""
    records = [{"title": "One", "body": "First body."}, {"title": "", "body": "Second body, no title."},
               {"title": "Three", "body": ""}, {"title": "", "body": "Fourth body."}, {"title": "", "body": ""},
               {"title": "Six", "body": "Sixth body."}]
    clean = write_jsonl(tmp_path / "clean.jsonl", records)
    megatron_lm_write(clean, str(tmp_path / "reference"), assets().tokenizer_model, keys=("title", "body"))
    messy = write_jsonl(tmp_path / "messy.jsonl", records[:2] + ["{broken", {"title": "x"}, ""] + records[2:])
    report = preprocess(messy, str(tmp_path / "out"), str(assets().tokenizer_model), json_keys=["title", "body"],
                        append_eod=True, workers=2, log=quiet)
    tok = tokenizer()
    for key in ("title", "body"):
        prefix = f"_{key}_document"
        documents = read_documents(str(tmp_path / "out") + prefix)
        assert documents == [tok.encode(r[key]) + [tok.eod_id] if r[key] else [] for r in records], key
        assert files_of(str(tmp_path / "out") + prefix) == files_of(str(tmp_path / "reference") + prefix), key
    assert (report.documents, report.blank_lines, report.bad, report.empty_fields) == (6, 1, 2, {"title": 3, "body": 2})
    assert "Empty fields, written as zero-length documents (as Megatron-LM does): title 3, body 2." in report.summary()


def test_inspect_data_shows_documents_numbered_as_records(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "first"}, {"text": ""}, {"text": ["one.", "two."]}])
    preprocess(path, str(tmp_path / "out"), str(assets().tokenizer_model), append_eod=True, log=quiet)
    result = subprocess.run(
        [sys.executable, str(ROOT / "data_tools" / "inspect_data.py"), str(tmp_path / "out_text_document"),
         "--tokenizer-model", str(assets().tokenizer_model), "--samples", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "documents 3, sequences 3," in result.stdout and "zero-length documents 1" in result.stdout
    tok = tokenizer()
    sizes = [len(tok.encode("first")) + 1, 0, len(tok.encode("one.")) + len(tok.encode("two.")) + 1]
    shown = [line for line in result.stdout.splitlines() if line.startswith("---")]
    assert shown == [f"--- document {i} ({n} tokens) ---" for i, n in enumerate(sizes)]
    assert "\none. two.\n" in result.stdout  # a document is all of its sentences


def test_command_line_prints_progress_and_totals(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "data_tools" / "preprocess_data.py"), "--input", str(assets().valid_jsonl),
         "--output-prefix", str(tmp_path / "cli"), "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", str(assets().tokenizer_model), "--append-eod", "--workers", "2", "--log-interval", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "docs/s" in result.stderr and "MB/s" in result.stderr and "tokens" in result.stderr
    assert "Skipped: 0 blank lines, 0 bad records" in result.stdout
    assert (tmp_path / "cli_text_document.bin").is_file() and (tmp_path / "cli_text_document.idx").is_file()


def test_failed_run_leaves_no_partial_prefix(tmp_path) -> None:
    good = [{"text": t} for t in assets().texts("valid")]
    prefix = str(tmp_path / "out")
    preprocess(write_jsonl(tmp_path / "good.jsonl", good), prefix, str(assets().tokenizer_model), log=quiet)
    before = files_of(prefix + "_text_document")
    bad = write_jsonl(tmp_path / "bad.jsonl", good + ["{broken"])
    with pytest.raises(DataError, match="bad.jsonl:9"):
        preprocess(bad, prefix, str(assets().tokenizer_model), strict=True, workers=2, log=quiet)
    # The last good pair is untouched and the failed run left nothing behind.
    assert files_of(prefix + "_text_document") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_the_makefile_goes_by_the_file_of_a_prefix_written_last(tmp_path, monkeypatch) -> None:
    """make preprocesses when its target is missing: it went by the .bin, which is renamed into place before
    the .idx, so a run stopped between the two renames left a prefix without index that make took as
    built. A stopped run leaves no target."""
    suffix = makefile_target(r"^\$\(DATA\)/sample_%_text_document(\.\w+):")
    prefix, corpus, model = str(tmp_path / "out"), assets().valid_jsonl, str(assets().tokenizer_model)
    monkeypatch.setattr(os, "replace", StopAtRename(at=2))  # the .bin's rename, then the .idx's
    with pytest.raises(KeyboardInterrupt):
        preprocess(corpus, prefix, model, log=quiet)
    assert Path(prefix + "_text_document.bin").is_file()
    assert not Path(prefix + "_text_document" + suffix).exists()


def _until_it_handled_the_signal(tool: subprocess.Popen, directory: Path, seconds: float) -> None:
    """Wait, with the input still open, until the signalled tool has exited or removed its partial files (it
    has handled the signal: with workers it then waits for the pool's reader thread, which finishes at the end of
    the input), for ``seconds`` at most. A fixed wait of ``seconds`` before closing the input spent all of it
    whenever the tool had workers, although the signal is handled within a fraction of a second."""
    deadline = time.monotonic() + seconds
    while tool.poll() is None and list(directory.glob("out_*.partial")) and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_removes_partial_files(tmp_path, workers) -> None:
    # The input is a FIFO that this test keeps open: the tool is mid-run, deterministically, when it gets SIGTERM.
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)
    tool = subprocess.Popen(
        [sys.executable, str(ROOT / "data_tools" / "preprocess_data.py"), "--input", str(fifo), "--output-prefix",
         str(tmp_path / "out"), "--tokenizer-model", str(assets().tokenizer_model), "--workers", str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        os.write(writer, b"".join(json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(1100)))
        while "Processed 1000 documents" not in tool.stderr.readline():
            assert tool.poll() is None, tool.stderr.read()
        assert (tmp_path / "out_text_document.bin.partial").is_file()
        tool.terminate()
        _until_it_handled_the_signal(tool, tmp_path, 5)  # with workers, the pool's reader thread finishes at the end of the input
        os.close(writer)
        _, stderr = tool.communicate(timeout=60)
    finally:
        tool.kill()
    assert tool.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def _children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]


@pytest.mark.parametrize("signum, returncode", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_a_signal_to_the_process_group_stops_workers_without_tracebacks(tmp_path, signum, returncode) -> None:
    """Ctrl-C in a terminal (or ``kill -TERM -- -PID``) signals every process of the group, the pool
    workers too: a worker that died of it mid-read left half a task in the pool's pipe, and the tool then
    hung for ever in Pool.terminate (2 of 5 runs on the sample corpus). The workers live in their own
    process group, so the signal reaches the main process alone, which stops them."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)
    tool = subprocess.Popen(
        [sys.executable, str(ROOT / "data_tools" / "preprocess_data.py"), "--input", str(fifo), "--output-prefix",
         str(tmp_path / "out"), "--tokenizer-model", str(assets().tokenizer_model), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, also under a runner that ignores it
    )
    try:
        os.write(writer, b"".join(json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(1100)))
        while "Processed 1000 documents" not in tool.stderr.readline():
            assert tool.poll() is None, tool.stderr.read()
        workers = _children(tool.pid)
        assert len(workers) >= 2 and all(os.getpgid(worker) != tool.pid for worker in workers)
        os.killpg(tool.pid, signum)
        _until_it_handled_the_signal(tool, tmp_path, 1)  # the pool's reader thread finishes at the end of the input
        os.close(writer)
        _, stderr = tool.communicate(timeout=60)
    finally:
        tool.kill()
    assert tool.returncode == returncode and "Traceback" not in stderr, stderr
    if signum == signal.SIGINT:
        assert stderr.rstrip().endswith("interrupted (Ctrl-C)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_pool_workers_are_forked_before_the_sigterm_handler(tmp_path, monkeypatch) -> None:
    """A worker forked while the tool's SIGTERM handler is installed can lose Pool.terminate's SIGTERM
    (it arrives before the at-fork reset); the pool then waits for that worker for ever."""
    import multiprocessing

    handlers = []
    pool = multiprocessing.Pool

    def recording_pool(*args, **kwargs):
        handlers.append(signal.getsignal(signal.SIGTERM))
        return pool(*args, **kwargs)

    monkeypatch.setattr(multiprocessing, "Pool", recording_pool)
    preprocess(assets().valid_jsonl, str(tmp_path / "out"), str(assets().tokenizer_model), workers=2, log=quiet)
    assert handlers == [signal.SIG_DFL]


def test_forked_workers_keep_the_default_sigterm(tmp_path) -> None:
    """While the partial files are open the tool unwinds on SIGTERM, but a forked pool worker must die
    by it at once (Pool.terminate): a Python handler would wait for bytecode a stuck worker never runs."""
    from doge_dist.data.indexed import atomic_builder

    with atomic_builder(str(tmp_path / "out"), np.uint16):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        pid = os.fork()
        if pid == 0:
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_full_disk_is_one_error_and_leaves_no_partial_files(tmp_path) -> None:
    """A write that fails (here a file size limit, as ``ulimit -f`` sets; a full disk alike) prints one
    error naming the prefix, removes its partial files and leaves the pair already there untouched."""
    prefix = str(tmp_path / "out")
    preprocess(assets().train_jsonl, prefix, str(assets().tokenizer_model), log=quiet)
    before = files_of(prefix + "_text_document")
    limit = len(before[0]) // 2
    result = subprocess.run(
        [sys.executable, str(ROOT / "data_tools" / "preprocess_data.py"), "--input", str(assets().train_jsonl),
         "--output-prefix", prefix, "--tokenizer-model", str(assets().tokenizer_model)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: Writing {prefix}_text_document.bin/.idx failed: [Errno 27] File too large" in result.stderr
    assert files_of(prefix + "_text_document") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_text_document.bin", "out_text_document.idx"]


def test_a_directory_holding_saved_datasets_reads_their_rows(tmp_path) -> None:
    """A save_to_disk folder inside an --input directory is one input: its dataset_info.json and
    state.json were read as jsonl (every line a bad record) and its rows left out."""
    from datasets import Dataset

    texts = assets().texts("valid")
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "a.jsonl", [{"text": t} for t in texts[:3]])
    Dataset.from_dict({"text": texts[3:], "id": list(range(len(texts) - 3))}).save_to_disk(str(tmp_path / "dir" / "saved"))
    assert [(item.path.name, item.kind) for item in list_inputs(tmp_path / "dir")] == [("a.jsonl", "jsonl"), ("saved", "arrow")]
    report = preprocess(tmp_path / "dir", str(tmp_path / "out"), str(assets().tokenizer_model), workers=1, log=quiet)
    assert read_prefix(str(tmp_path / "out_text_document")) == [tokenizer().encode(t) for t in texts]
    assert report.bad == 0
    Dataset.from_dict({"text": texts}).train_test_split(0.5).save_to_disk(str(tmp_path / "dir" / "splits"))
    with pytest.raises(DataError, match="is a datasets DatasetDict with splits"):
        list_inputs(tmp_path / "dir")


def test_an_input_whose_name_holds_pattern_characters_is_read_as_it_is(tmp_path) -> None:
    """``part[1].jsonl`` was taken as a glob pattern: it read ``part1.jsonl`` beside it, or matched no file."""
    from doge_dist.data.inputs import list_inputs

    named = write_jsonl(tmp_path / "part[1].jsonl", [{"text": "the bracketed file"}])
    assert [item.path for item in list_inputs(str(named))] == [named]
    write_jsonl(tmp_path / "part1.jsonl", [{"text": "another file"}])
    preprocess(str(named), str(tmp_path / "out"), str(assets().tokenizer_model), log=quiet)
    assert read_prefix(str(tmp_path / "out_text_document")) == [tokenizer().encode("the bracketed file")]
    assert [item.path.name for item in list_inputs(str(tmp_path / "part?.jsonl"))] == ["part1.jsonl"]  # still a pattern


@pytest.mark.parametrize("spec", ["dir/part-*", "dir"])
@pytest.mark.parametrize("compressed", ["part-1.jsonl.bz2", "part-1.jsonl.zst", "part-1.json.xz", "part-1.parquet.ZST"])
def test_a_data_file_in_a_compression_not_read_is_refused_not_skipped(spec, compressed, tmp_path) -> None:
    """A directory or pattern holding part-1.jsonl.zst (the Hub's most common compressed layout) beside
    part-0.jsonl read only part-0 without a word (half the data gone), where naming the file fails clearly.
    Other files beside the data (a README, an archive of something else) are left out as before."""
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "part-0.jsonl", [{"text": "kept"}])
    (tmp_path / "dir" / compressed).write_bytes(b"compressed")
    (tmp_path / "dir" / "README.md").write_text("not data")
    (tmp_path / "dir" / "part-extras.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match=rf"holds \S*/{re.escape(compressed)}, compressed in a form this tool cannot read"):
        list_inputs(str(tmp_path / spec))
    (tmp_path / "dir" / compressed).unlink()
    assert [item.path.name for item in list_inputs(str(tmp_path / spec))] == ["part-0.jsonl"]


def test_lock_backup_and_metadata_files_beside_data_are_skipped(tmp_path) -> None:
    """The compression check refused a Hub download made with --local-dir (its .cache holds
    x.parquet.metadata and x.parquet.lock) and a train.jsonl.bak beside train.jsonl."""
    cache = tmp_path / "hub" / ".cache" / "huggingface" / "download" / "data"
    cache.mkdir(parents=True)
    for suffix in (".metadata", ".lock"):
        (cache / f"train-00000-of-00001.parquet{suffix}").write_text("x")
    (tmp_path / "hub" / "data").mkdir()
    write_jsonl(tmp_path / "hub" / "data" / "train.jsonl", [{"text": "kept"}])
    (tmp_path / "hub" / "data" / "train.jsonl.bak").write_text("old")
    assert [item.path for item in list_inputs(tmp_path / "hub")] == [tmp_path / "hub" / "data" / "train.jsonl"]
    assert [item.path for item in list_inputs(str(tmp_path / "hub" / "data" / "*"))] == [tmp_path / "hub" / "data" / "train.jsonl"]


def test_an_output_prefix_that_cannot_be_written_is_one_error(tmp_path) -> None:
    """An --output-prefix under a file (or a read-only directory) failed with two chained tracebacks."""
    from doge_dist.data.indexed import merge_prefixes

    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match=rf"Cannot write {tmp_path}/afile/x_text_document.bin/.idx: .*choose another"):
        preprocess(assets().valid_jsonl, str(tmp_path / "afile" / "x"), str(assets().tokenizer_model), workers=2, log=quiet)
    with pytest.raises(DataError, match=rf"Cannot write {tmp_path}/afile/merged.bin/.idx"):
        merge_prefixes([assets().train_prefix], str(tmp_path / "afile" / "merged"), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_upper_case_gz_suffix_is_read_compressed(tmp_path) -> None:
    """``x.jsonl.GZ`` was taken as jsonl but read uncompressed: every record bad, nothing written."""
    texts = assets().texts("valid")
    path = tmp_path / "in.JSONL.GZ"
    path.write_bytes(gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)))
    report = preprocess(str(path), str(tmp_path / "out"), str(assets().tokenizer_model), log=quiet)
    assert read_prefix(str(tmp_path / "out_text_document")) == [tokenizer().encode(t) for t in texts]
    assert report.bad == 0


def test_a_file_named_twice_is_read_once(tmp_path, monkeypatch) -> None:
    """The same file named two ways (its directory given absolute, the file itself relative) was tokenized twice."""
    texts = assets().texts("valid")
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"text": t} for t in texts])
    monkeypatch.chdir(tmp_path)
    report = preprocess([str(tmp_path / "corpus"), "corpus/a.jsonl"], str(tmp_path / "out"), str(assets().tokenizer_model),
                        log=quiet)
    assert report.documents == len(texts)


def test_a_worker_that_dies_is_one_error_and_leaves_no_partial_files(tmp_path, monkeypatch) -> None:
    """A worker killed mid-batch (the out-of-memory killer, a crash in the tokenizer's C code): Pool starts
    a replacement but the batch is lost, and the run waited for it for ever with its partial files open."""
    import importlib
    import threading

    module = importlib.import_module("doge_dist.data.preprocess")  # the package's name is the function
    encode = module._encode_record

    def dies_in_the_second_batch(record):
        if record[1] == module.BATCH_RECORDS + 1:  # the line that starts the second batch
            os._exit(137)  # as SIGKILL: no cleanup in the worker
        return encode(record)

    monkeypatch.setattr(module, "_encode_record", dies_in_the_second_batch)  # the workers are forked after this
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": f"document {i}"} for i in range(3 * module.BATCH_RECORDS)])
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            preprocess(path, str(tmp_path / "out"), str(assets().tokenizer_model), workers=2, log=quiet)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)  # a hang must fail the test, not stop the suite
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "preprocess still waits for the dead worker's batch"
    assert len(outcome) == 1 and isinstance(outcome[0], DataError) and "worker process died" in str(outcome[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def _data_tool(name: str):
    """A data_tools script as a module (its main is not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "data_tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_worker_count_is_the_cpus_this_process_may_use(monkeypatch) -> None:
    """--workers defaulted to os.cpu_count(), every core of the machine, also under Slurm's --cpus-per-task
    or taskset: as many tokenizer processes as cores crowded onto the few allowed."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(sys, "argv", ["preprocess_data.py", "--input", "x", "--output-prefix", "y", "--tokenizer-model", "z"])
    assert _data_tool("preprocess_data").get_args().workers == 1
    bench = _data_tool("bench_preprocess")
    seen: list[Namespace] = []
    monkeypatch.setattr(bench, "bench", lambda args: seen.append(args) or "")
    monkeypatch.setattr(sys, "argv", ["bench_preprocess.py"])
    assert bench.main() == 0 and seen[0].workers == 1


def test_bench_repeats_an_input_without_a_final_newline_document_by_document(tmp_path, monkeypatch) -> None:
    """--repeat joined the last line of one copy and the first of the next into one (bad) record."""
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(3)))  # no final newline
    bench = _data_tool("bench_preprocess")
    monkeypatch.setattr(bench, "bench_datasets", lambda *args: (1.0, 6, 1))  # only preprocess_data.py's side here
    args = Namespace(input=str(path), tokenizer_model=str(assets().tokenizer_model), json_key="text", workers=1, repeat=2)
    assert "x2: 0.0 MB, 6 documents;" in bench.bench(args)


def test_the_megatron_flags_the_readme_names_are_the_tools() -> None:
    """The README said the tool has Megatron-LM's command line; it has its flags for GPT data only."""
    import re

    readme = (ROOT / "README.md").read_text()
    taken, _, missing = readme.split("`preprocess_data.py` takes Megatron-LM's flags for GPT data (")[1].split(")")[0].partition("; not its")
    usage = subprocess.run([sys.executable, str(ROOT / "data_tools" / "preprocess_data.py"), "--help"], capture_output=True,
                           text=True, cwd=ROOT, timeout=300).stdout
    flags = set(re.findall(r"--[a-z-]+", usage.split("options:")[1]))  # not the description, which names the missing ones
    assert set(re.findall(r"--[a-z-]+", taken)) <= flags and not set(re.findall(r"--[a-z-]+", missing)) & flags
    assert len(re.findall(r"--[a-z-]+", taken)) == 8 and len(re.findall(r"--[a-z-]+", missing)) == 2
