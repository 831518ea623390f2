"""Supervised fine-tuning on the pretraining loop: chat data in, the same next-token loss out.

SFT differs from pretraining only in its data (conversations with a loss mask, packed or padded,
two epochs by default), so ``SFTTask`` is ``PretrainTask`` with another ``build_data``. The pieces
here that DPO shares: ``FinetuneData`` (the rank's micro-batches, resumable by consumed samples),
sizing a run in epochs, and the model shape inherited from ``run.init_from``.
"""
from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import DataLoader, Dataset

from ..config import Config, ConfigError, DataConfig, ModelConfig, apply_overrides, check_moe_keys
from ..data import DataError, ResumableSampler
from ..data.blend import parse_blend
from ..data.sampler import leave_stop_signals_to_the_trainer
from ..data.chat_dataset import (EpochShuffled, MaskedSequences, SFTDataset, collate_lm, conversations_without_loss,
                                 scoring_nothing)
from .data import split_samples
from .distributed import DistEnv, is_launcher_main
from .task import PretrainTask


class FinetuneData:
    """This rank's micro-batches of a map-style dataset, epoch after shuffled epoch (the contract of
    ``train.data.TrainData``: ``next_step``, ``validation_batches``, ``global_batch``, ``split_samples``)."""

    def __init__(self, train_set: Dataset, valid_set: Optional[Dataset], collate: Callable, config: Config,
                 dp_rank: int, dp_size: int, consumed_samples: int, step: int = 0, saved_split: int = 0) -> None:
        train = config.train
        self.micro_batches_per_step = train.gradient_accumulation_steps
        self.global_batch = train.micro_batch_size * train.gradient_accumulation_steps * dp_size
        self.split_samples = split_samples(train, self.global_batch, consumed_samples, step, saved_split)
        sampler = ResumableSampler(self.split_samples, consumed_samples, train.micro_batch_size, dp_rank, dp_size)
        shuffled = EpochShuffled(train_set, self.split_samples, config.data.seed)
        self.train_set = shuffled
        self._train = iter(DataLoader(shuffled, batch_sampler=sampler, collate_fn=collate,
                                      num_workers=config.data.num_workers, worker_init_fn=leave_stop_signals_to_the_trainer))
        self._valid: list[dict] = []
        if valid_set is not None and train.eval_interval > 0:
            self._valid = validation_batches(valid_set, collate, min(len(valid_set), train.eval_iters * self.global_batch),
                                             train.micro_batch_size, dp_rank, dp_size)

    def next_step(self) -> Optional[list[dict]]:
        batches = [next(self._train, None) for _ in range(self.micro_batches_per_step)]
        return None if any(b is None for b in batches) else batches

    def validation_batches(self) -> list[dict]:
        return self._valid


def validation_batches(valid_set: Dataset, collate: Callable, samples: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> list[dict]:
    """This rank's micro-batches of the first ``samples`` of ``valid_set``: its strided share, with the
    last micro-batch filled up with ``scoring_nothing`` rows to as many micro-batches of as many rows as
    the rank with the most (ZeRO-3 and tensor parallelism gather collectively inside every forward).
    So every sample is scored once whatever the layout, as HF Trainer/TRL score a whole eval set; whole
    rounds of every rank would leave up to micro x dp - 1 samples out, others for other layouts. Read
    by index without a DataLoader, whose iterator draws its seed from torch's global generator and would
    shift every later dropout mask of a run that validates."""
    rows = [valid_set[i] for i in range(dp_rank, samples, dp_size)]
    largest_share = math.ceil(samples / dp_size)  # rank 0's
    filled = math.ceil(largest_share / micro_batch_size) * micro_batch_size
    if len(rows) < filled:
        rows += [scoring_nothing(valid_set[0])] * (filled - len(rows))
    return [collate(rows[start : start + micro_batch_size]) for start in range(0, filled, micro_batch_size)]


def data_prefixes(entries: list, where: str) -> list[str]:
    """Chat prefixes of data.train_data / data.valid_data (concatenated; weights are not supported)."""
    blend = parse_blend(entries, where)
    if blend is None:
        return []
    if blend[1] is not None:
        raise ConfigError(f"{where}: SFT/DPO data is concatenated, not blended; list prefixes without weights.")
    return blend[0]


def pad_id(config: Config) -> int:
    return config.model.pad_token_id if config.model.pad_token_id is not None else 0


def pad_multiple(config: Config) -> int:
    """Padded batches' length multiple: sequence parallelism gives every tensor-parallel rank T/tp tokens."""
    return config.parallel.tensor_parallel if config.parallel.sequence_parallel else 1


def check_chat_tokenizer(path: str) -> None:
    """data.tokenizer goes into every export of a fine-tuned run: without the chat template the export
    could not be prompted with ``apply_chat_template`` (nor ``launch/generate.py --chat``)."""
    from ..data.chat_template import load_chat_tokenizer

    try:
        load_chat_tokenizer(path)
    except DataError as error:
        raise DataError(f"data.tokenizer: {error} A fine-tuned model is exported with this tokenizer as its chat "
                        "tokenizer (data_tools/train_tokenizer.py writes one to OUTPUT_DIR/chat).") from None


def check_no_split(config: Config) -> None:
    """Chat prefixes are read whole: data.split does nothing here, so a split meant to hold data out, or
    a validation that would read from it, would silently not happen (pretraining's advice, "a split like
    969,30,1", too)."""
    if config.data.split != DataConfig.split:
        raise ConfigError(f"data.split = {config.data.split!r} does nothing for SFT/DPO: chat data is not split, the run "
                          "trains on all of data.train_data; remove data.split and list a held-out set (preprocessed "
                          "with data_tools/preprocess_chat.py) in data.valid_data.")
    if config.train.eval_interval > 0 and not config.data.valid_data:
        raise ConfigError("train.eval_interval > 0 but data.valid_data is empty: SFT/DPO chat data is not split by "
                          "data.split; preprocess a held-out set with data_tools/preprocess_chat.py and list it in "
                          "data.valid_data, or set train.eval_interval=0.")


class FinetuneTask(PretrainTask):
    """A language-model task whose data comes from chat prefixes; subclasses choose the dataset."""

    pairs = False

    def dataset(self, config: Config, split: str) -> Optional[Dataset]:
        raise NotImplementedError

    def collate(self, config: Config) -> Callable:
        return partial(collate_lm, pad_id=pad_id(config), multiple=pad_multiple(config))

    def sequences(self, config: Config, split: str, vocab_size: Optional[int] = None) -> Optional[MaskedSequences]:
        entries = config.data.train_data if split == "train" else config.data.valid_data
        prefixes = data_prefixes(entries, f"data.{split}_data")
        return MaskedSequences(prefixes, self.pairs, vocab_size) if prefixes else None

    def check(self, config: Config) -> int:
        """Checks before any process group exists; returns the number of training samples."""
        if not config.run.init_from:
            raise ConfigError("run.init_from is not set: fine-tuning starts from a pretrained run directory or Hugging Face directory.")
        check_no_split(config)
        train = self.dataset(config, "train")
        if train is None or len(train) == 0:
            raise DataError("data.train_data is empty: list prefixes written by data_tools/preprocess_chat.py.")
        self.dataset(config, "valid")
        for split in ("train", "valid"):  # every token id fits the model's embedding, as pretraining data is checked
            self.sequences(config, split, config.model.vocab_size)
        if config.data.tokenizer:
            check_chat_tokenizer(config.data.tokenizer)
        return len(train)

    def check_data(self, config: Config) -> None:
        """Chat prefixes are read whole (``check_no_split``); ``check``, which the launcher runs first, validated them."""

    def build_data(self, config: Config, env: DistEnv, dp_rank: int, dp_size: int, consumed_samples: int, cache_dir: str,
                   step: int = 0, saved_split: int = 0) -> FinetuneData:
        return FinetuneData(self.dataset(config, "train"), self.dataset(config, "valid"), self.collate(config),
                            config, dp_rank, dp_size, consumed_samples, step, saved_split)


class SFTTask(FinetuneTask):
    """Supervised fine-tuning: next-token loss on the assistant tokens of conversations."""

    def dataset(self, config: Config, split: str) -> Optional[SFTDataset]:
        sequences = self.sequences(config, split)
        return SFTDataset(sequences, config.data.seq_length, config.finetune.packing) if sequences else None

    def check(self, config: Config) -> int:
        samples = super().check(config)
        seq_length = config.data.seq_length
        for split in ("train", "valid"):
            sequences = self.sequences(config, split)
            if sequences is None:
                continue
            empty = conversations_without_loss(sequences, seq_length)
            if empty == len(sequences):
                raise DataError(f"None of the {len(sequences)} conversations of data.{split}_data has an assistant token "
                                f"within data.seq_length = {seq_length} tokens: there is nothing to train on or score "
                                "(the loss would read 0). Raise data.seq_length.")
            cut = int((sequences.lengths > seq_length).sum())
            if split == "train" and cut and is_launcher_main():
                warnings.warn(f"{cut} of {len(sequences)} training conversations are longer than data.seq_length = "
                              f"{seq_length} tokens: their tokens beyond it are not trained on ({empty} have no assistant "
                              "token left). Raise data.seq_length, or cut them when preprocessing (preprocess_chat.py --max-length).")
        return samples


SIZING_KEYS = ("max_steps", "warmup_steps", "decay_steps")


def keys_given(raw: Optional[dict], overrides: list[str], section: str, keys: tuple[str, ...]) -> frozenset[str]:
    """Which of ``keys`` of ``section`` the YAML or an override sets (a default cannot be told from a
    value set to it)."""
    written = (raw or {}).get(section) or {}
    return frozenset(key for key in keys if key in written or any(o.startswith(f"{section}.{key}=") for o in overrides))


def steps_given(raw: Optional[dict], overrides: list[str]) -> frozenset[str]:
    """Which of train.max_steps, warmup_steps and decay_steps the YAML's train section or an override sets."""
    return keys_given(raw, overrides, "train", SIZING_KEYS)


def check_decay_ratio(config: Config, raw: Optional[dict], overrides: list[str]) -> None:
    """finetune.decay_ratio sizes the wsd scheduler's decay; the cosine scheduler decays over every step
    after the warmup, so a decay_ratio given with it would be ignored without a word (as cosine refuses
    train.decay_steps)."""
    if config.train.scheduler != "wsd" and keys_given(raw, overrides, "finetune", ("decay_ratio",)):
        raise ConfigError(f"finetune.decay_ratio sizes the wsd scheduler's decay, and train.scheduler = "
                          f"{config.train.scheduler!r} decays over every step after the warmup: remove finetune.decay_ratio, "
                          "or set train.scheduler=wsd.")


def size_in_epochs(config: Config, samples: int, world_size: int, given: frozenset[str] = frozenset()) -> str:
    """train.max_steps/warmup_steps(/decay_steps) from finetune.epochs (see FinetuneConfig); what the
    user gave (``given``, see steps_given) wins, as in the HF Trainer: a train.max_steps over the
    epochs (the ratios then apply to it), a train.warmup_steps or decay_steps over its ratio. Returns
    the line that says how the run was sized."""
    finetune, train = config.finetune, config.train
    dp_size = max(1, world_size // config.parallel.tensor_parallel)
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * dp_size
    if finetune.epochs <= 0:
        return (f"finetune.epochs = 0: train.max_steps {train.max_steps}, warmup {train.warmup_steps} steps as written "
                f"({train.max_steps * global_batch / samples:.3g} epochs of {samples} samples)")
    if "max_steps" not in given:
        train.max_steps = max(1, math.ceil(finetune.epochs * samples / global_batch))
    if "warmup_steps" not in given:
        train.warmup_steps = math.ceil(finetune.warmup_ratio * train.max_steps)  # the HF Trainer's get_warmup_steps
    if train.scheduler == "wsd" and "decay_steps" not in given:
        # at least 0: a given warmup longer than the run is named alone by the schedule check
        train.decay_steps = max(0, min(round(finetune.decay_ratio * train.max_steps), train.max_steps - train.warmup_steps))
    as_given = {key: " (as given)" if key in given else "" for key in SIZING_KEYS}
    decay = f", decay {train.decay_steps}{as_given['decay_steps']}" if train.scheduler == "wsd" else ""
    source = ("as given, which wins over finetune.epochs" if "max_steps" in given
              else f"from finetune.epochs = {finetune.epochs:g}")
    return (f"train.max_steps = {train.max_steps} {source} ({train.max_steps * global_batch / samples:.3g} epochs of "
            f"{samples} samples, {global_batch} per step), warmup {train.warmup_steps}{as_given['warmup_steps']}{decay} steps")


def continued_model(init_from: str, overrides: list[str]) -> ModelConfig:
    """run.init_from's model with the model.* overrides on top (model.attn_backend=eager, a longer
    max_position_embeddings...): without them a single override built ModelConfig's defaults."""
    saved = model_config_of(init_from)
    model_overrides = [o for o in overrides if o.startswith("model.")]
    values = apply_overrides({"model": saved.to_dict()}, model_overrides)["model"]
    model = ModelConfig.from_dict(values, f"run.init_from's model ({init_from}) with the model.* overrides")
    given = apply_overrides({}, model_overrides).get("model") or {}
    check_moe_keys(model, given, "the command-line overrides", "the model (run.init_from's)")
    return model


def model_config_of(init_from: str, key: str = "run.init_from") -> ModelConfig:
    """The model shape of a Hugging Face directory or a doge-dist run/checkpoint; errors name ``key``."""
    from . import checkpoint
    from .preflight import check_init_from

    check_init_from(init_from, key)
    if (Path(init_from) / "config.json").is_file():
        from ..convert.hf import hf_model_config

        return hf_model_config(init_from)
    try:
        root, tag = checkpoint.resolve_checkpoint(init_from)
    except ConfigError as error:  # e.g. the pretraining run has not saved a checkpoint yet
        raise ConfigError(f"{key} = {error}") from None
    return ModelConfig(**checkpoint.read_meta(root, tag)["model"])


# ModelConfig fields beside the tensor shapes that decide what a model's weights compute (max_position_embeddings
# only moves where dynamic NTK starts, beyond the trained length)
FUNCTION_FIELDS = ("rms_norm_eps", "hidden_act", "rope_theta", "rope_scaling", "keep_window_size",
                   "num_experts_per_tok", "norm_topk_prob", "router_layout")


def check_continued_model(saved: ModelConfig, model: ModelConfig, source: str) -> None:
    """Compare run.init_from's own config (``saved``, from ``model_config_of``) with the run's model
    section, which the loaded weights are built into: only tensor shapes are checked on load, so a
    tied model would silently drop a trained untied LM head (an error), another attention variant
    lacks or has extra attention weights (an error), and any other field of ``FUNCTION_FIELDS`` that
    differs makes the run start from another function than the one it continues (a warning naming
    both values: a longer context or the per-token router may be meant)."""
    if model.tie_word_embeddings and not saved.tie_word_embeddings:
        raise ConfigError(
            f"run.init_from '{source}' has an untied LM head (tie_word_embeddings false) and this run's model ties it to "
            "the embeddings, which would drop the trained LM head: set model.tie_word_embeddings=false."
        )
    if model.attention_variant != saved.attention_variant:  # v1: small-doge's own directories
        raise ConfigError(
            f"run.init_from '{source}' is a model of attention_variant '{saved.attention_variant}' and this run's model "
            f"is '{model.attention_variant}', whose attention weights it does not have: set "
            f"model.attention_variant={saved.attention_variant}."
        )
    differing = saved.fields_differing_from(model)
    for field in FUNCTION_FIELDS:
        if field in differing:
            warnings.warn(
                f"run.init_from '{source}' was trained with model.{field}={getattr(saved, field)!r} and this run has "
                f"{getattr(model, field)!r}: its weights compute another function in this run; set "
                f"model.{field}={getattr(saved, field)!r} to continue the same model."
            )
