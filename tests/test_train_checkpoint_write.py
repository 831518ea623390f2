"""Checkpoint writes that fail part way (a full disk, a file size limit, a rank that dies): the
checkpoint is never marked complete, ``latest`` keeps naming the last good one, and the error names
the checkpoint and the one a restart resumes from. DeepSpeed's save_checkpoint is replaced by a
stand-in that writes one file per rank, on gloo ranks. A checkpoint half pruned is not complete, a
failed universal conversion leaves no partial copy, and the run's config.yaml survives a restart on
a full disk."""
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from doge_dist.config import ConfigError, load_config
from doge_dist.parallel.spawn import run_distributed
from doge_dist.parallel.state import ParallelLayout
from doge_dist.train import checkpoint
from doge_dist.train.checkpoint import CheckpointWriteError, Progress
from doge_dist.train.cli import report_errors
from doge_dist.train.export import find_checkpoint
from doge_dist.train.loop import write_run_files

REPO = Path(__file__).resolve().parents[1]

TORCH_SAVE_ON_A_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 40833856 vs 40833744"


class StandInEngine:
    """Writes this rank's optimizer file as ZeRO-2 does; on ``failing_rank`` the write fails as torch.save's does."""

    def __init__(self, failing_rank: int) -> None:
        self.failing_rank = failing_rank

    def zero_optimization_stage(self) -> int:
        return 2

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        rank = dist.get_rank()
        (Path(save_dir) / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"partial")
        if rank == self.failing_rank:
            raise RuntimeError(TORCH_SAVE_ON_A_FULL_DISK)


def _save_4_then_fail_on_rank_1_at_8(rank: int, world_size: int, run_dir: str) -> str:
    layout = ParallelLayout(world_size, 1, 1)
    checkpoint.save(StandInEngine(-1), run_dir, Progress(step=4), layout, 2, {}, {})
    try:
        checkpoint.save(StandInEngine(1), run_dir, Progress(step=8), layout, 2, {}, {})
    except Exception as error:  # rank 1's error; rank 0's barrier fails once rank 1 has left
        return f"{type(error).__name__}: {error}"
    return "saved"


def test_a_rank_that_cannot_write_leaves_no_complete_looking_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    results = run_distributed(_save_4_then_fail_on_rank_1_at_8, 2, str(tmp_path))
    assert checkpoint.read_latest(root) == "step_00000004"
    assert not (root / "step_00000008" / checkpoint.META).exists()  # rank 0 finished its files, rank 1 did not
    with pytest.raises(ConfigError, match="No complete checkpoint for step 8 in .*kept: step_00000004"):
        find_checkpoint(tmp_path, step=8)  # export_hf --step 8, run.init_from=.../step_00000008 alike
    assert results[1].startswith(f"CheckpointWriteError: Writing checkpoint {root / 'step_00000008'} failed: "
                                 f"RuntimeError: {TORCH_SAVE_ON_A_FULL_DISK}. Is the disk full (")
    assert results[1].endswith("or the file size limited (ulimit -f)? The incomplete step_00000008 is never loaded, "
                               "and `latest` still names step_00000004, which a restart resumes from.")


class Killed(Exception):
    pass


def _killed_while_pruning(rank: int, world_size: int, run_dir: str) -> str:
    """Save steps 4 and 8 with keep_last 1; the process dies while it deletes step 4's files."""
    def rmtree_killed_part_way(path, ignore_errors=False):
        for weights in Path(path).glob("*optim_states.pt"):
            weights.unlink()
        raise Killed()

    checkpoint.save(StandInEngine(-1), run_dir, Progress(step=4), ParallelLayout(1, 1, 1), 1, {}, {})
    checkpoint.shutil.rmtree = rmtree_killed_part_way  # in this spawned process only
    try:
        checkpoint.save(StandInEngine(-1), run_dir, Progress(step=8), ParallelLayout(1, 1, 1), 1, {}, {})
    except Killed:
        return "killed"
    return "saved"


def test_a_checkpoint_half_pruned_is_not_complete(tmp_path):
    assert run_distributed(_killed_while_pruning, 1, str(tmp_path)) == ["killed"]
    assert checkpoint.read_latest(tmp_path / "checkpoints") == "step_00000008"
    with pytest.raises(ConfigError, match="No complete checkpoint for step 4 in .*kept: step_00000008"):
        find_checkpoint(tmp_path, step=4)  # not a checkpoint without its weights


def test_a_write_failure_is_one_paragraph_and_exit_code_4(capsys):
    def run():
        raise CheckpointWriteError("Writing checkpoint runs/x/checkpoints/step_00000008 failed: ...")

    assert report_errors(run) == 4
    assert capsys.readouterr().err == "error: Writing checkpoint runs/x/checkpoints/step_00000008 failed: ...\n"


def test_a_restart_on_a_full_disk_keeps_the_run_files(tmp_path):
    """config.yaml names the tokenizer export_hf uses; a restart that cannot write it must not cut it short."""
    config = load_config(str(REPO / "configs" / "doge_tiny_cpu.yaml"), [f"run.dir={tmp_path}"])
    write_run_files(tmp_path, config, {"train_batch_size": 16})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    limit = len(before["config.yaml"]) // 2
    restart = (f"from pathlib import Path; from doge_dist.config import load_config; from doge_dist.train.loop import "
               f"write_run_files; write_run_files(Path({str(tmp_path)!r}), load_config({str(REPO / 'configs' / 'doge_tiny_cpu.yaml')!r}, "
               f"['run.dir={tmp_path}', 'train.max_steps=20']), {{'train_batch_size': 16}})")
    result = subprocess.run([sys.executable, "-c", restart], cwd=REPO, capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1 and "OSError: [Errno 27] File too large" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_failed_universal_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    """ds_to_universal writes a copy of the model and optimizer states; when it fails (a full disk), that
    partial copy must not stay behind in the checkpoints directory."""
    root, tag = tmp_path / "checkpoints", "step_00000004"
    (root / tag).mkdir(parents=True)
    (root / tag / checkpoint.META).write_text('{"step": 4}')

    def ds_to_universal_on_a_full_disk(command, **kwargs):
        output = Path(command[command.index("--output_folder") + 1])
        (output / "zero").mkdir(parents=True)
        (output / "zero" / "fp32.pt").write_bytes(b"partial")
        return subprocess.CompletedProcess(command, 1, "OSError: [Errno 28] No space left on device", None)

    monkeypatch.setattr(checkpoint.subprocess, "run", ds_to_universal_on_a_full_disk)
    with pytest.raises(RuntimeError, match="(?s)ds_to_universal failed for .*step_00000004.*No space left on device"):
        checkpoint.convert_to_universal(root, tag)
    assert sorted(p.name for p in root.iterdir()) == [tag]
