"""Checkpoint writes that fail part way (a full disk, a file size limit, a rank that dies): the
checkpoint is never marked complete, ``latest`` keeps naming the last good one, and the error names
the checkpoint and the one a restart resumes from. DeepSpeed's save_checkpoint is replaced by a
stand-in that writes one file per rank, on gloo ranks. A checkpoint half pruned is not complete, a
failed universal conversion leaves no partial copy, and the run's config.yaml survives a restart on
a full disk. Afterwards: pruning counts complete checkpoints only, a `latest` naming a deleted one or
a checkpoint with a missing or cut file names the checkpoint to fall back to, and a run.dir has one trainer."""
import json
import re
import resource
import shutil
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
from doge_dist.train.export import find_checkpoint, run_tokenizer_path
from doge_dist.train.loop import write_run_files

REPO = Path(__file__).resolve().parents[1]

TORCH_SAVE_ON_A_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 40833856 vs 40833744"


class StandInEngine:
    """Writes this rank's optimizer file as ZeRO-2 does, then meets the other ranks, as DeepSpeed's save does;
    on ``failing_rank`` the write fails as torch.save's does."""

    optimizer = None  # DeepSpeed's optimizer wrapper (checkpoint.fp32_master_names looks at it)

    def __init__(self, failing_rank: int) -> None:
        self.failing_rank = failing_rank

    def zero_optimization_stage(self) -> int:
        return 2

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        rank = dist.get_rank()
        (Path(save_dir) / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"partial")
        if rank == self.failing_rank:
            raise RuntimeError(TORCH_SAVE_ON_A_FULL_DISK)
        dist.barrier()


def _save_4_then_fail_on_rank_1_at_8(rank: int, world_size: int, run_dir: str) -> str:
    layout = ParallelLayout(world_size, 1, 1)
    checkpoint.save(StandInEngine(-1), run_dir, Progress(step=4), layout, 2, {}, {})
    try:
        checkpoint.save(StandInEngine(1), run_dir, Progress(step=8), layout, 2, {}, {})
    except Exception as error:  # rank 1's error; rank 0's barrier fails once rank 1 has left
        return f"{type(error).__name__}: {error}"
    return "saved"


def _save_4_twice(rank: int, world_size: int, run_dir: str) -> str:
    layout = ParallelLayout(world_size, 1, 1)
    checkpoint.save(StandInEngine(-1), run_dir, Progress(step=4), layout, 2, {}, {})
    # the final save right after an interval save (or after a resume) at the same step: a rewrite would delete
    # the latest checkpoint first, and this write fails
    return str(checkpoint.save(StandInEngine(0), run_dir, Progress(step=4), layout, 2, {}, {}))


def test_a_second_save_at_the_latest_step_leaves_that_checkpoint_alone(tmp_path):
    root = tmp_path / "checkpoints"
    assert run_distributed(_save_4_twice, 1, str(tmp_path)) == [str(root / "step_00000004")]
    assert checkpoint.read_latest(root) == "step_00000004" and (root / "step_00000004" / checkpoint.META).is_file()
    assert (root / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes() == b"partial"


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
    # rank 0 wrote its files and waited for rank 1 in the save: it blamed its disk for rank 1's failure too
    assert "Another rank stopped during the save; its error is the cause." in results[0], results[0]
    assert "Is the disk full" not in results[0]


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


@pytest.mark.parametrize("error", [
    dist.DistBackendError("NCCL error: remote process exited or there was a network error"),  # NCCL, on GPUs
    RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer"),
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Connection closed by peer [127.0.0.1]:1"),
])
def test_a_save_collective_that_lost_a_peer_blames_the_other_rank_not_this_disk(error, tmp_path):
    """Only gloo's "closed by peer" met a test: with NCCL's error or gloo's "reset" the rank whose files
    were fine said "Is the disk full?" for another rank's failure."""
    with pytest.raises(CheckpointWriteError) as failed, checkpoint._reported_as_write_failure(tmp_path, "step_00000008"):
        raise error
    assert "Another rank stopped during the save; its error is the cause." in str(failed.value)
    assert "Is the disk full" not in str(failed.value)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_write_failure_is_one_paragraph_and_exit_code_4(rank, monkeypatch, capsys):
    """Printed by the rank it failed on, whichever that is: a full disk on rank 1 alone was said by nobody while
    rank 0 said that another rank's error was the cause."""
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    for name, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)

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
    partial copy must not stay behind in the checkpoints directory, and the run ends as a failed checkpoint
    write does (one paragraph, exit code 4), not with a RuntimeError traceback."""
    root, tag = tmp_path / "checkpoints", "step_00000004"
    (root / tag).mkdir(parents=True)
    (root / tag / checkpoint.META).write_text('{"step": 4}')

    monkeypatch.setattr(checkpoint.subprocess, "run", _ds_to_universal_on_a_full_disk)
    with pytest.raises(CheckpointWriteError, match=re.escape(f"Converting {root / tag} to a universal checkpoint in "
                                                             f"{root / (tag + '_universal')} failed: RuntimeError: ds_to_universal "
                                                             "exited with code 1")) as failed:
        checkpoint.convert_to_universal(root, tag)
    assert "No space left on device" in str(failed.value) and "Is the disk full" in str(failed.value)
    assert sorted(p.name for p in root.iterdir()) == [tag]
    assert report_errors(lambda: checkpoint.convert_to_universal(root, tag)) == 4  # one paragraph, the write failure's code


def _ds_to_universal_on_a_full_disk(command, **kwargs):
    output = Path(command[command.index("--output_folder") + 1])
    (output / "zero").mkdir(parents=True)
    (output / "zero" / "fp32.pt").write_bytes(b"partial")
    return subprocess.CompletedProcess(command, 1, "OSError: [Errno 28] No space left on device", None)


def _convert_on_a_full_disk(rank: int, world_size: int, root: str) -> str:
    checkpoint.subprocess.run = _ds_to_universal_on_a_full_disk  # in this spawned rank only
    try:
        checkpoint.universal_checkpoint(Path(root), "step_00000004")
    except CheckpointWriteError as error:
        return f"CheckpointWriteError: {error}"
    return "converted"


def test_a_failed_universal_conversion_ends_every_rank_with_its_error(tmp_path):
    """Rank 0 converts while the others wait: its failure must reach them (they waited in a barrier
    for a rank that had left, and failed with a lost-connection traceback of their own)."""
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / checkpoint.META).write_text('{"step": 4}')
    results = run_distributed(_convert_on_a_full_disk, 2, str(root))
    assert results[0] == results[1] and results[0].startswith(f"CheckpointWriteError: Converting {root / 'step_00000004'} "), results
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]


class TorchFileEngine(StandInEngine):
    """Writes this rank's optimizer file as a whole torch file (what a resume can read)."""

    def __init__(self) -> None:
        super().__init__(failing_rank=-1)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        import torch

        torch.save({"step": client_state["step"]}, Path(save_dir) / tag / f"zero_pp_rank_{dist.get_rank()}_mp_rank_00_optim_states.pt")


def _save_steps(rank: int, world_size: int, run_dir: str, steps: list, keep_last: int, leftover: int = 0) -> list:
    """Save ``steps`` in order; before the last one, leave a save of step ``leftover`` cut short by a crash
    of a run on more ranks (a rank's optimizer partition written, no meta file)."""
    for step in steps:
        if step == steps[-1] and leftover:
            cut_short = Path(run_dir) / "checkpoints" / checkpoint.tag_for(leftover)
            cut_short.mkdir()
            (cut_short / f"zero_pp_rank_{world_size}_mp_rank_00_optim_states.pt").write_bytes(b"stale")
        checkpoint.save(TorchFileEngine(), run_dir, Progress(step=step), ParallelLayout(world_size, 1, 1), keep_last, {}, {})
    return checkpoint.complete_tags(Path(run_dir) / "checkpoints")


def test_pruning_keeps_keep_last_complete_checkpoints_and_drops_leftovers(tmp_path):
    """A save cut short (no meta file) is no checkpoint: it is not counted among the keep_last kept ones
    (which left one complete checkpoint where two were asked for) and pruning removes it."""
    complete = run_distributed(_save_steps, 1, str(tmp_path), [2, 4, 8], 2, 6)[0]
    assert complete == ["step_00000004", "step_00000008"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == complete


def test_a_save_over_a_leftover_of_its_step_keeps_none_of_its_files(tmp_path):
    """A two-rank run killed while saving step 8, resumed on one rank, saves step 8 again: the dead run's rank-1
    optimizer partition must not end up in the new checkpoint (nor in its meta file's list of files), where a
    resume or a universal conversion would read it."""
    assert run_distributed(_save_steps, 1, str(tmp_path), [4, 8], 2, 8)[0] == ["step_00000004", "step_00000008"]
    saved = tmp_path / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in saved.iterdir()) == [checkpoint.META, "rng_rank00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert json.loads((saved / checkpoint.META).read_text())["files"] == ["rng_rank00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_latest_naming_a_deleted_checkpoint_says_which_one_to_use(tmp_path):
    root = tmp_path / "checkpoints"
    run_distributed(_save_steps, 1, str(tmp_path), [4, 8], 2)
    shutil.rmtree(root / "step_00000008")
    with pytest.raises(ConfigError, match=rf"names 'step_00000008', but {root / 'step_00000008'} does not exist \(deleted\?\)\. "
                                          rf"The newest complete checkpoint there is step_00000004: to continue from it, "
                                          rf"run `echo step_00000004 > {root / 'latest'}`"):
        checkpoint.read_latest(root)
    (tmp_path / "config.yaml").write_text(f"data:\n  tokenizer: {tmp_path}\n")
    assert find_checkpoint(tmp_path, step=4) == (root, "step_00000004")  # export_hf --step 4 needs no `latest`
    assert run_tokenizer_path(tmp_path, step=4) == str(tmp_path)


def test_a_missing_or_truncated_checkpoint_file_is_named(tmp_path):
    """Found before any model is built (checkpoint.check_complete from the resume and every export), with
    the checkpoint to fall back to: DeepSpeed reports a missing shard only on the rank reading it."""
    root = tmp_path / "checkpoints"
    run_distributed(_save_steps, 2, str(tmp_path), [4, 8], 2)
    (root / "step_00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ConfigError, match=rf"Checkpoint {root / 'step_00000008'} is damaged \(missing: "
                                          r"zero_pp_rank_1_mp_rank_00_optim_states.pt\)\. Restore the file\(s\), or continue from "
                                          rf"the complete checkpoint before it, step_00000004: run `echo step_00000004 > "):
        find_checkpoint(tmp_path)
    rng = root / "step_00000008" / "rng_rank00000.pt"
    rng.write_bytes(rng.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"\(missing: zero_pp_rank_1_mp_rank_00_optim_states.pt; truncated \(not a whole "
                                          r"torch file\): rng_rank00000.pt\)"):
        checkpoint.check_complete(root, "step_00000008")
    checkpoint.check_complete(root, "step_00000004")


def _lock_twice(rank: int, world_size: int, run_dir: str) -> str:
    held = checkpoint.lock_run_dir(run_dir)
    try:
        checkpoint.lock_run_dir(run_dir)  # a second trainer: another open file description of the lock
    except ConfigError as error:
        return str(error)
    finally:
        if held:  # rank 0's
            held.close()
    return "locked twice"


def test_a_second_trainer_on_a_run_dir_is_refused(tmp_path):
    message = run_distributed(_lock_twice, 2, str(tmp_path))[1]  # rank 1 learns it from rank 0
    assert message.startswith(f"{tmp_path} is in use by another trainer (pid ")
    assert message.endswith("two trainers on one run.dir overwrite each other's checkpoints. Wait for it to end or "
                            "stop it, or choose another run.dir.")


def _save_recording_fsyncs(rank: int, world_size: int, run_dir: str) -> list:
    synced, real_fsync = [], checkpoint._fsync
    checkpoint._fsync = lambda path: synced.append(Path(path).name) or real_fsync(path)  # in this spawned process only
    checkpoint.save(TorchFileEngine(), run_dir, Progress(step=4), ParallelLayout(world_size, 1, 1), 2, {}, {})
    return synced


def test_a_checkpoints_files_are_on_disk_before_it_is_marked_complete(tmp_path):
    """DeepSpeed writes its shards with a plain torch.save: after a power or node crash, `latest` could
    name a checkpoint whose shards never reached the disk (the older ones pruned). Every file and the
    step directory are fsynced before the meta file is written, and each rename after it."""
    synced = run_distributed(_save_recording_fsyncs, 1, str(tmp_path))[0]
    assert synced == ["rng_rank00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "step_00000004",
                      "step_00000004", "checkpoints"]  # the files, their directory; the renames of the meta and latest


def test_a_damaged_meta_file_is_named_with_the_checkpoint_before_it(tmp_path):
    """A meta file cut short by a copy that did not finish: a JSONDecodeError traceback before."""

    root = tmp_path / "checkpoints"
    for tag in ("step_00000002", "step_00000004"):
        (root / tag).mkdir(parents=True)
        (root / tag / checkpoint.META).write_text('{"step": 2, "model": {}}')
    (root / "step_00000004" / checkpoint.META).write_text('{"step": 4, "mod')
    with pytest.raises(ConfigError, match=rf"Checkpoint {root / 'step_00000004'} has a damaged doge_meta.json .* "
                                          rf"continue from the checkpoint before it, {root / 'step_00000002'}"):
        checkpoint.check_complete(root, "step_00000004")
    assert checkpoint.read_meta(root, "step_00000002")["step"] == 2


def test_pruning_removes_the_leftover_of_a_killed_universal_conversion(tmp_path):
    """A conversion killed half-way left checkpoints/step_N_universal.tmp (the size of the model and its
    optimizer states) until a later conversion of the same step: later saves and keep_last kept it."""
    root = tmp_path / "checkpoints"
    for tag in ("step_00000002", "step_00000004"):
        (root / tag).mkdir(parents=True)
        (root / tag / checkpoint.META).write_text('{"step": 2}')
    (root / "latest").write_text("step_00000004")
    leftover = root / "step_00000002_universal.tmp"
    (leftover / "zero").mkdir(parents=True)
    (leftover / "zero" / "fp32.pt").write_bytes(b"partial")
    checkpoint._prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]
