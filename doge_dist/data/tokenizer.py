"""One tokenizer object for the whole project, backed by megatron-core's text tokenizers.

``load_tokenizer(path)`` accepts a sentencepiece ``.model`` file or a Hugging Face tokenizer directory.
Both are wrapped by megatron-core's ``MegatronTokenizer`` (the class Megatron-LM's
tools/preprocess_data.py builds), so our .bin files hold exactly the ids Megatron-LM would write, and
the same object is the ``tokenizer`` that megatron-core's GPTDataset needs (``eod``, ``pad``,
``unique_identifiers``).

The Hugging Face directory written for a sentencepiece model (``write_hf_tokenizer``) is a plain
``tokenizer.json`` built by transformers' own sentencepiece converter: no remote code, no network,
and the same ids as sentencepiece for any text (``split_special_tokens`` is on because sentencepiece
encodes a literal "</s>" in text as characters, and so did the training data). Unigram models are the
exception: where two segmentations score the same up to rounding, sentencepiece (float32 sums) and
tokenizers (float64) may choose different ones.
"""
from __future__ import annotations

import json
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence

from doge_dist.data.errors import DataError

# Doge's special token ids (the published checkpoints and configs use these).
DOGE_SPECIAL_IDS = {"bos": 0, "eos": 1, "pad": 2, "unk": 3}
TOKENIZER_TYPES = {"SentencePieceTokenizer": "sentencepiece", "HuggingFaceTokenizer": "huggingface"}
SP_MODEL_NAME = "tokenizer.model"
NEVER_SCORE = -1e9


def _library_for(path: Path, tokenizer_type: Optional[str]) -> str:
    if tokenizer_type is not None:
        if tokenizer_type not in TOKENIZER_TYPES:
            raise DataError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}.")
        library = TOKENIZER_TYPES[tokenizer_type]
    else:
        library = "huggingface" if path.is_dir() else "sentencepiece"
    if library == "huggingface" and not (path.is_dir() and (path / "tokenizer_config.json").is_file()):
        raise DataError(
            f"Tokenizer '{path}' is not a Hugging Face tokenizer directory (no tokenizer_config.json); "
            "pass the directory written by data_tools/train_tokenizer.py or by save_pretrained()."
        )
    if library == "sentencepiece" and path.is_dir():
        raise DataError(f"Tokenizer '{path}' is a directory; SentencePieceTokenizer needs the .model file.")
    return library


class Tokenizer:
    """Text <-> ids for the trainer, the data tools and the exporter.

    ``megatron`` is the megatron-core tokenizer (give it to GPTDatasetConfig); ``encode`` never adds
    bos/eos: documents are separated by ``eod_id`` (= eos) as Megatron does.
    """

    def __init__(self, path: str | os.PathLike, tokenizer_type: Optional[str] = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(
                f"Tokenizer '{self.path}' does not exist; train one with data_tools/train_tokenizer.py "
                "or pass a Hugging Face tokenizer directory."
            )
        self.library = _library_for(self.path, tokenizer_type)
        from megatron.core.tokenizers import MegatronTokenizer

        try:
            self.megatron = MegatronTokenizer.from_pretrained(
                tokenizer_path=str(self.path), metadata_path={"library": self.library}
            )
        except Exception as error:  # sentencepiece/transformers raise many kinds on a bad file
            raise DataError(f"Cannot load tokenizer '{self.path}' ({self.library}): {error}") from error

    def encode(self, text: str) -> list[int]:
        return self.megatron.tokenize(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.megatron.detokenize(list(ids))

    @cached_property
    def vocab_size(self) -> int:
        return int(self.megatron.vocab_size)

    @property
    def bos_id(self) -> Optional[int]:
        return self.megatron.bos

    @property
    def eos_id(self) -> int:
        return self.megatron.eos_id

    @property
    def eod_id(self) -> int:
        """End-of-document id appended by --append-eod (the eos id, as in Megatron-LM)."""
        return self.megatron.eod

    @property
    def pad_id(self) -> Optional[int]:
        pad = self.megatron.pad
        return None if pad is None or pad < 0 else pad

    @property
    def hf_dir(self) -> Optional[Path]:
        """The Hugging Face tokenizer directory next to (or at) ``path``, if there is one."""
        directory = self.path if self.path.is_dir() else self.path.parent
        return directory if (directory / "tokenizer_config.json").is_file() else None

    def save_hf(self, directory: str | os.PathLike) -> Path:
        """Write a Hugging Face tokenizer directory that AutoTokenizer loads with identical ids."""
        directory = Path(directory)
        if self.library == "huggingface":
            directory.mkdir(parents=True, exist_ok=True)
            for item in self.path.iterdir():
                if item.is_file() and item.resolve() != (directory / item.name).resolve():
                    shutil.copy2(item, directory / item.name)
            return directory
        return write_hf_tokenizer(self.path, directory)


def load_tokenizer(path: str | os.PathLike, tokenizer_type: Optional[str] = None) -> Tokenizer:
    """Load a sentencepiece ``.model`` or a Hugging Face tokenizer directory.

    ``tokenizer_type`` is Megatron-LM's name (SentencePieceTokenizer or HuggingFaceTokenizer); by
    default a directory means Hugging Face and a file means sentencepiece.
    """
    return Tokenizer(path, tokenizer_type)


def write_hf_tokenizer(model_file: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Convert a sentencepiece model into a Hugging Face tokenizer directory (tokenizer.json + config).

    Uses transformers' ``SpmConverter.build_tokenizer_from_spm_proto``, which follows the model's own
    normalizer spec; ``legacy=True`` keeps sentencepiece's dummy prefix on text that starts with a space.
    """
    import sentencepiece
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type == 1:  # unigram
        # sentencepiece never matches control/unknown/byte pieces in text ("<s>", "<0x41>"); the Hugging
        # Face lattice would, so those pieces get a score no segmentation picks.
        vocab = [(p.piece, p.score if p.type in (1, 4) else NEVER_SCORE) for p in proto.pieces]
    else:
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    def piece(index: int) -> Optional[str]:
        return processor.id_to_piece(index) if index >= 0 else None

    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=piece(processor.bos_id()),
        eos_token=piece(processor.eos_id()),
        pad_token=piece(processor.pad_id()),
        unk_token=piece(processor.unk_id()),
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )
    directory = Path(directory)
    hf.save_pretrained(str(directory))
    # Older transformers (4.x) know the class as PreTrainedTokenizerFast, not TokenizersBackend.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return directory
