"""Bad input: malformed records, missing keys, empty documents, bad bytes, damaged .bin/.idx pairs."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import VOCAB, assets, quiet, tokenizer, write_jsonl
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from doge_dist.config import DataConfig
from doge_dist.data import DataError, build_datasets, preprocess, validate_prefix
from doge_dist.data.indexed import merge_prefixes

ROOT = Path(__file__).resolve().parents[1]


def run(path: Path, tmp_path: Path, **kwargs):
    return preprocess(path, str(tmp_path / "out"), str(assets().tokenizer_model), log=quiet, **kwargs)


def test_malformed_lines_are_skipped_and_reported(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good one"}, "{not json", {"text": 5}, b"\xff\xfe{}", {"text": "good two"}])
    report = run(path, tmp_path, workers=2)
    assert (report.documents, report.bad) == (2, 3)
    summary = report.summary()
    assert f"{path}:2: malformed JSON" in summary
    assert f"{path}:3: field 'text' is int" in summary
    assert f"{path}:4: undecodable bytes" in summary
    assert "Skipped: 0 blank lines, 3 bad records" in summary


def test_a_lone_surrogate_is_a_bad_record_not_a_tokenizer_crash(tmp_path) -> None:
    """JSON's \\ud800 escape without its pair decodes to a str no tokenizer can encode: sentencepiece raised
    a RuntimeError naming no record. It is a bad record, in a field and in a list field's item."""
    path = write_jsonl(tmp_path / "in.jsonl", ['{"text": "a \\ud800 b"}', {"text": "good"}, '{"text": ["fine", "x\\udfff"]}'])
    report = run(path, tmp_path, workers=2)
    assert (report.documents, report.bad) == (1, 2)
    summary = report.summary()
    assert f"{path}:1: field 'text' holds a lone UTF-16 surrogate (\\ud800 at character 2)" in summary
    assert f"{path}:3: field 'text' item 2 holds a lone UTF-16 surrogate (\\udfff at character 1)" in summary


def test_progress_lines_also_count_bad_records(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}] + ["{broken"] * 5)
    lines: list[str] = []
    preprocess(path, str(tmp_path / "out"), str(assets().tokenizer_model), log_interval=2, log=lines.append)
    assert [line.split(" (")[0] for line in lines[1:]] == [f"Processed {n} documents" for n in (2, 4, 6)]


def test_a_byte_order_mark_is_not_text(tmp_path) -> None:
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "first"}, {"text": "second"}])
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbffirst\n\nsecond\n")
    want = [tokenizer().encode("first"), tokenizer().encode("second")]
    for name in ("bom.jsonl", "bom.txt"):
        prefix = str(tmp_path / name.replace(".", "_"))
        report = preprocess(tmp_path / name, prefix, str(assets().tokenizer_model), log=quiet)
        assert report.bad == 0, report.summary()
        dataset = IndexedDataset(prefix + "_text_document")
        assert [dataset[i].tolist() for i in range(len(dataset))] == want, name


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_or_damaged_input_files_fail_clearly(tmp_path, workers) -> None:
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    whole = gzip.compress(assets().valid_jsonl.read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "plain.jsonl.gz").write_bytes(assets().valid_jsonl.read_bytes())  # not compressed
    pq.write_table(pa.table({"text": assets().texts("valid")}), tmp_path / "whole.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes()[:-100])
    names = ["cut.jsonl.gz", "plain.jsonl.gz", "cut.parquet"]
    for name in names:
        with pytest.raises(DataError, match=rf"'.*{name}' cannot be read.*: the file is truncated, damaged or unreadable"):
            run(tmp_path / name, tmp_path, workers=workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["whole.parquet"])


def test_json_errors_read_as_one_phrase(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}, b'{"text": "tab\there"}'])
    assert f"{path}:2: malformed JSON (Invalid control character at column 14)" in run(path, tmp_path).summary()


def test_deeply_nested_json_is_a_bad_record_not_a_crash(tmp_path) -> None:
    """json's decoder recurses once per level: 100,000 "[" raised RecursionError out of the tool."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good one"}, "[" * 100_000, {"text": "good two"}])
    report = run(path, tmp_path)
    assert (report.documents, report.bad) == (2, 1)
    assert f"{path}:2: JSON nested too deeply to read" in report.summary()


def test_strict_stops_at_the_first_bad_line(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}, {"text": "good"}, "[1, 2"])
    with pytest.raises(DataError, match=r"in\.jsonl:3: malformed JSON"):
        run(path, tmp_path, strict=True)


def test_missing_key_names_the_keys_that_exist(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"content": "x", "url": "y"}])
    with pytest.raises(DataError, match=r"in\.jsonl:1: no key 'text'; this record has keys 'content', 'url'"):
        run(path, tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "in.parquet")
    with pytest.raises(DataError, match="has no column 'text'; it has content"):
        run(tmp_path / "in.parquet", tmp_path)


def test_a_json_key_given_twice_is_refused_before_any_file(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "words"}])
    with pytest.raises(DataError, match="--json-keys names 'text' more than once"):
        run(path, tmp_path, json_keys=["text", "text"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_record_missing_the_key_after_good_ones_is_skipped(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "good one"}, {"body": "x"}, {"text": "good two"}])
    report = run(path, tmp_path, workers=2)
    assert (report.documents, report.bad) == (2, 1)
    assert f"{path}:2: no key 'text'; this record has keys 'body'" in report.summary()
    with pytest.raises(DataError, match=r"in\.jsonl:2: no key 'text'"):
        run(path, tmp_path, strict=True)


def test_input_whose_every_record_is_bad_writes_nothing(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", ["{not json", "[1, 2]"])
    with pytest.raises(DataError, match=r"None of the 2 records could be used \(the first: .*in\.jsonl:1: malformed JSON"):
        run(path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_empty_fields_are_zero_length_documents_and_blank_lines_are_skipped(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": ""}, {"text": "words"}, "", {"text": None}])
    report = run(path, tmp_path, append_eod=True)
    assert (report.documents, report.blank_lines, report.bad, report.empty_fields) == (3, 1, 0, {"text": 2})
    info = validate_prefix(str(tmp_path / "out_text_document"))
    assert (info.documents, info.sequences) == (3, 1)  # as Megatron-LM writes them: document i is record i
    summary = report.summary()
    assert "Empty fields, written as zero-length documents (as Megatron-LM does): text 2." in summary
    assert "Skipped: 1 blank lines, 0 bad records." in summary


def test_input_without_tokens_gives_a_readable_empty_prefix(tmp_path) -> None:
    run(write_jsonl(tmp_path / "in.jsonl", [{"text": ""}, ""]), tmp_path)
    empty = str(tmp_path / "out_text_document")
    assert validate_prefix(empty, VOCAB).documents == 1
    tool = str(ROOT / "data_tools" / "inspect_data.py")
    result = subprocess.run([sys.executable, tool, empty], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and "documents 1, sequences 0, tokens 0" in result.stdout, result.stderr
    merged = merge_prefixes([empty, assets().train_prefix], str(tmp_path / "merged"))
    assert merged.documents == validate_prefix(assets().train_prefix).documents + 1
    config = DataConfig(train_data=[empty], seq_length=16, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="train split gets no tokens"):
        build_datasets(config, tokenizer(), [10, 2, 1])


def test_command_line_reports_errors_without_traceback(tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"body": "x"}])
    result = subprocess.run(
        [sys.executable, str(ROOT / "data_tools" / "preprocess_data.py"), "--input", str(path), "--output-prefix",
         str(tmp_path / "out"), "--tokenizer-model", str(assets().tokenizer_model), "--workers", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no key 'text'; this record has keys 'body'" in result.stderr


# ---- damaged .bin/.idx pairs -------------------------------------------------------------------


def damaged_copy(tmp_path: Path, damage) -> str:
    prefix = str(tmp_path / "copy")
    for suffix in (".bin", ".idx"):
        shutil.copy(assets().train_prefix + suffix, prefix + suffix)
    damage(Path(prefix + ".bin"), Path(prefix + ".idx"))
    return prefix


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


DAMAGES = {
    "truncated bin": (lambda b, i: truncate(b, -2), "truncated or mismatched"),
    "truncated idx": (lambda b, i: truncate(i, -8), "truncated or not written to the end"),
    "short header": (lambda b, i: truncate(i, 12), "truncated"),
    "wrong magic": (lambda b, i: patch(i, 0, b"NOTANIDX\x00"), "wrong magic"),
    "wrong version": (lambda b, i: patch(i, 9, struct.pack("<Q", 2)), "index version 2"),
    "unknown dtype": (lambda b, i: patch(i, 17, b"\x63"), "unknown token dtype"),
    "bin of another pair": (lambda b, i: b.write_bytes(b.read_bytes() * 2), "mismatched"),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damaged_pairs_fail_clearly(tmp_path, name) -> None:
    damage, message = DAMAGES[name]
    prefix = damaged_copy(tmp_path, damage)
    with pytest.raises(DataError, match=message) as error:
        validate_prefix(prefix, VOCAB)
    assert "copy." in str(error.value) and "preprocess_data.py" in str(error.value)


def test_inspect_data_exits_nonzero_on_damage(tmp_path) -> None:
    prefix = damaged_copy(tmp_path, DAMAGES["truncated bin"][0])
    tool = str(ROOT / "data_tools" / "inspect_data.py")
    bad = subprocess.run([sys.executable, tool, prefix], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 1 and "truncated or mismatched" in bad.stderr
    good = subprocess.run([sys.executable, tool, assets().train_prefix, "--tokenizer-model", str(assets().tokenizer_model)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert good.returncode == 0 and "OK" in good.stdout and "dtype uint16" in good.stdout


def test_token_ids_beyond_the_vocabulary(tmp_path) -> None:
    prefix = str(tmp_path / "big")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(np.array([5, 6, VOCAB + 7]), [3])
    builder.finalize(prefix + ".idx")
    with pytest.raises(DataError, match=f"token id {VOCAB + 7} but the tokenizer/model vocabulary has {VOCAB}"):
        validate_prefix(prefix, VOCAB)
    config = DataConfig(train_data=[prefix], seq_length=4, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="different tokenizer"):
        build_datasets(config, tokenizer(), [10, 2, 1])


def test_blend_naming_a_missing_prefix(tmp_path) -> None:
    config = DataConfig(train_data=[0.5, assets().train_prefix, 0.5, str(tmp_path / "nope")], seq_length=16,
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"nope': missing .*nope\.bin and .*nope\.idx"):
        build_datasets(config, tokenizer(), [10, 2, 1])
    from doge_dist.data.blend import TOKEN_SCANS

    # failed before any index was built (the first prefix's token scan is remembered)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [TOKEN_SCANS]


def test_a_preprocessing_output_prefix_as_the_data_prefix_names_the_pair_it_wrote(tmp_path) -> None:
    """`--output-prefix data/x` writes data/x_text_document.bin/.idx; passing data/x to training said only
    "missing data/x.bin and data/x.idx, re-create it", while the pair was there."""
    folder = tmp_path / "run[1]"  # a name with glob characters is matched as it is
    folder.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(assets().train_prefix + suffix, str(folder / "x_text_document") + suffix)
    with pytest.raises(DataError) as error:
        validate_prefix(str(folder / "x"))
    assert f"write {{output-prefix}}_{{key}}_document: did you mean '{folder / 'x_text_document'}'?" in str(error.value)
    with pytest.raises(DataError) as error:
        validate_prefix(str(folder / "y"))
    assert "did you mean" not in str(error.value)


@pytest.mark.parametrize(
    "field, value, message",
    [("split", "90,abc", "data.split"), ("train_data", [], "train_data is empty"),
     ("train_data", ["0.5", "a", "b"], "mixes weights and prefixes"),
     ("train_data", ["nan", "a", "1", "b"], "must be finite"), ("train_data", [float("inf"), "a", 1, "b"], "must be finite")],
)
def test_bad_data_config(tmp_path, field, value, message) -> None:
    config = DataConfig(train_data=[assets().train_prefix], seq_length=16, cache_dir=str(tmp_path / "cache"))
    setattr(config, field, value)
    with pytest.raises(DataError, match=message):
        build_datasets(config, tokenizer(), [10, 2, 1])


def test_split_without_tokens_fails_instead_of_hanging(tmp_path) -> None:
    # 70 documents and "969,30,1": the test split rounds to zero documents (megatron-core would loop forever).
    config = DataConfig(train_data=[assets().train_prefix], seq_length=16, split="969,30,1", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="test split gets no tokens"):
        build_datasets(config, tokenizer(), [10, 2, 1])


def test_a_single_prefix_string_is_one_prefix(tmp_path) -> None:
    # YAML "train_data: data/x_text_document" (no brackets) is a string, not a list of characters.
    config = DataConfig(train_data=assets().train_prefix, valid_data=str(tmp_path / "nope"), seq_length=16,
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"Data prefix '.*nope': missing"):
        build_datasets(config, tokenizer(), [10, 2, 1])
    config.valid_data = assets().train_prefix
    train, valid, _ = build_datasets(config, tokenizer(), [10, 2, 1])
    assert train.dataset_path == valid.dataset_path == assets().train_prefix


def test_split_as_a_yaml_number(tmp_path) -> None:
    # "split: 100" in YAML is the number 100: all documents train, as the string "100".
    config = DataConfig(train_data=[assets().train_prefix], seq_length=16, split=100, cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_datasets(config, tokenizer(), [10, 2, 1])
    assert train is not None and valid is None and test is None


def test_ctrl_c_is_one_line_and_exit_code_130(capsys) -> None:
    from doge_dist.data.errors import run_tool

    def interrupted() -> str:
        raise KeyboardInterrupt

    assert run_tool(interrupted) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted (Ctrl-C)\n" and captured.out == ""


def test_a_zero_blend_weight_is_named_not_asserted(tmp_path) -> None:
    # megatron-core's BlendedDataset asserts every weight > 0 (a bare AssertionError after the model was built).
    other = str(tmp_path / "other")
    for suffix in (".bin", ".idx"):
        shutil.copy(assets().train_prefix + suffix, other + suffix)
    config = DataConfig(train_data=[1, assets().train_prefix, 0, other], seq_length=16, split="90,10,0",
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"weights \[1.0, 0.0\] must be finite and positive: leave a prefix out"):
        build_datasets(config, tokenizer(), [10, 2, 1])


def test_a_split_without_training_weight_is_refused(tmp_path) -> None:
    # "0,1,0" gave no training dataset: the trainer failed with len(None) after building the model.
    config = DataConfig(train_data=[assets().train_prefix], seq_length=16, split="0,1,0", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="gives the training split no weight"):
        build_datasets(config, tokenizer(), [10, 2, 1])


def test_an_empty_validation_split_is_not_told_to_use_99_1_0(tmp_path) -> None:
    # 70 documents and "999,1,0": the validation split gets none; "99,1,0" would not give it any either.
    config = DataConfig(train_data=[assets().train_prefix], seq_length=16, split="999,1,0", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="valid split gets no tokens") as error:
        build_datasets(config, tokenizer(), [10, 2, 1])
    assert "99,1,0" not in str(error.value) and "data.valid_data" in str(error.value)


def test_the_token_scan_is_remembered_per_file_until_the_file_changes(tmp_path, monkeypatch) -> None:
    """Every start (and Slurm requeue) read every token of the data on rank 0 while the other ranks
    waited: minutes for a terabyte. The largest id is remembered per file, size and modification time
    in the data cache; a rewritten file is read again."""
    from doge_dist.data import indexed

    prefix = str(tmp_path / "data")
    for ext in (".bin", ".idx"):
        shutil.copy(assets().train_prefix + ext, prefix + ext)
    scans = tmp_path / "cache" / "largest_token_ids.json"
    first = validate_prefix(prefix, VOCAB, scans=scans).max_token
    assert 0 < first < VOCAB and list(json.loads(scans.read_text()).values())[0]["max_token"] == first

    def no_scan(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr(indexed, "_max_token", no_scan)
    assert validate_prefix(prefix, VOCAB, scans=scans).max_token == first  # remembered
    os.utime(prefix + ".bin", ns=(0, 0))  # what rewriting the file does to its stamp
    with pytest.raises(AssertionError, match="scanned again"):
        validate_prefix(prefix, VOCAB, scans=scans)


def test_a_long_token_scan_shows_its_progress(tmp_path, monkeypatch, capsys) -> None:
    """The first scan of a large corpus kept rank 0 silent for minutes while the other ranks waited."""
    from doge_dist.data import indexed

    monkeypatch.setattr(indexed, "SCAN_CHUNK_TOKENS", 64)
    monkeypatch.setattr(indexed, "SCAN_LOG_SECONDS", 0.0)
    prefix = assets().train_prefix
    expected = int(np.memmap(prefix + ".bin", dtype=validate_prefix(prefix, scan_tokens=False).dtype, mode="r").max())
    assert validate_prefix(prefix, VOCAB).max_token == expected
    lines = [line for line in capsys.readouterr().out.splitlines() if "checking the token ids" in line]
    assert len(lines) > 2 and lines[-1].split(": ")[1].startswith("100% (") and "ETA 0 s" in lines[-1]


def _tokenizer_without_eos(tmp_path: Path, library: str) -> str:
    """A Hugging Face directory without eos_token, or a sentencepiece model trained with eos_id=-1."""
    if library == "huggingface":
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = sorted({word for text in assets().texts("valid") for word in text.split()})
        vocab = {word: i for i, word in enumerate(["[UNK]", "[PAD]"] + words)}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(str(tmp_path / "hf"))
        return str(tmp_path / "hf")
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(assets().texts("valid")), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=100, eos_id=-1, bos_id=-1, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
    return str(tmp_path / "sp.model")


@pytest.mark.parametrize("library", ["huggingface", "sentencepiece"])
def test_append_eod_with_a_tokenizer_without_eos_is_refused_before_any_input(tmp_path, library) -> None:
    """The end-of-text id was None or -1: a TypeError or an OverflowError from inside the tokenizing loop."""
    model = _tokenizer_without_eos(tmp_path, library)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "words"}])
    with pytest.raises(DataError, match=r"--append-eod: tokenizer '.*' has no end-of-text \(eos\) token.*drop --append-eod"):
        preprocess(path, str(tmp_path / "out"), model, append_eod=True, log=quiet)
    assert not list(tmp_path.glob("out*"))
    preprocess(path, str(tmp_path / "out"), model, log=quiet)  # without --append-eod it tokenizes


# ---- command-line arguments the data tools refuse before any work -----------------------------------------------

CLI_ERRORS = {
    "preprocess --workers 0": ("preprocess_data.py", ["--input", "{corpus}", "--output-prefix", "{tmp}/out",
                                                      "--tokenizer-model", "{tokenizer}", "--workers", "0"],
                               2, "argument --workers: must be at least 1, got 0"),
    "preprocess --workers -1": ("preprocess_data.py", ["--input", "{corpus}", "--output-prefix", "{tmp}/out",
                                                       "--tokenizer-model", "{tokenizer}", "--workers", "-1"],
                                2, "argument --workers: must be at least 1, got -1"),
    "inspect --samples -1": ("inspect_data.py", ["{prefix}", "--tokenizer-model", "{tokenizer}", "--samples", "-1"],
                             2, "argument --samples: must be at least 0, got -1"),
    "bench missing input": ("bench_preprocess.py", ["--input", "{tmp}/missing.jsonl", "--tokenizer-model", "{tokenizer}",
                                                    "--workers", "1"], 1, "error: --input '{tmp}/missing.jsonl' is not a file"),
    "bench missing tokenizer": ("bench_preprocess.py", ["--input", "{corpus}", "--tokenizer-model", "{tmp}/missing.model",
                                                        "--workers", "1"], 1, "error: Tokenizer '{tmp}/missing.model'"),
    "bench wrong key": ("bench_preprocess.py", ["--input", "{corpus}", "--tokenizer-model", "{tokenizer}", "--workers", "1",
                                                "--json-keys", "nokey"], 1, "no key 'nokey'; this record has keys 'text'"),
    "bench wrong key, --json-key": ("bench_preprocess.py", ["--input", "{corpus}", "--tokenizer-model", "{tokenizer}",
                                                            "--workers", "1", "--json-key", "nokey"], 1, "Pass --json-keys"),
    "bench --repeat 0": ("bench_preprocess.py", ["--repeat", "0"], 2, "argument --repeat: must be at least 1, got 0"),
    "sample chat --sft -1": ("build_sample_chat.py", ["--output-dir", "{tmp}/chat", "--sft", "-1"],
                             2, "argument --sft: must be at least 0, got -1"),
    "sample chat output a file": ("build_sample_chat.py", ["--output-dir", "{file}", "--sft", "5", "--dpo", "5", "--valid", "5"],
                                  1, "error: --output-dir '{file}' is a file, not a directory"),
    "sample corpus unknown source": ("build_sample_corpus.py", ["--output-dir", "{tmp}/corpus", "--sources", "nonexistent_pkg_xyz"],
                                     1, "error: --sources 'nonexistent_pkg_xyz' is not an installed package"),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_data_tools_refuse_bad_arguments_in_one_line_without_traceback(case, tmp_path) -> None:
    """--workers 0 or -1 was taken as is, --samples -1 and bench_preprocess's missing input, tokenizer or key
    were tracebacks, --repeat 0 printed x0 and ran once, --sft -1 was accepted, an unknown sample corpus source
    and a file as --output-dir were tracebacks. bench_preprocess's wrong key error says "Pass --json-keys", an
    option it did not have (it was --json-key, which stays an alias)."""
    tool, args, code, message = CLI_ERRORS[case]
    (tmp_path / "file").write_text("x")
    values = {"corpus": str(assets().valid_jsonl), "tokenizer": str(assets().tokenizer_model), "prefix": assets().train_prefix,
              "tmp": str(tmp_path), "file": str(tmp_path / "file")}
    result = subprocess.run([sys.executable, str(ROOT / "data_tools" / tool), *(arg.format(**values) for arg in args)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message.format(**values) in result.stderr, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]
