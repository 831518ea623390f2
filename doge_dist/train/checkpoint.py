"""Checkpoints: DeepSpeed's layout plus what DeepSpeed does not keep, written so a crash never
corrupts the last good one.

    <run.dir>/checkpoints/
        latest                      tag of the newest complete checkpoint (written last, atomically)
        step_00000040/              engine.save_checkpoint(...): model, optimizer, lr schedule, and
            doge_meta.json          our client state (step, consumed samples/tokens, dp size); written
                                    once every rank finished, so it marks a complete checkpoint
            rng_rank00000.pt        python/numpy/torch RNG states, one file per rank
        step_00000040_universal/    made on demand by ds_to_universal when the dp size changes
    <run.dir>/converted/
        step_00000040_universal/    the same for a checkpoint of another run (run.init_from,
                                    run.resume PATH): never written into that run's directory;
                                    removed once the run saved a checkpoint of its own

By hand (DeepSpeed has no equivalent): the meta file and the ``latest`` pointer only after every rank finished
(``save_latest=False`` and a barrier), pruning to ``keep_last`` only after that, per-rank RNG files,
and converting to a universal checkpoint when a ZeRO 1-3 run resumes with another data-parallel size.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError

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
        raise ConfigError(f"{pointer} names '{tag}', but {root / tag / META} is missing: the checkpoint is incomplete.")
    return tag


def read_meta(root: Path, tag: str) -> dict:
    return json.loads((root / tag / META).read_text())


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints root, tag) from a run dir, its checkpoints dir, or one tag directory."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if (root / LATEST).is_file():
            return root, read_latest(root)
    if (path / META).is_file():
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


def save(engine, run_dir: str | Path, progress: Progress, layout, keep_last: int, model_config: dict,
         universal_info: dict, data_order: Optional[dict] = None) -> Path:
    """Save on every rank; move ``latest`` only once all ranks are done; then prune old checkpoints.
    ``data_order`` (data.data_order) goes into the meta file, for a resume to check its data against."""
    root = checkpoint_root(run_dir)
    tag = tag_for(progress.step)
    rank = dist.get_rank()
    if root.is_dir() and read_latest(root) == tag:  # nothing new since that checkpoint: never rewrite it
        return root / tag
    if rank == 0:
        if (root / tag).exists():  # a half-written leftover of a crashed run (never the latest one)
            shutil.rmtree(root / tag)
        (root / tag).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    meta = {**asdict(progress), "dp_size": layout.dp_size, "tensor_parallel": layout.tensor_parallel,
            "expert_parallel": layout.expert_parallel, "zero_stage": engine.zero_optimization_stage()}
    with _reported_as_write_failure(root, tag):
        torch.save(_rng_state(), root / tag / f"rng_rank{rank:05d}.pt")
        engine.save_checkpoint(str(root), tag=tag, client_state={**meta, "universal_checkpoint_info": universal_info},
                               save_latest=False)
    dist.barrier()  # every rank's files are complete: only now the meta file marks the checkpoint complete
    if rank == 0:
        with _reported_as_write_failure(root, tag):
            write_atomic(root / tag / META, json.dumps({**meta, "model": model_config, "data_order": data_order}, indent=1))
            write_atomic(root / LATEST, tag)
        _prune(root, keep_last)
        # conversions of another run's checkpoint served the start only: a restart resumes from this one
        shutil.rmtree(Path(run_dir) / CONVERTED, ignore_errors=True)
    dist.barrier()
    return root / tag


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
        free_gib = shutil.disk_usage(root).free / 2**30
        raise CheckpointWriteError(
            f"Writing checkpoint {root / tag} failed: {type(error).__name__}: {error}. Is the disk full ({free_gib:.1f} GiB "
            f"free there) or the file size limited (ulimit -f)? The incomplete {tag} is never loaded, and {resumes}."
        ) from error


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


def _prune(root: Path, keep_last: int) -> None:
    latest = read_latest(root)
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX))
    complete = [t for t in tags if t <= latest]
    for tag in complete[: max(0, len(complete) - max(1, keep_last))]:
        (root / tag / META).unlink(missing_ok=True)  # first: a checkpoint half deleted by a crash is never complete
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)


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
    output_root = output_root or root
    if dist.get_rank() == 0:
        convert_to_universal(root, tag, output_root)
    dist.barrier()
    return output_root, tag + UNIVERSAL_SUFFIX


def convert_to_universal(root: Path, tag: str, output_root: Optional[Path] = None) -> Path:
    """DeepSpeed's ds_to_universal into a temporary directory in ``output_root`` (default: ``root``)
    renamed when complete; done once per source checkpoint (a conversion of another one of the same
    step, recorded in its CONVERTED_FROM file, is replaced)."""
    output_root = output_root or root
    target = output_root / (tag + UNIVERSAL_SUFFIX)
    source = str((root / tag).resolve())
    if target.is_dir() and (target / CONVERTED_FROM).is_file() and (target / CONVERTED_FROM).read_text() != source:
        shutil.rmtree(target)
    if not target.is_dir():
        tmp = output_root / (tag + UNIVERSAL_SUFFIX + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        output_root.mkdir(parents=True, exist_ok=True)
        print(f"[doge-dist] converting {root / tag} to a universal checkpoint in {target} (new parallel layout)", flush=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / tag),
                   "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        try:
            # its progress bars (stderr) reach the user; its stdout (arguments, phase names) is kept for an error
            result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"ds_to_universal failed for {root / tag} (its errors above):\n{result.stdout[-2000:]}")
            saved = read_meta(root, tag)
            if saved.get("expert_parallel", 1) > 1:
                from ..parallel.grid_checkpoint import label_universal

                label_universal(tmp)  # merged by expert rules or affine maps: name the tensor-parallel split dims
            shutil.copy2(root / tag / META, tmp / META)
            for rng in (root / tag).glob("rng_rank*.pt"):
                shutil.copy2(rng, tmp / rng.name)
            (tmp / CONVERTED_FROM).write_text(source)
        except BaseException:  # a full disk, Ctrl-C: the partial conversion (the size of the model) is not left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(target)
    return target


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
    load_state_checked(current, saved_state, f"checkpoint {root / tag} (model shape differs from the config)")


def load(engine, root: Path, tag: str, module_only: bool = False) -> Progress:
    """Load weights and optimizer states (and the schedule and progress unless ``module_only``: a
    continuation with the optimizer, ``run.init_optimizer``) through DeepSpeed; returns progress.
    The RNG states are the caller's to restore (``restore_rng``), once nothing else draws before the
    first step."""
    path, client = engine.load_checkpoint(
        str(root),
        tag=tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=not module_only,
    )
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {root / tag}.")
    if module_only:
        return Progress()
    return Progress(**{k: client[k] for k in ("step", "consumed_samples", "consumed_tokens")})
