"""Train a sentencepiece tokenizer with Doge's special ids, and write its Hugging Face twin.

Settings chosen so that the Hugging Face conversion encodes exactly like sentencepiece and nothing
is lost: identity normalization (no NFKC), whitespace kept as is (code indentation survives),
byte fallback (no <unk> for unseen characters), digits split. Documents are fed line by line
(sentencepiece's "sentences"); at most ``max_sentences`` lines are sampled, with a fixed seed.
"""
from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from doge_dist.data.chat_template import CHAT_SUBDIR, write_chat_tokenizer
from doge_dist.data.errors import DataError
from doge_dist.data.inputs import BadRecord, decode_record, iter_records, list_inputs
from doge_dist.data.tokenizer import DOGE_SPECIAL_IDS, SP_MODEL_NAME, write_hf_tokenizer

MAX_SENTENCE_BYTES = 1 << 14


def _sentences(inputs: str | Sequence[str], keys: Sequence[str], log: Callable[[str], None]) -> Iterator[str]:
    """Text lines of every record; bad records are skipped, and so is a record without a --json-keys
    key once earlier records had it (before that, a missing key means the keys are wrong: DataError)."""
    start, count, skipped = time.time(), 0, 0
    files = list_inputs(inputs)
    for index, number, kind, payload in iter_records(files, keys):
        try:
            fields = decode_record(kind, payload, keys)
        except BadRecord:
            skipped += 1
            continue
        except DataError as error:
            if not count:
                raise DataError(f"{files[index].path}:{number}: {error}") from None
            skipped += 1
            continue
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
    threads: int = os.cpu_count() or 1,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``output_dir/tokenizer.model``, a Hugging Face tokenizer in ``output_dir`` and the chat twin
    (chat template, see chat_template.py) in ``output_dir/chat``; return the .model path.

    The .model appears last (sentencepiece writes ``tokenizer.partial.model``, renamed once both twins
    are written) and an old one is removed first: a directory with a ``tokenizer.model`` is complete,
    which is what ``make`` goes by."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
    if len(set(special_ids.values())) != len(special_ids):
        raise ValueError(f"Special ids must be distinct (pad must differ from eos): {special_ids}.")
    # The first line is read here, not inside sentencepiece, which would turn a DataError into a stack dump.
    sentences = _sentences(inputs, json_keys, log)
    first = next(sentences, None)
    if first is None:
        shown = inputs if isinstance(inputs, (str, os.PathLike)) else " ".join(map(str, inputs))
        raise DataError(f"--input {shown} has no text under --json-keys {' '.join(json_keys)} to train a tokenizer on.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = out / SP_MODEL_NAME
    model.unlink(missing_ok=True)
    partial = out / f"{model.stem}.partial"
    spm.set_random_generator_seed(seed)
    start = time.time()
    failed: list[DataError] = []  # an input that cannot be read to its end, raised from inside sentencepiece

    def reading(lines: Iterator[str]) -> Iterator[str]:
        try:
            yield from lines
        except DataError as error:
            failed.append(error)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=reading(itertools.chain([first], sentences)),
            model_prefix=str(partial),
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
            num_threads=threads,
            minloglevel=1,
        )
    except RuntimeError:
        if failed:
            raise failed[0] from None  # not sentencepiece's "INTERNAL: ..." stack dump
        raise
    log(f"trained in {time.time() - start:.0f} s")
    write_hf_tokenizer(f"{partial}.model", out)
    write_chat_tokenizer(f"{partial}.model", out / CHAT_SUBDIR)
    os.replace(f"{partial}.vocab", model.with_suffix(".vocab"))
    os.replace(f"{partial}.model", model)
    log(f"Wrote {model}, a Hugging Face tokenizer in {out} and its chat twin in {out / CHAT_SUBDIR}")
    return model
