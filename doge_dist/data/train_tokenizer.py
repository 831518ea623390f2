"""Train a sentencepiece tokenizer with Doge's special ids, and write its Hugging Face twin.

Settings chosen so that the Hugging Face conversion encodes exactly like sentencepiece and nothing
is lost: identity normalization (no NFKC), whitespace kept as is (code indentation survives),
byte fallback (no <unk> for unseen characters), digits split. Documents are fed line by line
(sentencepiece's "sentences"); at most ``max_sentences`` lines are sampled, with a fixed seed.
"""
from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from doge_dist.data.chat_template import CHAT_SUBDIR, save_chat_tokenizer
from doge_dist.cpus import usable_cpus
from doge_dist.data.errors import DataError, check_output_dir, is_write_failure
from doge_dist.data.inputs import BadRecord, decode_record, iter_records, list_inputs
from doge_dist.data.tokenizer import DOGE_SPECIAL_IDS, SP_MODEL_NAME, write_hf_tokenizer

MAX_SENTENCE_BYTES = 1 << 14


def _sentences(inputs: str | Sequence[str], keys: Sequence[str], log: Callable[[str], None]) -> Iterator[str]:
    """Text lines of every record; bad records are skipped, and so is a record without a --json-keys
    key once earlier records had it (before that, a missing key means the keys are wrong: DataError).
    Records that had the keys are counted, not lines: a first record whose text is blank has no line."""
    start, count, skipped, keyed = time.time(), 0, 0, 0
    files = list_inputs(inputs)
    for index, number, kind, payload in iter_records(files, keys):
        if kind == "json" and not payload.strip():
            continue  # a blank line, no record
        try:
            fields = decode_record(kind, payload, keys)
        except BadRecord:
            skipped += 1
            continue
        except DataError as error:
            if not keyed:
                raise DataError(f"{files[index].path}:{number}: {error}") from None
            skipped += 1
            continue
        keyed += 1
        for key in keys:
            text = fields[key]
            for line in ("\n".join(text) if isinstance(text, list) else text).split("\n"):
                if line.strip():
                    count += 1
                    if count % 200_000 == 0:
                        log(f"read {count} lines ({count / (time.time() - start):.0f} lines/s)")
                    yield line
    log(f"read {count} lines, skipped {skipped} bad records; sentencepiece trains now (no progress lines until it is done)")


def train_tokenizer(
    inputs: str | Sequence[str],
    output_dir: str | os.PathLike,
    vocab_size: int = 32768,
    model_type: str = "bpe",
    json_keys: Sequence[str] = ("text",),
    max_sentences: int = 2_000_000,
    special_ids: dict[str, int] = DOGE_SPECIAL_IDS,
    seed: int = 0,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``output_dir/tokenizer.model``, a Hugging Face tokenizer in ``output_dir`` and the chat twin
    (chat template, see chat_template.py) in ``output_dir/chat``; return the .model path.

    All is written to ``output_dir.partial`` first and moved in when complete, the .model last: a failed
    or killed run leaves a tokenizer already in ``output_dir`` as it was, and a directory with a
    ``tokenizer.model`` is complete, which is what ``make`` goes by. ``threads`` None: the CPUs this
    process may use."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
    used = [value for value in special_ids.values() if value >= 0]  # -1 leaves the token out, as sentencepiece takes it
    if len(set(used)) != len(used):
        raise ValueError(f"Special ids must be distinct (pad must differ from eos; -1 leaves one out): {special_ids}.")
    check_tokenizer_output(output_dir)
    # The first line is read here, not inside sentencepiece, which would turn a DataError into a stack dump.
    sentences = _sentences(inputs, json_keys, log)
    first = next(sentences, None)
    if first is None:
        shown = inputs if isinstance(inputs, (str, os.PathLike)) else " ".join(map(str, inputs))
        raise DataError(f"--input {shown} has no text under --json-keys {' '.join(json_keys)} to train a tokenizer on.")
    out = Path(output_dir)
    scratch = out.resolve().with_name(out.resolve().name + ".partial")  # written here first (see _move_into); "." too
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    failed: list[DataError] = []  # an input that cannot be read to its end, raised from inside sentencepiece

    def reading(lines: Iterator[str]) -> Iterator[str]:
        try:
            yield from lines
        except DataError as error:
            failed.append(error)
            raise

    try:
        spm.set_random_generator_seed(seed)
        start = time.time()
        spm.SentencePieceTrainer.train(
            sentence_iterator=reading(itertools.chain([first], sentences)),
            model_prefix=str(scratch / Path(SP_MODEL_NAME).stem),
            model_type=model_type,
            vocab_size=vocab_size,
            bos_id=special_ids["bos"],
            eos_id=special_ids["eos"],
            pad_id=special_ids["pad"],
            unk_id=special_ids["unk"],
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=threads or usable_cpus(),
            minloglevel=1,
        )
        log(f"sentencepiece trained in {time.time() - start:.0f} s")
        _check_written(scratch / SP_MODEL_NAME, out)
        write_hf_tokenizer(scratch / SP_MODEL_NAME, scratch)
        save_chat_tokenizer(scratch / SP_MODEL_NAME, scratch / CHAT_SUBDIR)
    except BaseException as error:
        shutil.rmtree(scratch, ignore_errors=True)
        if failed:
            raise failed[0] from None  # not sentencepiece's "INTERNAL: ..." stack dump
        if is_write_failure(error):
            raise DataError(f"Writing the tokenizer failed: {error} (a full disk or a file size limit?); {out} was left "
                            "as it was.") from error
        raise
    model = _move_into(scratch, out)
    log(f"Wrote {model}, a Hugging Face tokenizer in {out} and its chat twin in {out / CHAT_SUBDIR}")
    return model


def check_tokenizer_output(output_dir: str | os.PathLike) -> None:
    """Before training, not after it (minutes on a large corpus): the output is a directory, and not
    a model's, whose tokenizer files this would replace with a tokenizer of other ids."""
    from doge_dist.convert.hf import model_files_in  # hf imports torch: only here, not for every import of this module

    out = check_output_dir(output_dir)
    model_files = model_files_in(out)
    if model_files:
        raise DataError(f"--output-dir '{out}' holds a model ({', '.join(model_files)}); a new tokenizer there would replace "
                        "the one the model was trained with: write it to a new directory.")


def _check_written(model: Path, out: Path) -> None:
    """sentencepiece does not report a failed write (a full disk, a file size limit): it leaves the
    .model cut short, which only a read shows."""
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(model))
    except RuntimeError:
        raise DataError(f"Writing the tokenizer failed: sentencepiece wrote a {model.name} it cannot read back (a full "
                        f"disk or a file size limit?); {out} was left as it was.") from None


def _move_into(scratch: Path, out: Path) -> Path:
    """Move the complete tokenizer from ``scratch`` into ``out`` (renames: nothing can fail for lack of
    space), the chat twin as a whole directory and the sentencepiece .model (the Makefile's target) last;
    return the .model path. A run that fails before this leaves ``out`` as it was; one killed during it
    leaves no .model (the old one goes first), so ``make`` trains again."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SP_MODEL_NAME).unlink(missing_ok=True)
    shutil.rmtree(out / CHAT_SUBDIR, ignore_errors=True)
    os.replace(scratch / CHAT_SUBDIR, out / CHAT_SUBDIR)
    for file in sorted(scratch.iterdir(), key=lambda path: path.name == SP_MODEL_NAME):
        os.replace(file, out / file.name)
    scratch.rmdir()
    return out / SP_MODEL_NAME
