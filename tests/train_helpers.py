"""Shared runs for the tests/test_train_*.py files: launch pretraining in subprocesses (1 process with
plain python, 2 ranks with torchrun or the deepspeed launcher, gloo on CPU) and read their TensorBoard
scalars. Runs are cached per pytest process, so one run serves several test files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import atexit
from functools import lru_cache
from pathlib import Path

import data_helpers

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(PYTHON).parent
STEPS = 10


@lru_cache(maxsize=None)
def scratch() -> Path:
    root = Path(tempfile.mkdtemp(prefix="doge_train_tests_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def base_overrides(run_dir: Path, **train) -> list[str]:
    """doge-tiny (vocab 512) on the data tests' corpus, fp32, per-step logging; ``train`` adds overrides."""
    assets = data_helpers.assets()
    values = {
        "model.preset": "doge-tiny",
        "data.train_data": f"[{assets.train_prefix}]",
        "data.tokenizer": str(assets.tokenizer_model),
        "data.seq_length": 64,
        "data.split": "90,10,0",
        "data.cache_dir": str(scratch() / "data_cache"),
        "train.max_steps": STEPS,
        "train.lr": 3.0e-3,
        "train.warmup_steps": 2,
        "train.decay_steps": 3,
        "train.bf16": "false",
        "train.log_interval": 1,
        "train.eval_interval": 5,
        "train.eval_iters": 2,
        "run.dir": str(run_dir),
    }
    values.update({k if "." in k else f"train.{k}": v for k, v in train.items()})
    return [f"{k}={v}" for k, v in values.items()]


def command(nproc: int, launcher: str) -> list[str]:
    script = str(REPO / "launch" / "pretrain.py")
    if nproc == 1 and launcher == "python":
        return [PYTHON, script]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_port()), script]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_port()), script]


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict:
    values = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    values.pop("RANK", None)
    return values


def run_on_a_free_port(make_command) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run ``make_command()`` (which picks a port with ``_port``); once more with a new port if another
    process took that port between the pick and the rendezvous."""
    for attempt in range(2):
        cmd = make_command()
        result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
        if result.returncode == 0 or "address already in use" not in (result.stdout + result.stderr).lower():
            break
    if result.returncode == 0:
        assert_no_shared_memory_left(cmd, result)
    return cmd, result


def assert_no_shared_memory_left(cmd: list[str], result: subprocess.CompletedProcess) -> None:
    """A run with DeepSpeed's CPU shared-memory all-reduce (the deepspeed launcher) leaves none of its
    /dev/shm buffers behind (distributed.unlink_shared_memory_buffers)."""
    if "--master_port" not in cmd or "deepspeed_shm_comm_op built successfully" not in result.stdout + result.stderr:
        return
    port = cmd[cmd.index("--master_port") + 1]
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, f"DeepSpeed's shared-memory buffers left in /dev/shm after {' '.join(cmd)}: {left}"


def pretrain(run_dir: Path, stage: int, nproc: int = 1, launcher: str = "torchrun", check: bool = True,
             ds_config: Path | None = None, **train) -> subprocess.CompletedProcess:
    """A run of configs/zero{stage}.json, or of the DeepSpeed JSON ``ds_config``."""
    ds_config = ds_config or REPO / "configs" / f"zero{stage}.json"
    cmd, result = run_on_a_free_port(lambda: command(nproc, launcher) + ["--ds_config", str(ds_config)]
                                     + base_overrides(run_dir, **train))
    if check and result.returncode != 0:
        raise AssertionError(f"pretraining failed ({' '.join(cmd)}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value; for a step logged by several (interrupted and resumed) runs, the last one written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    events = sorted((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    for file in events:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({event.step: event.value for event in acc.Scalars(tag)})
    return values


def losses(run_dir: Path) -> list[float]:
    values = scalars(run_dir, "train/loss")
    return [values[step] for step in sorted(values)]


def concurrently(*calls):
    """The results of ``calls`` (each launching its own processes, independent of the others), run at the
    same time: a launch is mostly one single-threaded process (imports, a tiny model), so on two cores two
    of them take about the time of one. An exception of a call is raised here."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


# Runs shared by several test files -------------------------------------------------------------

@lru_cache(maxsize=None)
def single_process_run() -> Path:
    """The reference: one process, ZeRO-0, micro 2 x accumulation 2 (4 sequences per step)."""
    run_dir = scratch() / "single"
    pretrain(run_dir, 0, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2, save_interval=5)
    return run_dir


@lru_cache(maxsize=None)
def two_rank_run(stage: int, launcher: str = "torchrun") -> Path:
    """Two ranks, micro 2 x accumulation 1: the same 4 sequences per step as the reference."""
    run_dir = scratch() / f"zero{stage}_2ranks"
    pretrain(run_dir, stage, nproc=2, launcher=launcher, micro_batch_size=2, gradient_accumulation_steps=1, save_interval=5)
    return run_dir
