"""Pretraining, top to bottom: checks, process group, engine, resume, data, then the step loop.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every data-parallel rank.
The loss is exact over the global batch: each micro-batch contributes its *sum* of token losses,
scaled by ``accumulation x dp / global_token_count``, because DeepSpeed divides by the accumulation
steps and averages over data-parallel ranks; the result is the mean over every loss token of the
global batch, as one big batch would give (the token count is all-reduced before the first backward).
"""
from __future__ import annotations

import json
import math
import signal
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from megatron.core import parallel_state

from ..config import Config, ConfigError, TrainConfig
from ..model.moe_stats import MoEStats
from ..parallel.apply import universal_checkpoint_info
from ..parallel.state import ParallelLayout, data_parallel_group, initialize_parallel
from ..model.flops import training_flops
from . import checkpoint
from .checkpoint import Progress
from .data import data_order, move, warn_if_data_order_changed
from .distributed import DistEnv, all_reduce_sum, init_distributed, launcher_world_size
from .ds_config import bf16_enabled, data_type, zero_stage
from .engine import build_engine, is_hf_directory
from .export import consolidated_state
from .finetune import check_continued_model, model_config_of
from .host_memory import keep_freed_memory
from .metrics import Reporter, peak_tflops
from .optim import DenseFreeze
from .preflight import check_run
from .schedule import lr_multipliers, reapply_optimizer_settings, warn_if_lr_jumps
from .task import PretrainTask, Task


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


class StopRequest:
    """SIGTERM and SIGUSR1 (Slurm preemption) only set a flag: the loop agrees on it across ranks at
    the next step, saves a checkpoint and returns."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum


def local_tokens(token_mask: Optional[torch.Tensor], routed: int) -> Optional[torch.Tensor]:
    """The part of a [B, T] token mask that this rank's ``routed`` tokens are: under sequence
    parallelism each tensor-parallel rank routes its own chunk of every sequence."""
    if token_mask is None or token_mask.numel() == routed:
        return token_mask
    chunks = token_mask.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=1)
    return chunks[parallel_state.get_tensor_model_parallel_rank()]


def forward_loss(engine, batch: dict, moe_stats: Optional[MoEStats] = None) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(sum of token losses, loss-token count, MoE balance loss or None) for one micro-batch;
    ``moe_stats`` records the routing.

    The module computes in its own dtype: bf16 weights when the DeepSpeed JSON enables bf16 (DeepSpeed
    switches an outer CUDA autocast off inside its forward, so none is used, on any device). The
    forward computes the loss too (its ``labels``), from the final hidden states in vocabulary chunks
    (no [tokens, vocab] fp32 logits), except under ZeRO-3, whose partitioned LM head is gathered only
    inside the LM head module's own forward."""
    chunked = not engine.zero_optimization_partition_weights()
    out = engine(batch["input_ids"], position_ids=batch.get("position_ids"), compute_logits=not chunked,
                 document_ids=batch.get("document_ids"), token_mask=batch.get("token_mask"), labels=batch["labels"])
    if moe_stats is not None:
        moe_stats.update(out.routings, local_tokens(batch.get("token_mask"), len(out.routings[0].expert_ids)))
    return out.loss_sum, out.loss_tokens, out.balance_loss


def real_lengths(batch: dict) -> list[int]:
    """Each sequence's real token count: fine-tuning batches are right-padded (``token_mask``),
    pretraining sequences are whole (DPO's [2B, T] batch: chosen and rejected, each one a sequence)."""
    if "token_mask" in batch:
        return batch["token_mask"].sum(1).tolist()
    return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]


def train_step(engine, batches: list[dict], env: DistEnv, dp_size: int, aux_coef: float, stop: StopRequest,
               task: Optional[Task] = None) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches; returns global loss, grad norm, the real
    tokens and their training FLOPs (for tok/s and MFU), and flags.

    Sums run over the data-parallel group: tensor-parallel ranks hold the same tokens. The stop vote
    runs over all ranks: a signal reaches them at slightly different times."""
    task = task or PretrainTask()
    batches = [move(b, env.device) for b in batches]
    local_tokens = sum(task.count(b) for b in batches)  # loss units: tokens, or pairs for DPO
    lengths = [n for batch in batches for n in real_lengths(batch)]
    stop_vote = float(stop.received is not None)
    global_tokens, stop_votes, tokens, flops = all_reduce_sum(
        [local_tokens, stop_vote, sum(lengths), training_flops(engine.module.config, lengths)], env.device, data_parallel_group())
    if env.world_size > dp_size:  # tensor parallel: every rank stops at this step, not only one data-parallel group
        stop_votes, = all_reduce_sum([stop_vote], env.device)
    scale = len(batches) * dp_size / max(global_tokens, 1.0)
    loss_total = torch.zeros((), dtype=torch.float64, device=env.device)
    balance_total = torch.zeros((), dtype=torch.float64, device=env.device)
    for batch in batches:
        loss_sum, _, balance = task.forward_loss(engine, batch)
        loss = loss_sum * scale
        if balance is not None:
            loss = loss + aux_coef * balance  # DeepSpeed's averaging makes this the mean over micro-batches
            balance_total += balance.detach().double()
        engine.backward(loss)
        engine.step()
        loss_total += loss_sum.detach().double()
    task.end_step()  # the routing window counts optimizer steps, applied or skipped, at every layout alike
    loss_sum_global, balance_global = all_reduce_sum([loss_total.item(), balance_total.item()], env.device,
                                                     data_parallel_group())
    grad_norm = engine.get_global_grad_norm()
    return {
        "loss": loss_sum_global / max(global_tokens, 1.0),
        "balance_loss": balance_global / (len(batches) * dp_size) if engine.module.config.is_moe else None,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens": int(tokens),
        "flops": flops,
        "applied": engine.was_step_applied(),
        "stop": stop_votes > 0,
    }


@torch.no_grad()
def evaluate(engine, batches: list[dict], env: DistEnv, task: Optional[Task] = None) -> float:
    """Mean token loss over the fixed validation batches of all ranks."""
    engine.eval()
    loss, tokens = 0.0, 0.0
    for batch in batches:
        loss_sum, count, _ = (task or PretrainTask()).forward_loss(engine, move(batch, env.device))
        loss, tokens = loss + loss_sum.item(), tokens + count.item()
    engine.train()
    loss, tokens = all_reduce_sum([loss, tokens], env.device, data_parallel_group())
    return loss / max(tokens, 1.0)


def find_start(config: Config) -> Optional[tuple[Path, str]]:
    """The checkpoint to resume from: run.resume PATH, or (auto) the latest one in run.dir, or None."""
    root = checkpoint.checkpoint_root(config.run.dir)
    if config.run.resume == "never":
        if (root / checkpoint.LATEST).exists():
            raise ConfigError(
                f"run.resume=never but {root} already holds checkpoints: choose a new run.dir or resume (run.resume=auto)."
            )
        return None
    if config.run.resume != "auto":
        return checkpoint.resolve_checkpoint(config.run.resume)
    tag = checkpoint.read_latest(root) if root.is_dir() else None
    return (root, tag) if tag else None


ZERO_FAMILIES = ("ZeRO-0", "ZeRO 1-2", "ZeRO 1-2", "ZeRO-3")  # stages whose checkpoints load into each other

OPTIMIZER_LAYOUT_KEYS = {  # optimizer_layout's entries, as a user sets them
    "bf16": "bf16 (train.bf16, or the DeepSpeed JSON's bf16.enabled)",
    "bf16_optimizer": "fp32 gradient accumulation at ZeRO-1 with bf16 (the DeepSpeed JSON's data_types.grad_accum_dtype)",
    "decay_groups": "train.decay_groups",
    "dense_freeze_groups": "a train.freeze_dense_steps above 0",
}


def optimizer_layout(train: TrainConfig, ds: dict) -> dict:
    """What shapes the optimizer states a checkpoint holds besides the ZeRO stage and the parallel
    sizes: the precision (DeepSpeed builds another optimizer and names its files otherwise), at
    ZeRO-1 with bf16 fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, another state format),
    and the AdamW groups (``train.decay_groups``; a ``train.freeze_dense_steps`` adds groups)."""
    bf16 = bf16_enabled(ds)
    return {"bf16": bf16, "bf16_optimizer": bf16 and zero_stage(ds) == 1 and data_type(ds, "grad_accum_dtype") == torch.float32,
            "decay_groups": train.decay_groups, "dense_freeze_groups": train.freeze_dense_steps > 0}


def loadable_checkpoint(root: Path, tag: str, layout: ParallelLayout, ds: dict, run_dir: Path,
                        train: TrainConfig) -> tuple[Path, str]:
    """The (root, tag) to load weights and optimizer states from with this layout: a checkpoint saved
    with another tensor/expert-parallel or data-parallel size goes through DeepSpeed's universal
    checkpoint (converted once, within this run's ``run_dir``: checkpoint.universal_root;
    "load_universal" set in ``ds``), which re-splits every tensor. DeepSpeed's optimizer checkpoints
    load within ZeRO-0, within ZeRO 1-2 and within ZeRO-3 only (torch's format, flat partitions,
    per-rank parameter partitions); across them a clear error names the way out. ZeRO-3 re-splits over
    tensor-parallel ranks with restore maps, which need the vocabulary divisible by tp. Optimizer
    states of another optimizer_layout (precision, AdamW groups) are refused as well (checkpoints
    written before the meta recorded it are not checked)."""
    saved = checkpoint.read_meta(root, tag)
    saved_stage, stage = checkpoint.saved_zero_stage(root, tag), zero_stage(ds)
    if ZERO_FAMILIES[saved_stage] != ZERO_FAMILIES[stage]:
        raise ConfigError(
            f"Checkpoint {root / tag} was saved with ZeRO-{saved_stage} and this run uses ZeRO-{stage}: DeepSpeed's "
            f"optimizer checkpoints do not load from {ZERO_FAMILIES[saved_stage]} into {ZERO_FAMILIES[stage]}. Resume "
            f"with {ZERO_FAMILIES[saved_stage]}, or start a new run.dir from its weights with run.init_from "
            "(a fresh optimizer and schedule)."
        )
    saved_optimizer, optimizer = saved.get("optimizer_layout") or {}, optimizer_layout(train, ds)
    changed = [f"{OPTIMIZER_LAYOUT_KEYS[key]}: {saved_optimizer[key]} -> {value}" for key, value in optimizer.items()
               if key in saved_optimizer and saved_optimizer[key] != value]
    if changed:
        raise ConfigError(
            f"Checkpoint {root / tag} holds optimizer states of another layout than this run builds ({'; '.join(changed)}): "
            "DeepSpeed cannot load them. Resume with the checkpoint's settings, or start a new run.dir from its "
            "weights with run.init_from (a fresh optimizer and schedule)."
        )
    saved_layout = (saved.get("tensor_parallel", 1), saved.get("expert_parallel", 1))
    resharded = saved_layout != (layout.tensor_parallel, layout.expert_parallel)
    if resharded and saved_stage == 0:
        raise ConfigError(
            f"Checkpoint {root / tag} was saved at tensor_parallel x expert_parallel {saved_layout} with ZeRO-0; "
            f"changing these sizes needs a ZeRO 1-3 checkpoint (resume at the saved sizes, or continue from its "
            f"weights with run.init_from)."
        )
    if saved_stage and (resharded or saved["dp_size"] != layout.dp_size):
        vocab, tp = saved["model"]["vocab_size"], layout.tensor_parallel
        if stage == 3 and tp > 1 and vocab % tp:  # without restore maps (apply.parallelize)
            raise ConfigError(
                f"Checkpoint {root / tag} was saved at tensor_parallel {saved_layout[0]} on {saved['dp_size']} "
                f"data-parallel rank(s) and this run uses tensor_parallel {tp} on {layout.dp_size}: under ZeRO-3 "
                f"DeepSpeed re-splits a checkpoint over tensor-parallel ranks only when model.vocab_size "
                f"({vocab}) is a multiple of tensor_parallel. Resume at the saved tensor_parallel and "
                "data-parallel sizes, or continue from its weights with run.init_from (a fresh optimizer and schedule)."
            )
        ds.setdefault("checkpoint", {})["load_universal"] = True
        return checkpoint.universal_checkpoint(root, tag, checkpoint.universal_root(root, run_dir))
    return root, tag


def warn_if_global_batch_changed(saved: dict, train: TrainConfig, dp_size: int) -> None:
    """A resume with another number of data-parallel ranks keeps micro-batch and accumulation, so the
    global batch (sequences per optimizer step) changes with it unless the accumulation is changed
    too; say so, and which accumulation keeps the checkpoint's batch (its last steps' batch; for
    checkpoints that did not record it, the mean over all its steps)."""
    steps, samples = saved.get("step", 0), saved.get("consumed_samples", 0)
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * dp_size
    saved_batch = saved.get("global_batch") or (samples / steps if steps else global_batch)
    if saved_batch == global_batch:
        return
    keep = saved_batch / (train.micro_batch_size * dp_size)
    way_out = (f"train.gradient_accumulation_steps={keep:.0f} keeps it on {dp_size} data-parallel rank(s)" if keep.is_integer()
               else "no whole accumulation keeps it with this micro-batch and data-parallel size")
    warnings.warn(f"The checkpoint's steps took {saved_batch:g} sequences each and this run takes {global_batch} "
                  f"(train.micro_batch_size {train.micro_batch_size} x train.gradient_accumulation_steps "
                  f"{train.gradient_accumulation_steps} x {dp_size} data-parallel rank(s)): {way_out}.")


def check_not_past_the_end(saved: dict, train: TrainConfig, start: tuple[Path, str]) -> None:
    """A checkpoint beyond train.max_steps has nothing left to train (its data position may even lie past
    the end of the shorter run's samples): refuse it before any model is built."""
    if saved["step"] > train.max_steps:
        raise ConfigError(f"Checkpoint {start[0] / start[1]} is at step {saved['step']}, past train.max_steps = "
                          f"{train.max_steps}: set train.max_steps to at least {saved['step']} to resume it (more to train "
                          "on), or start a new run.dir.")


def is_finished(start: tuple[Path, str], saved: dict, train: TrainConfig, run_dir: Path) -> bool:
    """The run's own latest checkpoint (meta ``saved``) is at train.max_steps: a rerun (a chained Slurm job,
    ``make demo`` again) has nothing to train and need not build the engine and load the checkpoint to find that out."""
    own = Path(start[0]).resolve() == checkpoint.checkpoint_root(run_dir).resolve()
    return own and saved["step"] == train.max_steps


def finished_run(start: tuple[Path, str], saved: dict, env: DistEnv) -> Progress:
    if env.is_main:
        print(f"[doge-dist] {start[0] / start[1]} is at train.max_steps ({saved['step']}): the run is finished, nothing "
              "to train (raise train.max_steps to train on from a stable-phase lr; after a decay, start a new run.dir "
              "with run.init_from for a fresh schedule with its warmup)", flush=True)
    return Progress(**{field: saved[field] for field in ("step", "consumed_samples", "consumed_tokens") if field in saved})


def write_run_files(run_dir: Path, config: Config, ds: dict) -> str:
    """The resolved config.yaml (export_hf reads its tokenizer there) and ds_config.json, each replaced
    whole: a restart on a full disk leaves the previous ones readable."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(run_dir / "config.yaml", text)
    checkpoint.write_atomic(run_dir / "ds_config.json", json.dumps(ds, indent=2))
    return text


def pretrain(config: Config, ds_user: dict[str, Any], ds_where: str = "the DeepSpeed config", task: Optional[Task] = None) -> Progress:
    """Train ``config``; ``task`` (default: pretraining) supplies the data and the loss (SFT, DPO: task.py)."""
    task = task or PretrainTask()
    stop = StopRequest()  # first: a preemption warning during the setup stops the run after its first step
    # 1. everything that can be wrong with the input fails here, before any model or group exists
    layout, ds = check_run(config, ds_user, launcher_world_size(), ds_where)
    task.check_data(config)
    env = init_distributed()
    kept_host_memory = env.device.type == "cpu" and keep_freed_memory()
    initialize_parallel(config.parallel)
    train, run_dir = config.train, Path(config.run.dir)
    bf16 = bf16_enabled(ds)
    checkpoint.seed_everything(train.seed)
    run_lock = checkpoint.lock_run_dir(run_dir)  # noqa: F841 (held until the run returns)

    # 2. what we start from: our own latest checkpoint, or weights to continue from, or nothing
    start = find_start(config)
    if start is None and config.run.init_from:  # a new run from other weights: is it built as the model they were?
        with warnings.catch_warnings():  # rank 0 says it; load_hf's note on a foreign MoE router is said for this run instead
            warnings.simplefilter("default" if env.is_main else "ignore")
            warnings.filterwarnings("ignore", message="A MoE Doge directory not written by doge-dist")
            check_continued_model(model_config_of(config.run.init_from), config.model, config.run.init_from)
    init_checkpoint = None
    if start is None and config.run.init_from and not is_hf_directory(config.run.init_from):
        init_checkpoint = checkpoint.resolve_checkpoint(config.run.init_from)
    source = origin = start or init_checkpoint  # source: what is loaded (a universal conversion of origin)
    init_weights = None
    if source:
        checkpoint.check_complete_on_rank0(*source)
        checkpoint.check_model_shape(*source, config.model)
        if start:
            saved = checkpoint.read_meta(*start)
            check_not_past_the_end(saved, train, start)
            if is_finished(start, saved, train, run_dir):
                return finished_run(start, saved, env)
            if env.is_main:
                warn_if_global_batch_changed(saved, train, layout.dp_size)
    task.setup(config, start)  # before any conversion and the engine: a DPO resume refuses a reference gone or changed
    if source and (start or config.run.init_optimizer):
        source = loadable_checkpoint(*source, layout, ds, run_dir, train)
    elif source:  # weights only: the checkpoint's fp32 master weights, from any stage and layout
        init_weights = consolidated_state(*source, checkpoint.universal_root(source[0], run_dir))

    # 3. the DeepSpeed engine, then its state
    engine, ds = build_engine(config, ds, env.device, init_weights)
    del init_weights
    progress = Progress()
    if start:
        progress = checkpoint.load(engine, *source)
        saved_lr = lr_multipliers(engine.lr_scheduler)
        reapply_optimizer_settings(engine.lr_scheduler, train)
        if env.is_main:
            warn_if_lr_jumps(saved_lr, engine.lr_scheduler, train, progress.step)
            print(f"[doge-dist] resumed from {origin[0] / origin[1]} at step {progress.step}", flush=True)
    elif init_checkpoint:
        if config.run.init_optimizer:
            checkpoint.load(engine, *source, module_only=True)
            reapply_optimizer_settings(engine.lr_scheduler, train)  # the loaded groups carry the old lr: the fresh schedule's step 0
        if env.is_main:
            print(f"[doge-dist] continuing from the weights of {origin[0] / origin[1]} with a fresh schedule", flush=True)
    elif is_hf_directory(config.run.init_from) and env.is_main:
        print(f"[doge-dist] starting from the weights of the Hugging Face directory {config.run.init_from}", flush=True)

    # 4. data, reporting, signals
    cache_dir = config.data.cache_dir or str(run_dir / "data_cache")
    saved_split = (saved.get("data_order") or {}).get("train_samples", 0) if start else 0  # saved: start's meta
    data = task.build_data(config, env, parallel_state.get_data_parallel_rank(), layout.dp_size, progress.consumed_samples, cache_dir,
                           progress.step, saved_split)
    if start and env.is_main:
        warn_if_data_order_changed(saved, data_order(config, data, progress.consumed_samples),
                                   progress.consumed_samples)
    if env.is_main:  # only now, past every refusal, so that a refused run leaves the run's files and `latest` as they were
        config_text = write_run_files(run_dir, config, ds)
        if start:
            checkpoint.rewind_latest(run_dir, *start)
    tokens_per_step = data.global_batch * task.sequences_per_sample * config.data.seq_length  # at most, when padded
    reporter = Reporter(str(run_dir), env.is_main, peak_tflops(env.device, train.peak_tflops), env.world_size,
                        train.max_steps, progress.step)
    if env.is_main:
        reporter.text("config", config_text)
        print(f"[doge-dist] {layout.world_size} rank(s), tp {layout.tensor_parallel}, dp {layout.dp_size}, "
              f"ep {layout.expert_parallel}, ZeRO {ds.get('zero_optimization', {}).get('stage', 0)}, "
              f"{'bf16' if bf16 else 'fp32'}{', compiled layers' if train.compile else ''}"
              f"{', freed host memory kept for reuse' if kept_host_memory else ''}"
              f"{f', CPU threads per rank: {torch.get_num_threads()}' if env.device.type == 'cpu' else ''}, {tokens_per_step:,} tokens per step, "
              f"steps {progress.step} -> {train.max_steps}", flush=True)
    with reporter.paused():  # DPO's reference log-probs, computed once, are no training throughput
        task.prepare(engine)
    freeze = DenseFreeze(engine.module, engine.lr_scheduler, train)
    token_copies = 1 if config.parallel.sequence_parallel else layout.tensor_parallel  # ranks routing the same tokens
    if start:  # last: setting up draws random numbers too (the CPU peak for MFU), which shifted every dropout mask
        checkpoint.restore_rng(source[0] / source[1], env.rank, train.seed)
        task.restore_monitor_state(checkpoint.read_monitor_state(start[0] / start[1]), config, env.rank == 0, env.device,
                                   token_copies)

    def save() -> None:
        if bad_in_a_row:  # the step counts as bad: `latest` stays on the last good checkpoint, as TrainingStopped says
            if env.is_main:
                warnings.warn(f"step {progress.step} was non-finite: no checkpoint is written until a step is finite again.")
            return
        checkpoint.save(engine, run_dir, progress, layout, train.keep_last, config.model.to_dict(),
                        universal_checkpoint_info(config.model, layout.tensor_parallel, layout.expert_parallel),
                        data_order(config, data, progress.consumed_samples) if env.is_main else None, data.global_batch,
                        task.monitor_state(token_copies), optimizer_layout(train, ds), task.checkpoint_meta())

    # 5. the loop
    bad_in_a_row = 0
    while progress.step < train.max_steps:
        batches = data.next_step()
        if batches is None:
            warnings.warn(f"The training data ran out at step {progress.step}; stopping early.")
            break
        lr, inherited_lr = engine.get_lr()[0], freeze.lr()  # the lrs this step uses (DeepSpeed steps the schedule inside train_step)
        result = train_step(engine, batches, env, layout.dp_size, config.model.router_aux_loss_coef, stop, task)
        progress.step += 1
        freeze.release()
        progress.consumed_samples += data.global_batch
        progress.consumed_tokens += result["tokens"]
        reporter.count(result["tokens"], result["flops"])

        if not result["applied"] or not math.isfinite(result["loss"]):
            bad_in_a_row += 1
            if env.is_main:
                warnings.warn(f"step {progress.step}: non-finite loss or gradient (loss {result['loss']}); the update was skipped.")
            if bad_in_a_row > train.max_bad_steps:
                raise TrainingStopped(
                    f"{bad_in_a_row} non-finite steps in a row (train.max_bad_steps = {train.max_bad_steps}); stopping "
                    f"without saving. The last good checkpoint in {checkpoint.checkpoint_root(run_dir)} is untouched: "
                    "lower train.lr (or train.warmup_steps longer) and resume from it. A resume replays the same batches with "
                    "the checkpoint's random state (train.seed does not change them), so unchanged settings meet the same steps."
                )
        else:
            bad_in_a_row = 0
            reporter.count_loss(result["loss"], result["balance_loss"])

        if progress.step % train.log_interval == 0 or progress.step == train.max_steps:
            reporter.train_step(progress.step, result["loss"], lr, result["grad_norm"], progress.consumed_tokens,
                                env.device, result["balance_loss"])
            reporter.scalars(progress.step, task.log_metrics(env.device))
            if inherited_lr is not None:
                reporter.scalars(progress.step, {"train/lr_inherited": inherited_lr})
        validate = train.eval_interval and (progress.step % train.eval_interval == 0 or progress.step == train.max_steps)
        valid_batches = data.validation_batches() if validate else []
        if valid_batches:  # none when the validation set is empty
            with reporter.paused():
                loss = evaluate(engine, valid_batches, env, task)
                reporter.validation(progress.step, loss, task.reports_perplexity, task.validation_metrics(env.device))
        if result["stop"]:
            if env.is_main:
                print(f"[doge-dist] stop signal received: saving at step {progress.step} and exiting", flush=True)
            break
        if train.save_interval and progress.step % train.save_interval == 0:
            with reporter.paused():
                save()
    save()  # the end, a stop signal or exhausted data (a no-op when this step is saved already)
    reporter.close()
    return progress
