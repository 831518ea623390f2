"""Data pipeline: tokenizers, megatron-core indexed datasets, blending, resumable sampling.

Public API (what the trainer, the exporter and data_tools use):

- ``load_tokenizer(path, tokenizer_type=None) -> Tokenizer``: sentencepiece .model or HF directory;
  ``encode``, ``decode``, ``vocab_size``, ``bos_id``, ``eos_id``, ``eod_id``, ``pad_id``, ``save_hf(dir)``,
  ``hf_dir``, ``megatron`` (the megatron-core tokenizer object).
- ``validate_prefix(prefix, vocab_size) -> PrefixInfo``: checks one .bin/.idx pair, raises ``DataError``.
- ``build_datasets(data_config, tokenizer, num_samples) -> (train, valid, test)``: megatron-core GPTDatasets
  blended and split; validates every prefix first.
- ``ResumableSampler(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size)`` and
  ``collate`` / ``build_dataloader``: batches keyed by consumed samples, resumable across DP sizes.
- ``preprocess(...)``: raw text -> .bin/.idx (data_tools/preprocess_data.py).
"""
from doge_dist.data.blend import build_datasets, parse_blend
from doge_dist.data.errors import DataError
from doge_dist.data.indexed import PrefixInfo, document_prefix, validate_prefix
from doge_dist.data.preprocess import PreprocessReport, preprocess
from doge_dist.data.sampler import ResumableSampler, build_dataloader, collate
from doge_dist.data.tokenizer import DOGE_SPECIAL_IDS, Tokenizer, load_tokenizer

__all__ = [
    "DOGE_SPECIAL_IDS",
    "DataError",
    "PrefixInfo",
    "PreprocessReport",
    "ResumableSampler",
    "Tokenizer",
    "build_dataloader",
    "build_datasets",
    "collate",
    "document_prefix",
    "load_tokenizer",
    "parse_blend",
    "preprocess",
    "validate_prefix",
]
