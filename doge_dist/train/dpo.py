"""Direct Preference Optimization (Rafailov et al., 2023) on the pretraining loop.

Per pair, with summed completion log-probs ``pi`` (policy) and ``ref`` (frozen reference):

    rewards = beta * (pi - ref)                      for chosen and rejected
    loss    = -logsigmoid(rewards_chosen - rewards_rejected)

(trl's ``loss_type="sigmoid"`` without label smoothing). The loop averages the loss over the pairs
of the global batch. The reference is the ``run.init_from`` model, built as the policy is (the run's
model.* overrides apply to both): a frozen copy next to the policy (``finetune.reference: model``), or
its log-probs computed once before step 1 and kept in ``run.dir/reference_logps.pt`` and, for the
validation pairs, ``reference_logps_valid.pt`` (``precomputed``: no second model in memory while
training; a resume reuses them, a table of another reference model, data, sequence length or precision
is recomputed). The exact weights a run starts from (the checkpoint a run directory's ``latest`` names
then) are recorded in its checkpoints, and a resume trains against them, not against what run.init_from
names by then. As in TRL (``DPOConfig.disable_dropout``), DPO trains with dropout off. Validation reports
the held-out pairs' loss, rewards, margin and accuracy (``val/loss``, ``dpo_val/*``).
"""
from __future__ import annotations

import itertools
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import Config, ConfigError, ModelConfig
from ..data.chat_dataset import PreferenceDataset, collate_pairs, pairs_without_loss
from ..data.errors import DataError
from ..data.indexed import file_stamp
from ..data.preprocess_chat import mask_prefix
from ..model import DogeForCausalLM
from . import checkpoint
from .distributed import DistEnv, is_launcher_main
from .engine import hf_weights, initial_model, is_hf_directory
from .export import consolidated_state
from .finetune import FinetuneData, FinetuneTask, data_prefixes, pad_id, pad_multiple
from .loop import local_tokens

METRICS = ("dpo/loss", "dpo/rewards_chosen", "dpo/rewards_rejected", "dpo/reward_margin", "dpo/accuracy")
VALID_METRICS = ("dpo_val/rewards_chosen", "dpo_val/rewards_rejected", "dpo_val/reward_margin", "dpo_val/accuracy")
REFERENCE_FILES = {"train": "reference_logps.pt", "valid": "reference_logps_valid.pt"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
DROPOUTS = ("hidden_dropout", "attention_dropout")


def sequence_logps(model: DogeForCausalLM, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] sums of fp32 log-probabilities of the labelled tokens of each row (``labels`` aligned with
    ``logits``), through the model so that tensor-parallel models read their vocabulary shards."""
    return -model.token_losses(logits, labels).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards); rewards are detached."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


@torch.no_grad()
def reference_logps(model: DogeForCausalLM, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids")).logits
    return sequence_logps(model, logits, batch["labels"])


def disable_dropout(model: ModelConfig) -> None:
    """DPO trains without dropout, as TRL's ``DPOConfig(disable_dropout=True)`` does by default: a policy
    with dropout scores every sequence with noise the frozen reference (in eval mode) does not have, so
    the rewards start away from 0 (the loss from log 2) and the gradient follows the noise. The run's
    model (its checkpoints and exports) records dropout 0; said once in the log."""
    on = {key: getattr(model, key) for key in DROPOUTS if getattr(model, key)}
    if on and is_launcher_main():
        turned = ", ".join(f"model.{key} {value} -> 0" for key, value in on.items())
        print(f"[doge-dist] DPO trains with dropout off, as TRL does by default: {turned}", flush=True)
    for key in on:
        setattr(model, key, 0.0)


def weight_stamps(directory: Path) -> list[list]:
    """[name, size, mtime] of each weight file of a checkpoint or HF directory (``file_stamp``): what
    tells weights written there again (a rewound run saving that step anew, a new export) from the ones
    a run started from."""
    return [[p.name, *file_stamp(p)] for p in sorted(directory.iterdir()) if p.suffix in WEIGHT_SUFFIXES]


def reference_source(init_from: str) -> dict:
    """The weights ``init_from`` names now, exactly: the checkpoint directory (root/step_N) a run
    directory's ``latest`` names, or the HF directory, with its ``weight_stamps``. Every checkpoint
    of the run records it: its run may train on (``latest`` moves) or prune that step meanwhile."""
    path = Path(init_from) if is_hf_directory(init_from) else Path(*checkpoint.resolve_checkpoint(init_from))
    return {"path": str(path.resolve()), "files": weight_stamps(path)}


def names_one_model(path: str) -> bool:
    """An HF directory or one step directory: a reference named explicitly, not a run whose ``latest`` moves."""
    return is_hf_directory(path) or (Path(path) / checkpoint.META).is_file()


def resumed_reference(init_from: str, start: tuple[Path, str]) -> dict:
    """The reference of a resume from checkpoint ``start``: the one recorded there, which must be there
    unchanged (else a ConfigError naming it), unless run.init_from now names another HF or step
    directory explicitly (said in the log). A checkpoint written before the meta recorded the
    reference: what run.init_from names now."""
    recorded = (checkpoint.read_meta(*start).get("task") or {}).get("reference")
    if recorded is None or (names_one_model(init_from) and str(Path(init_from).resolve()) != recorded["path"]):
        if recorded is not None and is_launcher_main():
            print(f"[doge-dist] run.init_from names {init_from}: the DPO reference from here on, instead of "
                  f"{recorded['path']}, which this run trained against up to {start[1]}", flush=True)
        return reference_source(init_from)
    path = Path(recorded["path"])
    present = names_one_model(str(path))
    if present and weight_stamps(path) == recorded["files"]:
        return recorded
    state = ("has had its weight files written again since" if present
             else "is gone (deleted, or pruned by its run's train.keep_last)")
    raise ConfigError(
        f"Checkpoint {start[0] / start[1]} of this DPO run was trained against the reference model {path} (what "
        f"run.init_from named when the run started), which {state}: resuming against other weights would silently "
        f"optimise another objective. Restore {path}, or set run.init_from to the one checkpoint or Hugging Face "
        "directory to go on against instead (a step directory, .../checkpoints/step_N, not a run directory)."
    )


def load_reference(config: Config, source: dict, device: torch.device, run_dir: Path) -> DogeForCausalLM:
    """The frozen reference: the weights of ``source`` (``reference_source``) in a model built as the
    policy is (``config.model``: init_from's config with the run's model.* overrides), so that it is the
    untrained policy, as TRL's reference is a copy of it; a universal conversion of a checkpoint goes
    into this run's ``run_dir``."""
    path = Path(source["path"])
    if is_hf_directory(str(path)):
        weights = hf_weights(path, config.model)
    else:
        weights = consolidated_state(path.parent, path.name, checkpoint.universal_root(path.parent, run_dir))
    model = initial_model(config, weights)
    model.requires_grad_(False)
    return model.to(device).eval()


def match_dtypes(model: torch.nn.Module, like: torch.nn.Module) -> None:
    """Give ``model``'s parameters and buffers the dtypes of the same-named tensors of ``like``: the
    reference takes the precision DeepSpeed gave the policy (bf16 parameters; buffers such as RoPE's
    inverse frequencies as the DeepSpeed version leaves them), so that it computes exactly as the
    untrained policy does and every reward is 0 before the first update."""
    tensors = lambda m: itertools.chain(m.named_parameters(), m.named_buffers())  # noqa: E731
    dtypes = {name: tensor.dtype for name, tensor in tensors(like)}
    for name, tensor in tensors(model):
        if name in dtypes and tensor.dtype != dtypes[name]:
            tensor.data = tensor.data.to(dtypes[name])


class DPOTask(FinetuneTask):
    pairs = True
    reports_perplexity = False  # the loss is per pair, not a token cross entropy
    sequences_per_sample = 2  # a pair: chosen and rejected, both through the policy (the tokens per step at most)

    def __init__(self) -> None:
        super().__init__()
        self.beta = 0.1
        self.reference: Optional[DogeForCausalLM] = None
        self.reference_source: Optional[dict] = None  # reference_source, fixed by setup
        self.tables: dict[str, torch.Tensor] = {}  # split -> [pairs, 2] precomputed reference log-probs
        self._precompute_for: Optional[tuple[Config, DistEnv]] = None  # until the first step
        # split -> sums of the METRICS over its pairs since the last log point, then the pair count
        self._sums = {split: torch.zeros(len(METRICS) + 1, dtype=torch.float64) for split in REFERENCE_FILES}

    def dataset(self, config: Config, split: str) -> Optional[PreferenceDataset]:
        sequences = self.sequences(config, split)
        return PreferenceDataset(sequences, config.data.seq_length) if sequences else None

    def check(self, config: Config) -> int:
        """As SFT's: a split none of whose pairs has a loss is refused before any model is built (every step
        would read loss log 2 with no gradient), some such training pairs are warned about. Turns dropout
        off (``disable_dropout``), before the run's config is checked and recorded."""
        disable_dropout(config.model)
        pairs = super().check(config)
        seq_length = config.data.seq_length
        for split in ("train", "valid"):
            sequences = self.sequences(config, split)
            if sequences is None:
                continue
            total, cut = len(sequences) // 2, pairs_without_loss(sequences, seq_length)
            if cut == total:
                raise DataError(f"None of the {total} pairs of data.{split}_data has chosen and rejected completions that "
                                f"start and differ within data.seq_length = {seq_length} tokens: there is nothing to train "
                                "on or score (the loss would read log 2, with no gradient). Raise data.seq_length, or "
                                "preprocess with --max-prompt-length + --max-completion-length <= data.seq_length.")
            if split == "train" and cut and is_launcher_main():
                warnings.warn(f"{cut} of {total} training pairs have a completion wholly beyond data.seq_length = "
                              f"{seq_length} tokens or chosen and rejected identical within it: they train nothing and count "
                              "as reward 0, not accurate. Preprocess with --max-prompt-length + --max-completion-length "
                              "<= data.seq_length.")
        return pairs

    def collate(self, config: Config) -> Callable:
        return partial(collate_pairs, pad_id=pad_id(config), multiple=pad_multiple(config))

    def count(self, batch: dict) -> int:
        return len(batch["index"])

    def setup(self, config: Config, start: Optional[tuple[Path, str]]) -> None:
        """The reference, fixed before any model is built: a resume's is the one its run trained against
        (``resumed_reference``), a new run's what run.init_from names now."""
        super().setup(config, start)
        init_from = config.run.init_from
        self.reference_source = resumed_reference(init_from, start) if start else reference_source(init_from)

    def checkpoint_meta(self) -> dict:
        return {"reference": self.reference_source}

    def build_data(self, config: Config, env: DistEnv, dp_rank: int, dp_size: int, consumed_samples: int, cache_dir: str,
                   step: int = 0, saved_split: int = 0) -> FinetuneData:
        self.beta = config.finetune.beta
        self.reference = load_reference(config, self.reference_source, env.device, Path(config.run.dir))
        if config.finetune.reference == "precomputed":
            self._precompute_for = (config, env)
        return super().build_data(config, env, dp_rank, dp_size, consumed_samples, cache_dir, step, saved_split)

    def _precompute(self, config: Config, env: DistEnv, split: str) -> Optional[torch.Tensor]:
        """Reference log-probs of every pair of ``split`` (None without such data), split over the
        ranks, summed, saved once by rank 0 in ``run.dir``."""
        pairs = self.dataset(config, split)
        if pairs is None:
            return None
        path = Path(config.run.dir) / REFERENCE_FILES[split]
        source = self._table_source(config, split, len(pairs))
        if path.is_file():
            saved = torch.load(path, map_location=env.device)
            if isinstance(saved, dict) and saved.get("source") == source:
                return saved["logps"]
        table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=env.device)
        rank, world = dist.get_rank(), dist.get_world_size()
        collate = self.collate(config)
        mine = list(range(rank, len(pairs), world))
        starts = range(0, len(mine), config.train.micro_batch_size)
        every = -(-len(starts) // 10)  # about ten progress lines
        if env.is_main:
            print(f"[doge-dist] reference log-probs of the {len(pairs):,} {split} pairs, once, into {path}", flush=True)
        for done, start in enumerate(starts, start=1):
            batch = collate([pairs[i] for i in mine[start : start + config.train.micro_batch_size]])
            batch = {k: v.to(env.device) for k, v in batch.items()}
            logps = reference_logps(self.reference, batch).double()
            table[batch["index"]] = torch.stack(logps.chunk(2), dim=1)
            if env.is_main and (done % every == 0 or done == len(starts)):
                print(f"[doge-dist]   {split} reference log-probs: {done}/{len(starts)} micro-batches", flush=True)
        dist.all_reduce(table)
        if env.is_main:  # whole or not at all: a run killed while saving recomputes on resume
            unfinished = path.with_name(path.name + ".partial")
            torch.save({"source": source, "logps": table.cpu()}, unfinished)
            os.replace(unfinished, path)
        return table

    def _table_source(self, config: Config, split: str, pairs: int) -> dict:
        """What a saved reference table was computed from: a table of another reference model (its
        ``reference_source``: weight files with their size and mtime), data, sequence length or precision
        (a rerun in the same run.dir with other settings) is recomputed, as is one whose data files were
        written again since (data preprocessed again into the same prefix, with as many pairs)."""
        entries = config.data.train_data if split == "train" else config.data.valid_data
        prefixes = [str(Path(prefix).resolve()) for prefix in data_prefixes(entries, f"data.{split}_data")]
        data_files = [Path(p + ext) for prefix in prefixes for p in (prefix, mask_prefix(prefix)) for ext in (".bin", ".idx")]
        return {"reference": self.reference_source, "data": prefixes, "pairs": pairs, "seq_length": config.data.seq_length,
                "dtype": str(next(self.reference.parameters()).dtype), "files": [(str(p.resolve()), *file_stamp(p)) for p in sorted(data_files)]}

    def prepare(self, engine) -> None:
        """Before step 1, when the policy has DeepSpeed's dtypes: the reference takes them, and with
        ``precomputed`` scores every training pair and, when the run validates, every validation pair
        once (all ranks call this together) and is dropped. The loop keeps this time out of tok/s."""
        match_dtypes(self.reference, engine.module)
        if self._precompute_for is not None:
            config, env = self._precompute_for
            splits = REFERENCE_FILES if config.train.eval_interval > 0 else ("train",)
            tables = {split: self._precompute(config, env, split) for split in splits}
            self.tables = {split: table for split, table in tables.items() if table is not None}
            self.reference, self._precompute_for = None, None

    def forward_loss(self, engine, batch: dict):
        """(sum of pair losses, pair count, balance loss) for a [2B, T] batch: B chosen, then B rejected;
        training pairs with gradients enabled, validation pairs (the loop's ``evaluate``) without. A pair
        of ``index`` -1 fills up a rank's last validation micro-batch (``finetune.validation_batches``):
        weight 0 in every sum and in the count."""
        split = "train" if torch.is_grad_enabled() else "valid"
        out = engine(batch["input_ids"], position_ids=batch.get("position_ids"), token_mask=batch.get("token_mask"))
        stats = self.routing_stats(engine)
        if stats is not None:
            stats.update(out.routings, local_tokens(batch.get("token_mask"), len(out.routings[0].expert_ids)))
        policy = sequence_logps(engine.module, out.logits, batch["labels"])
        index = batch["index"]
        if self.tables:
            reference = self.tables[split][index.clamp(min=0)].to(policy.dtype).T.reshape(-1)
        else:
            reference = reference_logps(self.reference, batch)
        pairs = len(index)
        losses, chosen, rejected = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.beta)
        weight = (index >= 0).to(losses.dtype)
        losses, chosen, rejected = losses * weight, chosen * weight, rejected * weight
        values = [losses.detach().sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                  ((chosen > rejected) * weight).sum(), weight.sum()]
        # summed where they were computed: a copy to the host here would wait for the GPU every micro-batch
        sums = torch.stack([v.double() for v in values])
        self._sums[split] = self._sums[split].to(sums.device) + sums
        return losses.sum(), values[-1], out.balance_loss

    def log_metrics(self, device: torch.device) -> dict[str, float]:
        """Means over the training pairs of all ranks since the previous log point, and a MoE policy's
        routing statistics (``moe/*``, as pretraining logs them)."""
        return {**self._means("train", METRICS, device), **super().log_metrics(device)}

    def validation_metrics(self, device: torch.device) -> dict[str, float]:
        """Means over the validation pairs of all ranks (the loss itself is the loop's ``val/loss``)."""
        means = self._means("valid", ("loss",) + VALID_METRICS, device)
        del means["loss"]
        return means

    def _means(self, split: str, names: tuple[str, ...], device: torch.device) -> dict[str, float]:
        """The accumulated sums of ``split`` divided by its pair count, over all data-parallel ranks;
        a collective call that starts the next accumulation."""
        from ..parallel.state import data_parallel_group

        totals = self._sums[split].to(device)
        dist.all_reduce(totals, group=data_parallel_group())  # tensor-parallel ranks hold the same pairs
        self._sums[split] = torch.zeros_like(totals)
        pairs = max(float(totals[-1]), 1.0)
        return {name: float(value) / pairs for name, value in zip(names, totals[:-1].tolist())}
