"""Checkpoints: DeepSpeed's layout plus what DeepSpeed does not keep, written so a crash never
corrupts the last good one.

    <run.dir>/checkpoints/
        latest                      tag of the newest complete checkpoint (written last, atomically)
        step_00000040/              engine.save_checkpoint(...): model, optimizer, lr schedule, and
            doge_meta.json          our client state (step, consumed samples/tokens, dp size) and the
                                    names of the files; written once every rank finished, so it marks
                                    a complete checkpoint
            rng_rank00000.pt        python/numpy/torch RNG states, one file per rank
        step_00000040_universal/    made on demand by ds_to_universal when the dp size changes
    <run.dir>/converted/
        step_00000040_universal/    the same for a checkpoint of another run (run.init_from,
                                    run.resume PATH): never written into that run's directory;
                                    removed once the run saved a checkpoint of its own
    <run.dir>/.trainer.lock         flock of the trainer using the run directory (lock_run_dir)

By hand (DeepSpeed has no equivalent): the meta file and the ``latest`` pointer only after every rank finished
(``save_latest=False`` and a barrier), pruning to ``keep_last`` only after that, per-rank RNG files,
converting to a universal checkpoint when a ZeRO 1-3 run resumes with another data-parallel size,
a check that every file of a checkpoint is there and whole before it is loaded, and one trainer per run directory.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError
from ..parallel.rank0 import check_on_rank0, raise_on_every_rank

LATEST = "latest"
META = "doge_meta.json"
UNIVERSAL_SUFFIX = "_universal"
CONVERTED = "converted"  # <run.dir>/converted/: universal conversions of other runs' checkpoints
CONVERTED_FROM = "converted_from"  # in a universal checkpoint: the checkpoint directory it was made from


@dataclass
class Progress:
    """Where the loop is; saved in every checkpoint and restored on resume."""

    step: int = 0  # optimizer steps taken (applied or skipped)
    consumed_samples: int = 0  # sequences drawn from the training set, all ranks together
    consumed_tokens: int = 0  # tokens those sequences contained (loss-masked ones included, fine-tuning's padding not)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def read_latest(root: Path) -> Optional[str]:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (root / tag / META).is_file():
        state = f"has no {META}: it is incomplete" if (root / tag).is_dir() else "does not exist (deleted?)"
        complete = complete_tags(root)
        way_out = (f"The newest complete checkpoint there is {complete[-1]}: to continue from it, "
                   f"run `echo {complete[-1]} > {pointer}`." if complete else
                   f"No complete checkpoint is left there: start a new run.dir, or delete {pointer} to start this one afresh.")
        raise ConfigError(f"{pointer} names '{tag}', but {root / tag} {state}. {way_out}")
    return tag


def is_step_tag(name: str) -> bool:
    """A step directory's name (not a universal conversion of one, finished or in progress)."""
    return re.fullmatch(r"step_\d+", name) is not None


def complete_tags(root: Path) -> list[str]:
    """The tags of the complete checkpoints under ``root`` (those with a meta file), oldest first."""
    return sorted(meta.parent.name for meta in Path(root).glob(f"step_*/{META}") if is_step_tag(meta.parent.name))


def read_meta(root: Path, tag: str) -> dict:
    """The checkpoint's meta file; one cut short (a copy that did not finish) or not a mapping with its step
    is a ConfigError naming it, not a JSONDecodeError wherever it is read."""
    file = root / tag / META
    try:
        meta = json.loads(file.read_text())
    except ValueError as error:
        meta = error
    if not isinstance(meta, dict) or "step" not in meta:
        earlier = [t for t in complete_tags(root) if t < tag]
        raise ConfigError(f"Checkpoint {root / tag} has a damaged {META} (not the JSON a save writes: cut short by a copy "
                          "that did not finish, or edited): restore it"
                          + (f", or continue from the checkpoint before it, {root / earlier[-1]}." if earlier else "."))
    return meta


def check_complete_on_rank0(root: Path, tag: str) -> None:
    """``check_complete`` in a job: read by rank 0 (a ZeRO-3 checkpoint has two files per rank), raised on all."""
    check_on_rank0(lambda: check_complete(root, tag), ConfigError)


def check_complete(root: Path, tag: str) -> None:
    """Fail before any model is built when a file of checkpoint ``tag`` is missing or cut short (a copy
    that did not finish, a file deleted by hand), naming it: DeepSpeed fails only once the engine is
    built, on the ranks that read that file (the others then die of a lost connection), or with a zip
    error that names no file. The meta file lists the files (older checkpoints: truncation is checked
    only); a torch file is a zip archive whose directory is at its end, so a cut one is not one."""
    directory = root / tag
    missing = [name for name in read_meta(root, tag).get("files", []) if not (directory / name).is_file()]
    truncated = [p.name for p in sorted(directory.glob("*.pt")) if not zipfile.is_zipfile(p)]
    if not missing and not truncated:
        return
    damage = "; ".join(([f"missing: {', '.join(missing)}"] if missing else [])
                       + ([f"truncated (not a whole torch file): {', '.join(truncated)}"] if truncated else []))
    earlier = [t for t in complete_tags(root) if t < tag]
    way_out = (f"Restore the file(s), or continue from the complete checkpoint before it, {earlier[-1]}: "
               f"run `echo {earlier[-1]} > {root / LATEST}` (a resume) or pass its directory {root / earlier[-1]}."
               if earlier else "Restore the file(s); no earlier checkpoint is there to fall back to.")
    raise ConfigError(f"Checkpoint {directory} is damaged ({damage}). {way_out}")


def resolve_checkpoint(path: str | Path, step: Optional[int] = None) -> tuple[Path, str]:
    """(checkpoints root, tag) from a run dir, its checkpoints dir, or one tag directory; ``step``: that
    step's tag under the same root (``latest`` is not read then: it may name a checkpoint that is gone)."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if (root / LATEST).is_file():
            return root, read_latest(root) if step is None else tag_for(step)
    if (path / META).is_file():
        if step is not None and tag_for(step) != path.name:
            raise ConfigError(f"'{path}' is the checkpoint of one step, {path.name}, and --step asks for {step}: pass the run "
                              "directory with --step, or the step directory alone.")
        return path.parent, path.name
    raise ConfigError(
        f"'{path}' holds no doge-dist checkpoint (no checkpoints/latest, no {META}); pass a run directory, "
        "its checkpoints/ directory, or one step_NNNNNNNN directory."
    )


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore_rng(directory: Path, rank: int, seed: int) -> None:
    """This rank's saved RNG states. A rank the saving run did not have takes rank 0's: every rank
    starts from one seed and draws alike, and tensor-parallel replicas must go on doing so (their
    dropout masks of replicated activations must be equal; ``parallel.rng``)."""
    file = directory / f"rng_rank{rank:05d}.pt"
    if not file.is_file():
        file = directory / "rng_rank00000.pt"
    if not file.is_file():
        seed_everything(seed)
        return
    state = torch.load(file, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


MONITOR_STATE = "monitor_state.pt"  # the logged statistics' window across steps (MoE routing), summed over ranks


def read_monitor_state(directory: Path) -> Optional[dict]:
    """The checkpoint's ``MONITOR_STATE`` (None for a dense model's or an older checkpoint)."""
    file = directory / MONITOR_STATE
    return torch.load(file, weights_only=True) if file.is_file() else None


def save(engine, run_dir: str | Path, progress: Progress, layout, keep_last: int, model_config: dict,
         universal_info: dict, data_order: Optional[dict] = None, global_batch: Optional[int] = None,
         monitor_state: Optional[dict] = None, optimizer_layout: Optional[dict] = None,
         task_meta: Optional[dict] = None) -> Path:
    """Save on every rank; move ``latest`` only once all ranks are done; then prune old checkpoints.
    ``data_order`` (data.data_order), ``global_batch`` (sequences per step) and ``optimizer_layout``
    (loop.optimizer_layout) go into the meta file, for a resume to check its data, batch and optimizer
    against, and ``task_meta`` (the task's ``checkpoint_meta``: DPO's reference) under "task";
    ``monitor_state`` (the same on every rank: the task's ``monitor_state``) into rank 0's
    ``MONITOR_STATE`` file."""
    root = checkpoint_root(run_dir)
    tag = tag_for(progress.step)
    rank = dist.get_rank()
    if root.is_dir() and read_latest(root) == tag:  # nothing new since that checkpoint: never rewrite it
        return root / tag
    if rank == 0:
        if (root / tag).exists():  # a half-written leftover of a crashed run or one a rewind left (never the latest one)
            shutil.rmtree(root / tag)
        if (root / (tag + UNIVERSAL_SUFFIX)).exists():  # a conversion of what that one held
            shutil.rmtree(root / (tag + UNIVERSAL_SUFFIX))
        (root / tag).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    meta = {**asdict(progress), "global_batch": global_batch, "dp_size": layout.dp_size, "tensor_parallel": layout.tensor_parallel,
            "expert_parallel": layout.expert_parallel, "zero_stage": engine.zero_optimization_stage(),
            "optimizer_layout": optimizer_layout}
    with _reported_as_write_failure(root, tag):
        torch.save(_rng_state(), root / tag / f"rng_rank{rank:05d}.pt")
        if rank == 0 and monitor_state is not None:
            torch.save(monitor_state, root / tag / MONITOR_STATE)
        engine.save_checkpoint(str(root), tag=tag, client_state={**meta, "universal_checkpoint_info": universal_info,
                                                                 **fp32_master_names(engine)}, save_latest=False)
    dist.barrier()  # every rank's files are written ...
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        sync_to_disk(root / tag)
    dist.barrier()  # ... and on disk: only now the meta file marks the checkpoint complete
    if rank == 0:
        files = sorted(p.name for p in (root / tag).iterdir() if p.is_file())  # for a resume to find one missing (check_complete)
        with _reported_as_write_failure(root, tag):
            write_atomic(root / tag / META, json.dumps({**meta, "model": model_config, "data_order": data_order,
                                                        "files": files, "task": task_meta}, indent=1))
            _move_abandoned(root, read_latest(root), tag)
            write_atomic(root / LATEST, tag)
        _prune(root, keep_last)
        # conversions of another run's checkpoint served the start only: a restart resumes from this one
        shutil.rmtree(Path(run_dir) / CONVERTED, ignore_errors=True)
    dist.barrier()
    return root / tag


FP32_MASTER_NAMES = "fp32_master_names"  # in the model states of a ZeRO-0 bf16 checkpoint


def fp32_master_names(engine) -> dict:
    """At ZeRO-0 with bf16 the saved module holds bf16 weights and DeepSpeed's FP16_UnfusedOptimizer
    keeps the fp32 masters in its state (``fp32_groups``), in the order of its groups of model
    parameters: their names, for export and run.init_from to read the fp32 weights (the masters are
    what ZeRO 1-3 checkpoints give). Empty for every other optimizer."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(engine.optimizer, FP16_UnfusedOptimizer):
        return {}
    names = {id(param): name for name, param in engine.module.named_parameters()}
    return {FP32_MASTER_NAMES: [[names[id(param)] for param in group] for group in engine.optimizer.fp16_groups]}


def rewind_latest(run_dir: str | Path, root: Path, tag: str) -> None:
    """A resume from an older checkpoint of this very run (run.resume=<run.dir>/checkpoints/step_N) is a
    rewind: ``latest`` is moved back to it, so that the new trajectory's saves replace the newer
    checkpoints (``save`` never rewrites the checkpoint ``latest`` names: with ``latest`` left on
    step_M, the save at step M was skipped and the run's new weights were lost). So is a resume from a
    checkpoint outside it (another run's, or one in checkpoints/abandoned/) into a run.dir whose
    ``latest`` is not older: ``latest`` goes back to the newest of its own checkpoints before that step
    (none: removed). Called once nothing can refuse the run any more. Rank 0."""
    own = checkpoint_root(run_dir)
    latest = read_latest(own) if own.is_dir() else None
    inside = Path(root).resolve() == own.resolve()
    if not latest or tag > latest or (inside and tag == latest):
        return
    print(f"[doge-dist] run.resume rewinds {run_dir} to {tag}: its checkpoints from there on (up to {latest}) are "
          f"replaced, or moved to {own / ABANDONED}, as this run saves past them", flush=True)
    if inside:
        write_atomic(own / LATEST, tag)
        return
    before = [old for old in complete_tags(own) if old < tag]
    if before:
        write_atomic(own / LATEST, before[-1])
    else:
        (own / LATEST).unlink()


RUN_LOCK = ".trainer.lock"  # in run.dir: held by the rank 0 of the trainer using it


def lock_run_dir(run_dir: str | Path) -> Optional[IO]:
    """Refuse a second trainer on ``run_dir`` before it loads or writes anything: two trainers there
    overwrite each other's checkpoints (each one's rank 0 deletes a step directory the other is
    writing, and ``latest`` names a mix). Rank 0 holds an flock on <run.dir>/.trainer.lock while the
    returned file is open; the kernel releases it when the process ends, SIGKILL included, so no stale
    lock outlives a crash. A file system without locks is not checked. A collective call."""
    handle, holder = _lock(Path(run_dir) / RUN_LOCK) if dist.get_rank() == 0 else (None, None)
    raise_on_every_rank(holder and f"{run_dir} is in use by another trainer ({holder}, holding {Path(run_dir) / RUN_LOCK}): "
                        "two trainers on one run.dir overwrite each other's checkpoints. Wait for it to end or stop it, "
                        "or choose another run.dir.", ConfigError)
    return handle


def _lock(file: Path) -> tuple[Optional[IO], Optional[str]]:
    """(the open lock file, None) once locked, or (None, who holds it)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process"
        handle.close()
        return None, holder
    except OSError:  # no locks on this file system (some network mounts)
        return handle, None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle, None


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a file size limit); the last good one is untouched."""


@contextlib.contextmanager
def _reported_as_write_failure(root: Path, tag: str) -> Iterator[None]:
    """Turn the errors of torch.save ("basic_ios::clear: iostream error"), DeepSpeed and the OS while
    writing ``tag`` into a ``CheckpointWriteError`` that names the checkpoint, the likely cause and
    the checkpoint a restart resumes from."""
    try:
        yield
    except Exception as error:
        latest = read_latest(root)
        resumes = f"`latest` still names {latest}, which a restart resumes from" if latest else "no earlier checkpoint exists"
        if _lost_a_peer(error):  # this rank's files were fine: the rank that failed says why
            cause = "Another rank stopped during the save; its error is the cause."
        else:
            free_gib = shutil.disk_usage(root).free / 2**30
            cause = f"Is the disk full ({free_gib:.1f} GiB free there) or the file size limited (ulimit -f)?"
        raise CheckpointWriteError(
            f"Writing checkpoint {root / tag} failed: {type(error).__name__}: {error}. {cause} The incomplete {tag} is "
            f"never loaded, and {resumes}."
        ) from error


def _lost_a_peer(error: Exception) -> bool:
    """A collective of the save that failed because another rank left it (gloo: "Connection reset/closed by
    peer"), not a write of this rank's."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or any(f"Connection {how} by peer" in str(error) for how in ("reset", "closed"))


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole: a crash or a failed write (a full disk) leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself


def sync_to_disk(directory: Path) -> None:
    """fsync every file in ``directory`` and the directory: DeepSpeed writes its shards with a plain
    torch.save, so after a power or node crash ``latest`` (fsynced) could name a checkpoint whose
    shards never reached the disk, with the older ones pruned. One process per node calls this, so
    each node's page cache (a shared file system caches per node) is written out."""
    for file in sorted(directory.iterdir()):
        if file.is_file():
            _fsync(file)
    _fsync(directory)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


ABANDONED = "abandoned"  # under checkpoints/: complete checkpoints of a trajectory a rewind left


def _move_abandoned(root: Path, previous: Optional[str], tag: str) -> None:
    """Before ``latest`` moves from ``previous`` to ``tag``: a complete checkpoint between the two was
    written by a trajectory that a rewind (run.resume to an older step) left, with another save
    interval. Once ``latest`` passed it, it would count among the kept checkpoints (keep_last would
    delete the new run's instead) and be exported as this run's step: it is moved, with its
    universal conversion, to checkpoints/abandoned/ (kept, never deleted)."""
    for old in complete_tags(root):
        if (previous is None or old > previous) and old < tag:
            target = root / ABANDONED / old
            while target.exists():
                target = target.with_name(target.name + "_")
            target.parent.mkdir(exist_ok=True)
            os.replace(root / old, target)
            if (root / (old + UNIVERSAL_SUFFIX)).exists():
                os.replace(root / (old + UNIVERSAL_SUFFIX), target.with_name(target.name + UNIVERSAL_SUFFIX))
            print(f"[doge-dist] {root / old} was left by a rewind (run.resume): moved to {target}", flush=True)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest complete checkpoints up to ``latest``; delete older ones, the
    leftovers of saves a crash cut short before ``latest`` (never loaded, and not counted as kept) and
    those of universal conversions a crash cut short (conversions run before training, never beside a save)."""
    latest = read_latest(root)
    complete = [t for t in complete_tags(root) if t <= latest]
    keep = set(complete[-max(1, keep_last):])
    for tag in sorted(p.name for p in root.glob("step_*") if p.is_dir() and is_step_tag(p.name)):
        if tag < latest and tag not in keep:
            (root / tag / META).unlink(missing_ok=True)  # first: a checkpoint half deleted by a crash is never complete
            shutil.rmtree(root / tag, ignore_errors=True)
            shutil.rmtree(root / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
    for leftover in root.glob(f"step_*{UNIVERSAL_SUFFIX}.tmp"):  # a conversion killed half-way (none runs now)
        shutil.rmtree(leftover, ignore_errors=True)


def saved_zero_stage(root: Path, tag: str) -> int:
    """The ZeRO stage ``tag`` was saved with: from its meta file, or for checkpoints written before
    the meta recorded it, from DeepSpeed's file layout (3: per-rank model states; 1 and 2, which
    share a layout, reported as 2: partitioned optimizer states; else 0)."""
    stage = read_meta(root, tag).get("zero_stage")
    if stage is not None:
        return int(stage)
    if any((root / tag).glob("*zero_pp_rank_*_mp_rank_*_model_states.pt")):
        return 3
    return 2 if any((root / tag).glob("*zero_pp_rank_*_optim_states.pt")) else 0


def universal_root(root: Path, run_dir: str | Path) -> Path:
    """Where the run in ``run_dir`` puts the universal conversion of a checkpoint under ``root``: beside
    it in the run's own checkpoints, else in <run.dir>/converted/ (another run's directory may be
    read-only, shared or still training; resume, pruning and export look only in checkpoints/)."""
    own = checkpoint_root(run_dir)
    return root if root.resolve() == own.resolve() else Path(run_dir) / CONVERTED


def universal_checkpoint(root: Path, tag: str, output_root: Optional[Path] = None) -> tuple[Path, str]:
    """Convert ``tag`` with DeepSpeed's ds_to_universal once (rank 0), into ``output_root`` (default:
    ``root``); every rank returns the universal checkpoint's (root, tag). A collective call."""
    from ..parallel.rank0 import check_on_rank0

    output_root = output_root or root
    check_on_rank0(lambda: convert_to_universal(root, tag, output_root), CheckpointWriteError)  # every rank waits for it
    return output_root, tag + UNIVERSAL_SUFFIX


def convert_to_universal(root: Path, tag: str, output_root: Optional[Path] = None) -> Path:
    """DeepSpeed's ds_to_universal into a temporary directory in ``output_root`` (default: ``root``)
    renamed when complete; done once per source checkpoint (a conversion of another one of the same
    step, recorded in its CONVERTED_FROM file, is replaced). A failed conversion (a full disk: it writes
    about the checkpoint's size again) is removed and raised as a ``CheckpointWriteError``."""
    output_root = output_root or root
    target = output_root / (tag + UNIVERSAL_SUFFIX)
    source = str((root / tag).resolve())
    if target.is_dir() and (target / CONVERTED_FROM).is_file() and (target / CONVERTED_FROM).read_text() != source:
        shutil.rmtree(target)
    if not target.is_dir():
        tmp = output_root / (tag + UNIVERSAL_SUFFIX + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        output_root.mkdir(parents=True, exist_ok=True)
        print(f"[doge-dist] converting {root / tag} to a universal checkpoint in {target} (its shards re-split or merged)", flush=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / tag),
                   "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        try:
            # its progress bars (stderr) reach the user; its stdout (arguments, phase names) is kept for an error
            result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"ds_to_universal exited with code {result.returncode} (its errors above; the end "
                                   f"of its output: {result.stdout[-2000:].strip()})")
            from ..config import ModelConfig
            from ..parallel.grid_checkpoint import label_universal, shape_bare_tensors

            saved = read_meta(root, tag)
            if saved_zero_stage(root, tag) == 3:  # its states without tensor parallelism are bare: for a load at tp > 1
                shape_bare_tensors(tmp, ModelConfig(**saved["model"]))
            if saved.get("expert_parallel", 1) > 1:
                label_universal(tmp)  # merged by expert rules or affine maps: name the tensor-parallel split dims
            shutil.copy2(root / tag / META, tmp / META)
            for rng in (root / tag).glob("rng_rank*.pt"):
                shutil.copy2(rng, tmp / rng.name)
            (tmp / CONVERTED_FROM).write_text(source)
        except BaseException as error:  # a full disk, Ctrl-C: the partial conversion (the size of the model) is not left behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, Exception):
                raise _conversion_failed(root / tag, target, error) from error
            raise
        tmp.rename(target)
    return target


def _conversion_failed(checkpoint_dir: Path, target: Path, error: Exception) -> CheckpointWriteError:
    """What a failed universal conversion tells the user: the likely cause, with the room it needs and has."""
    needed_gib = sum(f.stat().st_size for f in checkpoint_dir.rglob("*") if f.is_file()) / 2**30
    free_gib = shutil.disk_usage(target.parent).free / 2**30
    return CheckpointWriteError(
        f"Converting {checkpoint_dir} to a universal checkpoint in {target} failed: {type(error).__name__}: {error}. "
        f"Is the disk full (the conversion writes about the checkpoint's size again, {needed_gib:.2f} GiB; "
        f"{free_gib:.1f} GiB free there) or the file size limited (ulimit -f)? The partial conversion was removed; "
        f"{checkpoint_dir.name} itself is untouched, and a restart with room converts it again."
    )


def check_model_shape(root: Path, tag: str, model_config) -> None:
    """Fail before loading when the checkpoint was written for another model shape, naming the first
    tensor that differs (shapes compared on the meta device: nothing is allocated)."""
    from ..config import ModelConfig
    from ..convert.hf import load_state_checked
    from ..model import DogeForCausalLM

    saved = ModelConfig(**read_meta(root, tag)["model"])
    with torch.device("meta"):
        saved_state = DogeForCausalLM(saved).state_dict()
        current = DogeForCausalLM(model_config)
    try:
        load_state_checked(current, saved_state, f"checkpoint {root / tag} (model shape differs from the config)")
    except ConfigError as error:
        raise ConfigError(f"{error} {_differing_fields(saved, model_config)}") from None


def _differing_fields(saved, current) -> str:
    """The model fields behind a shape mismatch, with the overrides that build the checkpoint's model:
    a tensor's shape alone does not say which field (model.head_dim is not derived from hidden_size
    when a run sets it)."""
    from ..config import RUNTIME_SWITCHES

    names = saved.fields_differing_from(current, ignore=RUNTIME_SWITCHES)
    described = ", ".join(f"model.{name}={getattr(saved, name)!r} (this run {getattr(current, name)!r})" for name in names)
    overrides = " ".join(f"model.{name}={getattr(saved, name)!r}" for name in names)
    return f"The checkpoint has {described}: set {overrides}." if names else ""


def _undo_stage3_universal_merges(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """DeepSpeed's ZeRO-3 universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) gives
    every sub-group's AdamW state one shared ``step`` tensor, which each sub-group's update then counts up
    (twice per step with two sub-groups: wrong bias corrections from the first step on), and copies the
    first group's settings into every group (weight decay on the norms and biases, the ``decayed`` mark
    that ``reapply_optimizer_settings`` reads overwritten). Each state gets its own step and each group
    its settings as this run built them (``groups``, read before the load). Written by hand: DeepSpeed 0.19.8."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    for group, settings in zip(optimizer.param_groups, groups):
        group.update(settings)


def load(engine, root: Path, tag: str, module_only: bool = False) -> Progress:
    """Load weights and optimizer states (and the schedule and progress unless ``module_only``: a
    continuation with the optimizer, ``run.init_optimizer``) through DeepSpeed; returns progress.
    The RNG states are the caller's to restore (``restore_rng``), once nothing else draws before the
    first step."""
    from ..parallel.grid_checkpoint import deepspeed_restore_group

    stage3_universal = engine.zero_optimization_stage() == 3 and engine.load_universal_checkpoint()
    groups = [{k: v for k, v in group.items() if k != "params"}
              for group in (engine.optimizer.optimizer.param_groups if stage3_universal else [])]
    with deepspeed_restore_group(engine.mpu if stage3_universal else None):
        path, client = engine.load_checkpoint(
            str(root),
            tag=tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=not module_only,
        )
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {root / tag}.")
    if stage3_universal:
        _undo_stage3_universal_merges(engine.optimizer.optimizer, groups)
    if module_only:
        return Progress()
    return Progress(**{k: client[k] for k in ("step", "consumed_samples", "consumed_tokens")})
