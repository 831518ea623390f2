"""Tokenizer training, loading and the Hugging Face twin (identical ids, Doge's special ids)."""
from __future__ import annotations

import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import VOCAB, assets, quiet, tokenizer, write_jsonl
from transformers import AutoTokenizer

from doge_dist.data import DataError, load_tokenizer
from doge_dist.data.train_tokenizer import train_tokenizer

EDGE_CASES = [
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "x  y   z\t\ttabs\n\nnewlines\n",
    "emoji 😀, accents ünïcödé, CJK 漢字, dashes — “quotes”",
    "digits 1234567890 and 3.14159",
    "literal special strings <s> </s> <pad> <unk> stay text",
    "▁already▁escaped",
    "def f(x):\n        return x  # indented code",
]


def test_doge_special_ids_and_vocab() -> None:
    tok = tokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eod_id) == (0, 1, 2, 1)
    assert tok.vocab_size == VOCAB
    assert tok.megatron.unk == 3


def check_hf_matches_sentencepiece(model_file, texts) -> None:
    sp = load_tokenizer(model_file)
    hf = AutoTokenizer.from_pretrained(str(model_file.parent))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert len(hf) == sp.vocab_size
    for text in texts:
        ids = sp.encode(text)
        assert hf(text)["input_ids"] == ids, text[:80]
        assert hf.decode(ids) == sp.decode(ids)


def test_hf_directory_gives_identical_ids() -> None:
    check_hf_matches_sentencepiece(assets().tokenizer_model, assets().texts("valid") + EDGE_CASES)


def test_unigram_hf_directory_gives_identical_ids(tmp_path) -> None:
    model = train_tokenizer(assets().train_jsonl, tmp_path, vocab_size=VOCAB, model_type="unigram", threads=2, log=quiet)
    check_hf_matches_sentencepiece(model, assets().texts("valid")[:3] + EDGE_CASES)


def test_load_from_hf_directory_and_save_hf(tmp_path) -> None:
    from_dir = load_tokenizer(assets().tokenizer_dir)
    assert from_dir.library == "huggingface"
    assert from_dir.hf_dir == assets().tokenizer_dir
    text = assets().texts("valid")[0]
    assert from_dir.encode(text) == tokenizer().encode(text)
    exported = tokenizer().save_hf(tmp_path / "export")
    assert AutoTokenizer.from_pretrained(str(exported))(text)["input_ids"] == tokenizer().encode(text)
    assert tokenizer().decode(tokenizer().encode(text)) == text


def test_bad_tokenizer_paths(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer directory"):
        load_tokenizer(tmp_path)
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="Cannot load tokenizer"):
        load_tokenizer(tmp_path / "garbage.model")


def test_special_ids_must_be_distinct(tmp_path) -> None:
    with pytest.raises(ValueError, match="distinct"):
        train_tokenizer(assets().train_jsonl, tmp_path, vocab_size=VOCAB, special_ids={"bos": 0, "eos": 1, "pad": 1, "unk": 3})


def test_the_default_thread_count_is_the_cpus_this_process_may_use(tmp_path, monkeypatch) -> None:
    """It was os.cpu_count(), every core of the machine, also under Slurm's --cpus-per-task or taskset."""
    import os

    import sentencepiece as spm

    corpus, threads = assets().valid_jsonl, []  # the shared assets built before sentencepiece is patched

    def record(**settings):
        threads.append(settings["num_threads"])
        raise KeyboardInterrupt  # no need to train

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", record)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(corpus, tmp_path / "out", vocab_size=VOCAB, log=quiet)
    assert threads == [1]


def test_special_ids_left_out_with_minus_one_are_not_compared(tmp_path) -> None:
    """sentencepiece takes -1 as "no such token"; --bos-id -1 --pad-id -1 was refused as two equal ids."""
    model = train_tokenizer(assets().train_jsonl, tmp_path, vocab_size=VOCAB, threads=2, log=quiet,
                            special_ids={"bos": -1, "eos": 0, "pad": -1, "unk": 1})
    import sentencepiece as spm

    trained = spm.SentencePieceProcessor(model_file=str(model))
    assert (trained.bos_id(), trained.eos_id(), trained.pad_id(), trained.unk_id()) == (-1, 0, -1, 1)
    assert load_tokenizer(tmp_path).encode("hello world") == load_tokenizer(model).encode("hello world")  # the HF twin


def test_training_input_without_the_key(tmp_path) -> None:
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"body": "x"}, {"text": "y"}])
    with pytest.raises(DataError, match=r"wrong\.jsonl:1: no key 'text'; this record has keys 'body'"):
        train_tokenizer(wrong, tmp_path / "a", vocab_size=VOCAB, log=quiet)
    with pytest.raises(DataError, match="has no text under --json-keys text"):
        train_tokenizer(write_jsonl(tmp_path / "empty.jsonl", []), tmp_path / "b", vocab_size=VOCAB, log=quiet)
    # One record without the key among good ones is skipped, as preprocess_data.py skips it.
    texts = [{"text": t} for t in assets().texts()]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", texts[:5] + [{"body": "x"}] + texts[5:])
    lines = []
    train_tokenizer(mixed, tmp_path / "c", vocab_size=VOCAB, threads=2, log=lines.append)
    assert "skipped 1 bad records; sentencepiece trains now" in lines[-3]  # the silent phase is announced
    assert lines[-2].startswith("sentencepiece trained in ")


def test_a_record_without_the_key_after_one_with_blank_text_is_skipped(tmp_path) -> None:
    """Whether earlier records had the key was told from the lines read so far: a first record whose text
    is whitespace gives none, and the record without the key then stopped the run as a wrong --json-keys.
    A blank line is no record: a missing key right after it still does."""
    texts = [{"text": t} for t in assets().texts()]
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "  \n "}, {"body": "x"}] + texts)
    lines = []
    train_tokenizer(path, tmp_path / "out", vocab_size=VOCAB, threads=2, log=lines.append)
    assert "skipped 1 bad records; sentencepiece trains now" in lines[-3]
    blank_first = write_jsonl(tmp_path / "blank.jsonl", ["", {"body": "x"}] + texts)
    with pytest.raises(DataError, match=r"blank\.jsonl:2: no key 'text'; this record has keys 'body'"):
        train_tokenizer(blank_first, tmp_path / "other", vocab_size=VOCAB, log=quiet)


def test_training_input_with_a_lone_surrogate_skips_that_record(tmp_path) -> None:
    """A lone surrogate (JSON's \\ud800 without its pair) made sentencepiece fail mid-training; the record
    is skipped and counted, as preprocess_data.py skips it."""
    texts = [{"text": t} for t in assets().texts()]
    path = write_jsonl(tmp_path / "in.jsonl", texts[:5] + ['{"text": "a \\ud800 b"}'] + texts[5:])
    lines = []
    model = train_tokenizer(path, tmp_path / "out", vocab_size=VOCAB, threads=2, log=lines.append)
    assert "skipped 1 bad records; sentencepiece trains now" in lines[-3]
    assert load_tokenizer(model).vocab_size == VOCAB


def test_an_interrupted_training_leaves_the_earlier_tokenizer_whole(tmp_path, monkeypatch) -> None:
    """make builds data/tokenizer/tokenizer.model as a file target: it must appear only with both twins,
    and an interrupted retraining leaves the tokenizer already there as it was (not a new tokenizer.json
    beside the old .model, nor no .model at all)."""
    import doge_dist.data.train_tokenizer as module

    model = train_tokenizer(assets().train_jsonl, tmp_path, vocab_size=VOCAB, threads=2, log=quiet)
    assert not tmp_path.with_name(tmp_path.name + ".partial").exists()
    assert model == tmp_path / "tokenizer.model" and (tmp_path / "tokenizer.vocab").is_file()
    before = {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_chat_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(assets().train_jsonl, tmp_path, vocab_size=VOCAB, threads=2, log=quiet)
    assert {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


def test_a_truncated_input_fails_clearly(tmp_path) -> None:
    import gzip

    whole = gzip.compress(assets().train_jsonl.read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz' cannot be read past its first \d+ records \(EOFError"):
        train_tokenizer(tmp_path / "cut.jsonl.gz", tmp_path / "out", vocab_size=VOCAB, threads=2, log=quiet)
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_a_failed_write_leaves_the_earlier_tokenizer_as_it_was(tmp_path) -> None:
    """Retraining into a tokenizer directory on a full disk (here a file size limit, as ``ulimit -f``
    sets: sentencepiece truncates its .model without an error) is one error naming the cause; the
    tokenizer already there, its HF twin and chat twin stay as they were and nothing half-written is left."""
    out = tmp_path / "tokenizer"
    shutil.copytree(assets().tokenizer_dir, out)
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    limit = (out / "tokenizer.model").stat().st_size // 2
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "data_tools" / "train_tokenizer.py"), "--input", str(assets().train_jsonl),
         "--output-dir", str(out), "--vocab-size", str(VOCAB)],
        capture_output=True, text=True, cwd=root, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error: Writing the tokenizer failed" in result.stderr and f"{out} was left as it was" in result.stderr
    assert {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def files_in(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_kill_while_make_chat_tokenizer_replaces_a_chat_twin_keeps_the_earlier_one(tmp_path, monkeypatch) -> None:
    """The tool deleted the chat twin already there before moving the new one in: a kill in between left
    an empty directory, which training and the tool itself ("not a tokenizer directory") then refused.
    The earlier twin is now set aside whole (OUTPUT.old) until the new one has its name; a rerun completes."""
    import os

    from doge_dist.data.chat_template import write_chat_tokenizer

    out = write_chat_tokenizer(assets().tokenizer_model, tmp_path / "chat")
    before = files_in(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_chat_tokenizer(assets().tokenizer_model, out)
    monkeypatch.undo()
    assert files_in(out if out.exists() else tmp_path / "chat.old") == before
    assert write_chat_tokenizer(assets().tokenizer_model, out) == out
    assert files_in(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["chat"]


def test_a_kill_after_the_new_chat_twin_has_its_name_leaves_nothing_that_stops_the_next_run(tmp_path) -> None:
    """A kill after the new twin took its name but before OUTPUT.old was deleted leaves both: the next run
    (of make_chat_tokenizer, an export, train_tokenizer) must not fail on the leftover ("Directory not empty")."""
    from doge_dist.data.chat_template import write_chat_tokenizer

    out = write_chat_tokenizer(assets().tokenizer_model, tmp_path / "chat")
    before = files_in(out)
    (tmp_path / "chat.old").mkdir()
    (tmp_path / "chat.old" / "tokenizer.json").write_text("{}")
    assert write_chat_tokenizer(assets().tokenizer_model, out) == out
    assert files_in(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["chat"]


def test_a_source_directory_with_its_own_chat_template_file_gets_the_doge_template(tmp_path) -> None:
    """transformers saves a tokenizer's template as chat_template.jinja, which wins over tokenizer_config.json's
    key: the chat twin of such a Hugging Face directory must not keep the source's template file."""
    from chat_helpers import chat_tokenizer
    from doge_dist.data.chat_template import DOGE_CHAT_TEMPLATE, load_chat_tokenizer, write_chat_tokenizer

    source = AutoTokenizer.from_pretrained(str(chat_tokenizer()))
    source.chat_template = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    source.save_pretrained(str(tmp_path / "source"))
    assert (tmp_path / "source" / "chat_template.jinja").is_file()
    out = write_chat_tokenizer(tmp_path / "source", tmp_path / "chat")
    assert not (out / "chat_template.jinja").exists()
    assert load_chat_tokenizer(out).chat_template == DOGE_CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == DOGE_CHAT_TEMPLATE


def test_make_chat_tokenizer_writes_through_a_link_to_its_output(tmp_path) -> None:
    """An output that is a symbolic link: the link was set aside as OUTPUT.old and a directory put in its place,
    and the next run failed (NotADirectoryError) with OUTPUT.partial left behind. The link's target is replaced
    now, as save_hf does."""
    from doge_dist.data.chat_template import load_chat_tokenizer, write_chat_tokenizer

    write_chat_tokenizer(assets().tokenizer_model, tmp_path / "real")
    (tmp_path / "chat").symlink_to(tmp_path / "real")
    for _ in range(2):
        write_chat_tokenizer(assets().tokenizer_model, tmp_path / "chat")
    assert (tmp_path / "chat").is_symlink() and load_chat_tokenizer(tmp_path / "real").chat_template
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat", "real"]


def test_a_failed_write_of_make_chat_tokenizer_is_one_error_and_keeps_the_earlier_twin(tmp_path) -> None:
    """A full disk (here a file size limit, as ``ulimit -f`` sets) while writing the chat twin was a
    traceback from the tokenizers library with OUTPUT.partial left behind."""
    from doge_dist.data.chat_template import write_chat_tokenizer

    out = write_chat_tokenizer(assets().tokenizer_model, tmp_path / "chat")
    before = files_in(out)
    limit = (out / "tokenizer.json").stat().st_size // 2
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "data_tools" / "make_chat_tokenizer.py"), "--tokenizer", str(assets().tokenizer_model),
         "--output-dir", str(out)],
        capture_output=True, text=True, cwd=root, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: Writing the chat tokenizer {out} failed" in result.stderr and f"{out} was left as it was" in result.stderr
    assert files_in(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["chat"]


@pytest.mark.parametrize("output", ["a file", "a model directory"])
def test_an_output_dir_that_is_a_file_or_a_model_is_refused_before_training(output, tmp_path) -> None:
    """A file as --output-dir was a FileExistsError traceback after training, with output.partial left
    behind; a model's directory (an export) had its tokenizer files replaced by a tokenizer of other ids."""
    if output == "a file":
        target = tmp_path / "out"
        target.write_text("x")
        message = "is a file, not a directory"
    else:
        target = tmp_path / "hf"
        shutil.copytree(assets().tokenizer_dir, target)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"weights")
        message = "holds a model (config.json, model.safetensors)"
    before = {path.name: path.read_bytes() for path in ([target] if target.is_file() else target.iterdir()) if path.is_file()}
    # a missing input: training would fail on it, so the output is checked first
    with pytest.raises(DataError, match=re.escape(f"--output-dir '{target}' {message}")):
        train_tokenizer(tmp_path / "missing.jsonl", target, vocab_size=VOCAB, threads=1, log=quiet)
    after = {path.name: path.read_bytes() for path in ([target] if target.is_file() else target.iterdir()) if path.is_file()}
    assert after == before and sorted(path.name for path in tmp_path.iterdir()) == [target.name]
