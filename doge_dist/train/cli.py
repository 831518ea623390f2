"""Entry points behind launch/*.py: turn input errors into one readable paragraph and an exit code."""
from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..config import ConfigError, expand_home, inherits_model, load_config

REPORTER_WAIT_S = 10  # how long a rank that does not print an error waits for the one that does


def input_errors() -> tuple[type, ...]:
    """The exceptions that are bad input: one paragraph and exit code 2, no traceback."""
    from ..data import DataError

    return (ConfigError, DataError, FileNotFoundError)


def run_launcher(doc: str, config_help: str, main: Callable[[Optional[str], Optional[str], list[str]], int]) -> None:
    """The shared command line of launch/pretrain.py, sft.py and dpo.py:
    ``--config YAML --ds_config JSON [--resume auto|never|PATH] section.key=value ...``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"YAML run config ({config_help})")
    parser.add_argument("--ds_config", default=None, help="DeepSpeed JSON (configs/zero0.json .. zero3.json)")
    parser.add_argument("--resume", default=None, help="auto | never | PATH (same as run.resume=...)")
    # passed by the deepspeed launcher (--local_rank) and by python -m torch.distributed.launch (--local-rank)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=20 run.dir=runs/try1")
    args = parser.parse_intermixed_args()  # overrides before and after --ds_config etc., as on the other launchers
    overrides = args.overrides + ([f"run.resume={args.resume}"] if args.resume else [])
    faulthandler.enable()  # a fatal signal (SIGABRT, SIGSEGV) prints every thread's Python stack
    exit_without_teardown(main(args.config, args.ds_config, overrides))


def exit_without_teardown(code: int) -> None:
    """End the process with ``code`` once the run has returned: the exit handlers run (logging,
    multiprocessing's children, torch's compile workers), the output is flushed, and then the process
    ends without the interpreter's teardown.

    Written by hand because that teardown destroys what megatron-core's and DeepSpeed's module globals
    still hold (gloo process groups and their threads) in no defined order: a finished two-rank gloo run
    ended now and then in "terminate called without an active exception" (SIGABRT) after its last
    checkpoint, and a finished job counted as a failed one (a Slurm requeue, a red CI). Everything the
    run writes is closed and on disk before this (checkpoints fsynced, TensorBoard closed, the process
    group destroyed). A run that raises does not come here: Python prints its traceback and exits 1."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_generator_seed(seed: int) -> None:
    """A ValueError unless ``seed`` is a seed torch takes (64 bits, signed or not): launchers check their
    --seed when they parse it, not with an overflow after a model is loaded."""
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"--seed must be a 64-bit integer, got {seed}.")


def report_errors(run: Callable[[], None]) -> int:
    """Run ``run``; a bad-input error prints one paragraph (see _print_error) and returns exit code 2,
    a run stopped for non-finite losses exit code 3, a checkpoint or export that could not be written
    (printed by every rank it failed on) exit code 4. On these ends the process group (if ``run`` made one) is
    destroyed before the interpreter exits, as PyTorch asks (the launchers then skip the interpreter's
    teardown altogether: exit_without_teardown)."""
    from ..convert.hf import ExportWriteError
    from .checkpoint import CheckpointWriteError
    from .distributed import LaunchEnvironmentError
    from .loop import TrainingStopped

    write_errors = (CheckpointWriteError, ExportWriteError)
    try:
        run()
    except (*input_errors(), TrainingStopped, *write_errors) as error:
        printed = _print_error(error, every_rank=isinstance(error, (LaunchEnvironmentError, *write_errors)))
        _destroy_process_group()
        if not printed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # A launcher stops every rank once one has exited: a rank that leaves the report to another
            # (which may be seconds behind, on a busy node) waits for it, or the job ended with no word.
            time.sleep(REPORTER_WAIT_S)
        return 4 if isinstance(error, write_errors) else 3 if isinstance(error, TrainingStopped) else 2
    _destroy_process_group()
    return 0


def _print_error(error: Exception, every_rank: bool) -> bool:
    """Print ``error`` as one paragraph: on rank 0 (on every rank when ``every_rank``: an error that only
    some ranks may meet); elsewhere once per node, by each node's local rank 0, named by rank and host. A
    node whose files differ (node-local data, a missing tokenizer) otherwise ended its ranks with exit
    code 2 and no word; an error every rank meets alike is then said once per node, as a cluster's logs
    carry every rank's traceback. Under torchrun the error also goes to this rank's TORCHELASTIC_ERROR_FILE,
    so the "Root Cause" torchrun prints shows it instead of "error_file: <N/A>". Called while handling ``error``
    (the file records its traceback). Returns whether this rank printed it."""
    from .distributed import is_launcher_main

    printed = True
    if is_launcher_main() or every_rank:
        print(f"error: {error}", file=sys.stderr, flush=True)
    elif os.environ.get("LOCAL_RANK", "0") == "0":
        import socket

        print(f"error (rank {os.environ['RANK']}, {socket.gethostname()}): {error}", file=sys.stderr, flush=True)
    else:
        printed = False
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)
    return printed


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def ds_config_path_of(config, ds_config_path: Optional[str]) -> str:
    """--ds_config, else run.ds_config (recorded in the config so a resume uses the same file)."""
    path = expand_home(ds_config_path) or config.run.ds_config  # --ds_config=~/x: the shell expands no ~ after "="
    if not path:
        raise ConfigError("No DeepSpeed config: pass --ds_config configs/zero2.json (or set run.ds_config in the YAML).")
    config.run.ds_config = path
    return path


def main_pretrain(config_path: str, ds_config_path: Optional[str], overrides: list[str]) -> int:
    from .ds_config import read_ds_config
    from .loop import pretrain

    def run() -> None:
        config = load_config(config_path, overrides)
        path = ds_config_path_of(config, ds_config_path)
        pretrain(config, read_ds_config(path), f"DeepSpeed config '{path}'")

    return report_errors(run)


def main_finetune(kind: str, config_path: Optional[str], ds_config_path: Optional[str], overrides: list[str]) -> int:
    """launch/sft.py and launch/dpo.py: the pretraining loop with the SFT or DPO task. The model shape
    comes from run.init_from when the YAML has no model section (model.* overrides apply on top of it)."""
    import yaml

    from .distributed import is_launcher_main, launcher_world_size
    from .ds_config import read_ds_config
    from .dpo import DPOTask
    from .finetune import SFTTask, check_decay_ratio, continued_model, size_in_epochs, steps_given
    from .loop import pretrain

    def run() -> None:
        config = load_config(config_path, overrides, fine_tuning=True)
        path = ds_config_path_of(config, ds_config_path)
        ds = read_ds_config(path)
        raw = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
        if inherits_model(config.run.init_from, raw, overrides):
            config.model = continued_model(config.run.init_from, overrides)
        task = SFTTask() if kind == "sft" else DPOTask()
        check_decay_ratio(config, raw, overrides)
        sizing = size_in_epochs(config, task.check(config), launcher_world_size(), steps_given(raw, overrides))
        if is_launcher_main():
            print(f"[doge-dist] {sizing}", flush=True)
        pretrain(config, ds, f"DeepSpeed config '{path}'", task=task)

    return report_errors(run)
