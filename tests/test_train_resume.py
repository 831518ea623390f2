"""Restarts: a run killed with SIGKILL mid-training and restarted reproduces the uninterrupted run's
per-step losses exactly (CPU, fp32); a ZeRO-2 run resumes on another number of ranks (2 -> 1 via
DeepSpeed's universal checkpoint, 1 -> 2) at the same sample position; SIGTERM saves and exits."""
import json
import re
import signal
import subprocess
import warnings
from pathlib import Path

import pytest

import data_helpers
from train_helpers import (REPO, STEPS, base_overrides, command, env, losses, pretrain, scalars, scratch,
                           single_process_run, two_rank_run)


def _start(run_dir, stage, nproc, launcher, **train):
    cmd = command(nproc, launcher) + ["--ds_config", str(REPO / "configs" / f"zero{stage}.json")] + base_overrides(run_dir, **train)
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(process, text):
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"the run ended before printing {text!r}")


def at_step_5_of(source: Path, run_dir: Path) -> None:
    """``run_dir`` holding ``source``'s step-5 checkpoint as its latest."""
    (run_dir / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(source / "checkpoints" / "step_00000005"), str(run_dir / "checkpoints")], check=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000005")


def latest_meta(run_dir: Path) -> dict:
    """The doge_meta.json of ``run_dir``'s latest checkpoint."""
    root = run_dir / "checkpoints"
    return json.loads((root / (root / "latest").read_text() / "doge_meta.json").read_text())


def test_sigkill_and_resume_equals_uninterrupted():
    run_dir = scratch() / "killed"
    settings = dict(micro_batch_size=2, gradient_accumulation_steps=2, save_interval=2)
    process = _start(run_dir, 0, 1, "python", **settings)
    _wait_for_line(process, f"step      5/{STEPS} | loss")  # checkpoints at 2 and 4 exist; 6 may be half written
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    pretrain(run_dir, 0, nproc=1, launcher="python", **settings)
    assert losses(run_dir) == losses(single_process_run())  # exactly
    # TensorBoard reads the directory as one run: the killed run's steps after its checkpoint are purged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    assert [event.step for event in board.Scalars("train/loss")] == list(range(1, STEPS + 1))


def test_a_resumed_run_logs_the_mean_loss_of_its_own_steps(tmp_path):
    """At train.log_interval 4 a run resumed at step 5 logs at step 8 the mean loss of steps 6-8 (those it
    trained), and at the last step that of steps 9-10: before, only steps 8 and 10's own losses."""
    reference = single_process_run()
    at_step_5_of(reference, tmp_path)
    pretrain(tmp_path, 0, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2, log_interval=4,
             eval_interval=0)
    per_step = losses(reference)
    assert scalars(tmp_path, "train/loss") == pytest.approx({8: sum(per_step[5:8]) / 3, 10: sum(per_step[8:10]) / 2}, rel=1e-6)


@pytest.mark.parametrize("stage, launcher", [(2, "deepspeed"), (3, "torchrun")])
def test_resume_two_ranks_on_one_keeps_the_sample_order(stage, launcher):
    """Take the 2-rank run's step-5 checkpoint and finish on 1 rank (micro 2 x accumulation 2). ZeRO-3
    drifted from step 7 on (10: 5.4796 against 5.4712): DeepSpeed's universal load gives all its
    sub-groups one AdamW step tensor, counted up once per sub-group, and group 0's settings."""
    source = two_rank_run(stage, launcher)
    run_dir = scratch() / f"two_to_one_zero{stage}"
    (run_dir / "checkpoints").mkdir(parents=True)
    for item in ("step_00000005",):
        subprocess.run(["cp", "-r", str(source / "checkpoints" / item), str(run_dir / "checkpoints" / item)], check=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000005")
    pretrain(run_dir, stage, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2)
    assert (run_dir / "checkpoints" / "step_00000005_universal").is_dir()
    meta = json.loads((run_dir / "checkpoints" / "step_00000010" / "doge_meta.json").read_text())
    assert meta["consumed_samples"] == STEPS * 4 and meta["dp_size"] == 1
    resumed, uninterrupted = losses(run_dir), losses(source)
    assert len(resumed) == 5
    assert resumed == pytest.approx(uninterrupted[5:], rel=2e-5)


def _blend() -> str:
    """The reference's corpus as a blend of two halves: megatron-core's blend holds exactly the samples
    asked for (a single prefix's dataset holds whole epochs, more than any short run asks for)."""
    prefix = data_helpers.assets().train_prefix
    return f"[0.5,{prefix},0.5,{prefix}]"


def test_a_resume_at_a_smaller_global_batch_trains_to_max_steps(tmp_path):
    """A run's step-2 checkpoint (8 samples at 4 per step), continued to step 4 at 1 sample per step, as on
    fewer data-parallel ranks: the training split was sized max_steps x 1 = 4 samples, fewer than the
    checkpoint consumed (a ValueError after the engine was built). It holds what the 2 remaining steps need."""
    short = dict(eval_interval=0, warmup_steps=1, decay_steps=0, **{"data.train_data": _blend()})
    pretrain(tmp_path, 0, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2, max_steps=2, **short)
    result = pretrain(tmp_path, 0, nproc=1, launcher="python", micro_batch_size=1, gradient_accumulation_steps=1,
                      max_steps=4, **short)
    assert "ran out" not in result.stderr
    meta = json.loads((tmp_path / "checkpoints" / "step_00000004" / "doge_meta.json").read_text())
    assert (meta["consumed_samples"], meta["data_order"]["train_samples"]) == (8 + 2, 10)
    assert sorted(scalars(tmp_path, "train/loss")) == [1, 2, 3, 4]


def test_data_of_a_resume_at_a_smaller_global_batch_continues_after_the_consumed_samples():
    """Resumed on 1 rank (4 samples per step) from a checkpoint of 2 ranks (8 per step): at step 3 (24
    consumed) the split of max_steps x 4 = 40 samples ran out after 4 of the 7 remaining steps; at step 6
    (48 consumed) it was too small to start. Each remaining step gets the next 4 samples."""
    blend = f"data.train_data={_blend()}"
    for step in (3, 6):
        _, data = _train_data(blend, consumed=8 * step, step=step)
        assert len(data.train_set) == 8 * step + 4 * (STEPS - step)
        first = data.next_step()
        assert [row.tolist() for batch in first for row in batch["input_ids"]] == \
            [data.train_set[8 * step + i]["tokens"].tolist() for i in range(4)]
        assert 1 + sum(1 for _ in iter(data.next_step, None)) == STEPS - step
    _, unchanged = _train_data(blend, consumed=4 * 6, step=6)  # the checkpoint's own batch: sized as a new run
    assert len(unchanged.train_set) == STEPS * 4


def test_a_resume_at_a_smaller_global_batch_reads_on_in_the_checkpoints_order():
    """A checkpoint of 2 ranks (8 samples per step, a split of 10 x 8 = 80) resumed on 1 rank at step 3: the
    split was sized for what the remaining steps need (52 samples), another number of epochs and so another
    shuffle: 3 of the 200 samples the uninterrupted run reads next were read, 6 read before came again.
    The checkpoint's split is kept: the resume reads on in the two-rank run's order."""
    blend = f"data.train_data={_blend()}"
    _, two_ranks = _train_data(blend, consumed=0, dp_size=2, step=0)
    _, resumed = _train_data(blend, consumed=8 * 3, step=3, saved_split=two_ranks.split_samples)
    assert resumed.split_samples == two_ranks.split_samples == 80
    rows = [row.tolist() for _ in range(STEPS - 3) for batch in resumed.next_step() for row in batch["input_ids"]]
    assert rows == [two_ranks.train_set[i]["tokens"].tolist() for i in range(24, 24 + 4 * (STEPS - 3))]


def _files(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*"))


def test_init_optimizer_at_another_layout_converts_into_its_own_run_dir():
    """run.init_from with run.init_optimizer on 1 rank from the 2-rank ZeRO-2 run: the universal
    conversion goes into the new run's converted/ directory, not into the source run's, which may
    be read-only, shared or still training (made read-only here; root ignores that: it is also
    compared file by file)."""
    source = two_rank_run(2, "deepspeed")
    run_dir = scratch() / "init_optimizer_other_layout"
    before = _files(source)
    subprocess.run(["chmod", "-R", "a-w", str(source)], check=True)
    try:
        result = pretrain(run_dir, 2, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2,
                          max_steps=2, warmup_steps=1, decay_steps=0, eval_interval=0,
                          **{"run.init_from": str(source), "run.init_optimizer": "true"})
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(source)], check=True)
    assert _files(source) == before
    converted = run_dir / "converted" / "step_00000010_universal"
    assert f"continuing from the weights of {source / 'checkpoints' / 'step_00000010'} with a fresh schedule" in result.stdout
    assert f"universal checkpoint in {converted}" in result.stdout and "100%" in result.stderr  # ds_to_universal's progress
    assert not converted.exists() and (run_dir / "checkpoints" / "latest").is_file()  # removed after its own save
    assert losses(run_dir)[0] < losses(single_process_run())[0] - 0.3  # the trained weights, not a fresh start


def test_resume_one_rank_on_two_and_sigterm_saves():
    """1 -> 2 ranks from the reference's step-5 checkpoint; then SIGTERM stops a run with a checkpoint."""
    source = single_process_run()
    run_dir = scratch() / "one_to_two"
    at_step_5_of(source, run_dir)
    pretrain(run_dir, 0, nproc=2, micro_batch_size=2, gradient_accumulation_steps=1)
    assert losses(run_dir) == pytest.approx(losses(source)[5:], rel=2e-5)

    run_dir = scratch() / "sigterm"
    process = _start(run_dir, 1, 1, "python", max_steps=1000, eval_interval=0)
    _wait_for_line(process, "step      3/1000 | loss")
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    assert "stop signal received" in output
    assert latest_meta(run_dir)["step"] >= 3


@pytest.mark.parametrize("saved,resumed", [(0, 2), (2, 0), (2, 3), (3, 1)])
def test_resume_across_zero_families_fails_before_any_work(saved, resumed, tmp_path):
    """DeepSpeed's optimizer checkpoints load within ZeRO-0, ZeRO 1-2 and ZeRO-3 only: across them
    the run stops with the way out named, instead of an assertion inside DeepSpeed."""
    from doge_dist.config import ConfigError, TrainConfig
    from doge_dist.parallel.state import ParallelLayout
    from doge_dist.train import checkpoint
    from doge_dist.train.loop import loadable_checkpoint

    tag = checkpoint.tag_for(4)
    (tmp_path / tag).mkdir()
    (tmp_path / tag / checkpoint.META).write_text(json.dumps({"step": 4, "dp_size": 1, "zero_stage": saved}))
    layout = ParallelLayout(world_size=1, tensor_parallel=1, expert_parallel=1)
    with pytest.raises(ConfigError, match=rf"saved with ZeRO-{saved} and this run uses ZeRO-{resumed}: .*Resume with "
                                          r"ZeRO[- ][0-3-]+, or start a new run.dir from its weights with run.init_from"):
        loadable_checkpoint(tmp_path, tag, layout, {"zero_optimization": {"stage": resumed}}, tmp_path, TrainConfig())


@pytest.mark.parametrize("files,stage", [([], 0), (["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"], 2),
                                         (["zero_pp_rank_0_mp_rank_00_model_states.pt",
                                           "zero_pp_rank_0_mp_rank_00_optim_states.pt"], 3)])
def test_saved_zero_stage_of_checkpoints_without_it_in_their_meta(files, stage, tmp_path):
    from doge_dist.train import checkpoint

    tag = checkpoint.tag_for(4)
    (tmp_path / tag).mkdir()
    (tmp_path / tag / checkpoint.META).write_text(json.dumps({"step": 4}))
    for name in ["mp_rank_00_model_states.pt"] * (stage < 3) + files:
        (tmp_path / tag / name).touch()
    assert checkpoint.saved_zero_stage(tmp_path, tag) == stage


def test_resume_follows_the_schedule_of_the_resumed_config():
    """A resumed run with another train.lr and train.max_steps uses them from its first step on (the
    checkpoint holds the old peak lr and the old schedule's last lr)."""
    from doge_dist.config import TrainConfig
    from doge_dist.train.schedule import lr_multiplier

    run_dir = scratch() / "longer"
    changed = dict(micro_batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS + 4, lr=1.0e-3)
    pretrain(run_dir, 0, nproc=1, launcher="python", **changed,
             **{"run.resume": str(single_process_run() / "checkpoints" / f"step_{STEPS:08d}")})
    train = TrainConfig(max_steps=STEPS + 4, lr=1.0e-3, warmup_steps=2, decay_steps=3)
    logged = scalars(run_dir, "train/lr")
    assert sorted(logged) == list(range(STEPS + 1, STEPS + 5))
    for step, lr in logged.items():
        assert lr == pytest.approx(1.0e-3 * lr_multiplier(step - 1, train), rel=1e-6), step


def test_a_refused_resume_leaves_the_run_files_as_they_were(tmp_path):
    """The run's config.yaml and ds_config.json keep describing its checkpoints when a restart with
    another ZeRO family is refused (they are written only once the start is settled)."""
    from doge_dist.config import ModelConfig
    from doge_dist.train import checkpoint

    tag = checkpoint.tag_for(4)
    (tmp_path / "checkpoints" / tag).mkdir(parents=True)
    meta = {"step": 4, "dp_size": 1, "zero_stage": 2, "model": ModelConfig.from_preset("doge-tiny").to_dict()}
    (tmp_path / "checkpoints" / tag / checkpoint.META).write_text(json.dumps(meta))
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text(tag)
    for name in ("config.yaml", "ds_config.json"):
        (tmp_path / name).write_text("the ZeRO-2 run's\n")
    cmd = command(1, "python") + ["--ds_config", str(REPO / "configs" / "zero0.json")] + base_overrides(tmp_path)
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "saved with ZeRO-2 and this run uses ZeRO-0" in result.stderr, result.stderr[-3000:]
    assert [(tmp_path / name).read_text() for name in ("config.yaml", "ds_config.json")] == ["the ZeRO-2 run's\n"] * 2


def test_a_resume_that_changes_the_global_batch_says_how_to_keep_it():
    from doge_dist.config import TrainConfig
    from doge_dist.train.loop import warn_if_global_batch_changed

    saved = {"step": 10, "consumed_samples": 40}  # 4 sequences per step: 2 ranks x micro 2
    with pytest.warns(UserWarning, match=r"took 4 sequences each and this run takes 2 .* "
                                         r"train.gradient_accumulation_steps=2 keeps it on 1 data-parallel rank"):
        warn_if_global_batch_changed(saved, TrainConfig(micro_batch_size=2, gradient_accumulation_steps=1), dp_size=1)
    with pytest.warns(UserWarning, match="no whole accumulation keeps it"):
        warn_if_global_batch_changed(saved, TrainConfig(micro_batch_size=3, gradient_accumulation_steps=1), dp_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_global_batch_changed(saved, TrainConfig(micro_batch_size=2, gradient_accumulation_steps=2), dp_size=1)


def test_a_resume_compares_with_the_batch_of_the_checkpoints_last_steps():
    """A run resumed once with another global batch: its checkpoint's mean batch is neither, and the next
    resume keeping the batch must not be told to change it (the meta file records the batch)."""
    from doge_dist.config import TrainConfig
    from doge_dist.train.checkpoint import read_meta, tag_for
    from doge_dist.train.loop import warn_if_global_batch_changed

    assert read_meta(single_process_run() / "checkpoints", tag_for(STEPS))["global_batch"] == 4
    saved = {"step": 20, "consumed_samples": 10 * 4 + 10 * 8, "global_batch": 8}  # 10 steps of 4, then 10 of 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_global_batch_changed(saved, TrainConfig(micro_batch_size=2, gradient_accumulation_steps=4), dp_size=1)
    with pytest.warns(UserWarning, match=r"took 8 sequences each and this run takes 4 .* "
                                         r"train.gradient_accumulation_steps=4 keeps it on 1 data-parallel rank"):
        warn_if_global_batch_changed(saved, TrainConfig(micro_batch_size=2, gradient_accumulation_steps=2), dp_size=1)


def _train_data(*overrides, consumed=STEPS * 4, dp_size=1, step=None, saved_split=0):
    """The single-process reference run's data (micro 2 x accumulation 2 per rank) at ``consumed``, as
    ``dp_size`` ranks resuming at ``step`` (by default the step of ``consumed`` at 4 per step) see it
    (``saved_split``: the resumed checkpoint's)."""
    from doge_dist.config import load_config
    from doge_dist.train.data import TrainData

    config = load_config(None, base_overrides(scratch() / "unused", micro_batch_size=2, gradient_accumulation_steps=2)
                         + list(overrides))
    step = consumed // 4 if step is None else step
    return config, TrainData(config, 0, dp_size, consumed, str(scratch() / "data_cache"), step=step, saved_split=saved_split)


def _data_order(*overrides, consumed=STEPS * 4):
    """data.data_order of the single-process reference run's data (micro 2 x accumulation 2) at ``consumed``."""
    from doge_dist.train.data import data_order

    config, data = _train_data(*overrides, consumed=consumed)
    return data_order(config, data, consumed)


def test_a_resume_whose_data_order_changed_says_what_changed():
    """The checkpoint records what fixed its sample order; a resume that reads another order at the same
    consumed_samples (another seq_length, or a longer run that megatron-core shuffles over more epochs)
    names the change; extending the run within the same epochs continues the same order silently."""
    from doge_dist.train.checkpoint import read_meta, tag_for
    from doge_dist.train.data import warn_if_data_order_changed

    saved = read_meta(single_process_run() / "checkpoints", tag_for(STEPS))
    assert saved["data_order"] == _data_order()  # what the run saved is what a resume computes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_data_order_changed(saved, _data_order("train.max_steps=14"), STEPS * 4)
    with pytest.warns(UserWarning, match=r"data.seq_length 64 -> 32\).* at sample 40 of another order"):
        warn_if_data_order_changed(saved, _data_order("data.seq_length=32"), STEPS * 4)
    with pytest.warns(UserWarning, match=r"train.max_steps x global batch 40 -> 40000 samples"):
        warn_if_data_order_changed(saved, _data_order("train.max_steps=10000"), STEPS * 4)


def test_a_resume_that_resets_positions_or_masks_eod_loss_keeps_its_data_order():
    """The fingerprint hashed whole samples: data.reset_position_ids or data.eod_mask_loss turned on at a
    resume changes the positions and the loss mask of the same sequences, and was reported as changed data files."""
    from doge_dist.train.data import warn_if_data_order_changed

    flags = ("data.reset_position_ids=true", "data.eod_mask_loss=true")
    _, plain = _train_data()
    _, reset = _train_data(*flags)
    eod = data_helpers.tokenizer().eod_id
    last = next(i for i in range(len(plain.train_set)) if (plain.train_set[i]["tokens"] == eod).any())
    assert (plain.train_set[last]["position_ids"] != reset.train_set[last]["position_ids"]).any()
    assert (plain.train_set[last]["loss_mask"] != reset.train_set[last]["loss_mask"]).any()
    consumed = last + 1  # the fingerprint's samples: 0 and the last consumed
    assert _data_order(*flags, consumed=consumed)["fingerprint"] == _data_order(consumed=consumed)["fingerprint"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_data_order_changed({"data_order": _data_order(consumed=consumed)}, _data_order(*flags, consumed=consumed),
                                   consumed)


def _rerun_over_a_checkpoint_without_weights(run_dir: Path, step: int) -> tuple[subprocess.CompletedProcess, str]:
    """Pretraining in ``run_dir`` whose latest checkpoint, at ``step``, has a meta file and no weights:
    whatever the run does with it must not need them. Returns the result and the checkpoint's tag."""
    from doge_dist.config import ModelConfig
    from doge_dist.train import checkpoint

    tag = checkpoint.tag_for(step)
    (run_dir / "checkpoints" / tag).mkdir(parents=True)
    meta = {"step": step, "consumed_samples": 60, "consumed_tokens": 3840, "dp_size": 1, "zero_stage": 0,
            "model": ModelConfig.from_preset("doge-tiny").to_dict()}
    (run_dir / "checkpoints" / tag / checkpoint.META).write_text(json.dumps(meta))
    (run_dir / "checkpoints" / checkpoint.LATEST).write_text(tag)
    cmd = command(1, "python") + ["--ds_config", str(REPO / "configs" / "zero0.json")] + base_overrides(run_dir)
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300), tag


def test_a_checkpoint_past_max_steps_is_refused_before_any_model(tmp_path):
    result, _ = _rerun_over_a_checkpoint_without_weights(tmp_path, STEPS + 5)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"is at step {STEPS + 5}, past train.max_steps = {STEPS}: set train.max_steps to at least {STEPS + 5}" in result.stderr


def test_a_finished_run_run_again_exits_before_building_anything(tmp_path):
    """A rerun of a run whose latest checkpoint is at train.max_steps (a chained job, `make demo` again) says
    so and exits 0 without building the engine or loading the checkpoint (here it has no weights to load)."""
    from doge_dist.train.checkpoint import LATEST

    result, tag = _rerun_over_a_checkpoint_without_weights(tmp_path, STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{tmp_path / 'checkpoints' / tag} is at train.max_steps ({STEPS}): the run is finished" in result.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LATEST, tag]


def test_a_rank_the_saving_run_did_not_have_continues_rank_0s_random_stream(tmp_path):
    """Every rank starts from one seed and draws alike, so tensor-parallel replicas draw the same dropout
    masks; a rank added on resume (1 process -> tensor parallel 2) must join that stream, not a seed of its own."""
    import torch

    from doge_dist.train.checkpoint import _rng_state, restore_rng, seed_everything

    seed_everything(7)
    torch.rand(3)
    torch.save(_rng_state(), tmp_path / "rng_rank00000.pt")
    saved_stream = torch.rand(5)
    seed_everything(1234)
    restore_rng(tmp_path, 1, 1234)
    assert torch.equal(torch.rand(5), saved_stream)


def test_a_resume_from_a_checkpoint_with_a_cut_file_names_it_before_any_model(tmp_path):
    """A checkpoint copied only in part: the resume stops with the file named and the checkpoint to fall
    back to, instead of torch's zip error from inside DeepSpeed once the engine is built."""
    source = single_process_run() / "checkpoints"
    (tmp_path / "checkpoints").mkdir()
    for tag in ("step_00000005", "step_00000010"):
        subprocess.run(["cp", "-r", str(source / tag), str(tmp_path / "checkpoints")], check=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010")
    weights = tmp_path / "checkpoints" / "step_00000010" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cmd = command(1, "python") + ["--ds_config", str(REPO / "configs" / "zero0.json")] + base_overrides(tmp_path, max_steps=12)
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"error: Checkpoint {tmp_path / 'checkpoints' / 'step_00000010'} is damaged (truncated (not a whole torch file): "
            "mp_rank_00_model_states.pt). Restore the file(s), or continue from the complete checkpoint before it, "
            f"step_00000005: run `echo step_00000005 > {tmp_path / 'checkpoints' / 'latest'}`") in result.stderr


def test_a_second_trainer_on_a_run_dir_stops_before_any_work(tmp_path):
    """The run.dir's lock is held (a trainer still running there): the second one writes nothing."""
    import fcntl

    from doge_dist.train.checkpoint import RUN_LOCK

    with open(tmp_path / RUN_LOCK, "w") as held:
        held.write("pid 4242 on node7\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        cmd = command(1, "python") + ["--ds_config", str(REPO / "configs" / "zero0.json")] + base_overrides(tmp_path)
        result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {tmp_path} is in use by another trainer (pid 4242 on node7, holding {tmp_path / RUN_LOCK})" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_LOCK]


def test_a_resume_from_an_older_checkpoint_of_the_run_rewinds_it():
    """run.resume=<run.dir>/checkpoints/step_5 while latest is step_10: the rewound run's step-10 save
    replaces the old one (it was skipped as "nothing new since latest", and the new weights were lost),
    and its universal conversion goes (a resume on another layout loaded the abandoned weights). The old
    trajectory's step 7 (another save interval) is moved to checkpoints/abandoned/ when the run saves
    past it: kept among the complete checkpoints, keep_last deleted the rewound run's own."""
    run_dir = scratch() / "rewound"
    run_dir.mkdir()
    root = run_dir / "checkpoints"
    subprocess.run(["cp", "-r", str(single_process_run() / "checkpoints"), str(root)], check=True)
    old_meta = root / "step_00000010" / "doge_meta.json"
    old_meta.write_text(json.dumps({**json.loads(old_meta.read_text()), "old": True}))
    subprocess.run(["cp", "-r", str(root / "step_00000010"), str(root / "step_00000007")], check=True)
    (root / "step_00000010_universal").mkdir()
    result = pretrain(run_dir, 0, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2,
                      save_interval=5, keep_last=2, **{"run.resume": str(root / "step_00000005")})
    assert f"run.resume rewinds {run_dir} to step_00000005" in result.stdout + result.stderr
    assert (root / "latest").read_text() == "step_00000010"
    assert "old" not in json.loads(old_meta.read_text())  # the rewound run's own step 10
    assert sorted(p.name for p in root.iterdir()) == ["abandoned", "latest", "step_00000005", "step_00000010"]
    assert [p.name for p in (root / "abandoned").iterdir()] == ["step_00000007"]
    assert losses(run_dir) == losses(single_process_run())[5:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    assert [event.step for event in board.Tensors("config/text_summary")] == [5]  # where the resumed run's config took effect


def _own_checkpoints_up_to_10_marked_old(run_dir: Path) -> Path:
    """``run_dir`` holding the reference run's checkpoints (step 5, step 10 marked "old") and config.yaml."""
    run_dir.mkdir()
    root = run_dir / "checkpoints"
    subprocess.run(["cp", "-r", str(single_process_run() / "checkpoints"), str(root)], check=True)
    subprocess.run(["cp", str(single_process_run() / "config.yaml"), str(run_dir)], check=True)
    old_meta = root / "step_00000010" / "doge_meta.json"
    old_meta.write_text(json.dumps({**json.loads(old_meta.read_text()), "old": True}))
    return root


def test_a_resume_from_another_runs_checkpoint_into_a_run_dir_with_newer_ones_saves_its_own(tmp_path):
    """run.resume=<elsewhere>/step_5 into a run.dir whose latest is step_10: its step-10 save was skipped as
    "nothing new since latest", so latest kept naming the old weights and the run's own were lost. The
    run.dir is rewound as for its own older checkpoint: its old trajectory goes to checkpoints/abandoned/."""
    root = _own_checkpoints_up_to_10_marked_old(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["cp", "-r", str(root / "step_00000005"), str(elsewhere)], check=True)
    result = pretrain(tmp_path / "run", 0, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2,
                      save_interval=5, **{"run.resume": str(elsewhere / "step_00000005")})
    assert "run.resume rewinds" in result.stdout + result.stderr
    assert (root / "latest").read_text() == "step_00000010"
    assert "old" not in json.loads((root / "step_00000010" / "doge_meta.json").read_text())  # this run's step 10
    assert sorted(p.name for p in root.iterdir()) == ["abandoned", "latest", "step_00000010"]
    assert [p.name for p in (root / "abandoned").iterdir()] == ["step_00000005"]
    assert losses(tmp_path / "run") == losses(single_process_run())[5:]


def _prefix_past_the_vocabulary(directory: Path) -> str:
    """The test corpus tokenized with a 1,024-id tokenizer: ids past doge-tiny's 512."""
    from doge_dist.data import preprocess
    from doge_dist.data.train_tokenizer import train_tokenizer

    corpus = data_helpers.assets().train_jsonl
    model = train_tokenizer(corpus, directory / "tokenizer", vocab_size=1024, threads=1, log=data_helpers.quiet)
    preprocess(corpus, str(directory / "big"), str(model), append_eod=True, workers=1, log=data_helpers.quiet)
    return str(directory / "big_text_document")


def test_a_refused_rewind_leaves_latest_and_the_run_files_as_they_were(tmp_path):
    """run.resume=<run.dir>/checkpoints/step_5 refused while its data was checked (ids past the vocabulary):
    latest had already been moved back to step_5 (and config.yaml rewritten), so the next plain restart
    resumed at step 5 and overwrote the run's step 10."""
    root = _own_checkpoints_up_to_10_marked_old(tmp_path / "run")
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    result = pretrain(tmp_path / "run", 0, nproc=1, launcher="python", check=False, micro_batch_size=2,
                      gradient_accumulation_steps=2, save_interval=5,
                      **{"run.resume": str(root / "step_00000005"), "data.train_data": f"[{_prefix_past_the_vocabulary(tmp_path)}]"})
    assert result.returncode == 2 and "vocab" in result.stderr, result.stderr[-3000:]
    assert (root / "latest").read_text() == "step_00000010"
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before


def test_a_stop_signal_to_the_process_group_with_dataloader_workers_saves_and_resumes_exactly():
    """Slurm delivers its preemption signal (srun's forwarded USR1, the SIGTERM at the time limit) to
    every process of the job step, so DataLoader workers (data.num_workers > 0) get it too, as from
    `kill -TERM -- -<pid>`: they must leave the stop to the trainer, which saves; the resumed run (its
    workers started at the checkpoint's sample) then reproduces the uninterrupted losses exactly."""
    import os

    run_dir = scratch() / "workers_signalled"
    settings = dict(micro_batch_size=2, gradient_accumulation_steps=2, save_interval=5, **{"data.num_workers": 2})
    cmd = command(1, "python") + ["--ds_config", str(REPO / "configs" / "zero0.json")] + base_overrides(run_dir, **settings)
    process = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    _wait_for_line(process, f"step      2/{STEPS} | loss")
    os.killpg(process.pid, signal.SIGUSR1)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "stop signal received" in output, output[-3000:]
    saved = latest_meta(run_dir)
    assert 2 <= saved["step"] < STEPS
    pretrain(run_dir, 0, nproc=1, launcher="python", **settings)
    assert losses(run_dir) == losses(single_process_run())  # exactly


def test_a_stop_signal_during_setup_saves_after_the_first_step():
    """Slurm's warning may come while a (re)started run is still setting up (data indexes, a universal
    conversion): the signal was then the default action's (USR1 kills) or, under slurm/node.sh, ignored
    and lost, and the job ran into its time limit. It is kept for the first step, which then saves."""
    source = single_process_run()
    run_dir = scratch() / "signalled_in_setup"
    at_step_5_of(source, run_dir)
    process = _start(run_dir, 0, 1, "python", micro_batch_size=2, gradient_accumulation_steps=2)
    _wait_for_line(process, "[doge-dist] resumed from")  # the data and the reporting are still to be built
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "stop signal received: saving at step 6" in output, output[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"


def test_a_stop_signal_that_reaches_one_tensor_parallel_rank_first_stops_every_rank_at_one_step():
    """Slurm's signal reaches the ranks at slightly different times. With tensor parallelism each rank
    is alone in its data-parallel group, so a vote over that group let the signalled rank save (a
    barrier) while its tensor-parallel peer went on into the next step's all-reduce: a hang until
    the time limit, no checkpoint and no requeue. Here only rank 1 is signalled."""
    import psutil

    run_dir = scratch() / "tp_one_rank_signalled"
    process = _start(run_dir, 1, 2, "torchrun", micro_batch_size=2, gradient_accumulation_steps=1, max_steps=1000,
                     eval_interval=0, **{"parallel.tensor_parallel": 2})
    _wait_for_line(process, "step      3/1000 | loss")
    ranks = {int(child.environ()["RANK"]): child for child in psutil.Process(process.pid).children()}
    ranks[1].send_signal(signal.SIGUSR1)
    try:
        output = process.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        for rank in ranks.values():
            rank.kill()
        process.kill()
        raise AssertionError("the ranks did not stop together: the run hung after one rank's stop signal") from None
    assert process.returncode == 0 and "stop signal received" in output, output[-3000:]
    saved = latest_meta(run_dir)
    assert 3 <= saved["step"] < 1000


def test_a_diverged_run_leaves_its_last_finite_checkpoint_as_latest():
    """lr 1e30: steps 1 and 2 have finite losses, step 2's update breaks the weights and every later step
    is non-finite (skipped) until train.max_bad_steps stops the run, saying that the last good checkpoint
    is untouched. The steps of the non-finite streak must write no checkpoint: it would become `latest`
    (a resume with a lower lr would start after the streak's batches) and push good ones out (keep_last)."""
    run_dir = scratch() / "diverged"
    result = pretrain(run_dir, 0, nproc=1, launcher="python", check=False, lr=1.0e30, save_interval=1, max_bad_steps=2,
                      keep_last=2, eval_interval=0)
    assert result.returncode == 3 and "non-finite steps in a row" in result.stderr, result.stderr[-3000:]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"
    assert sorted(p.parent.name for p in root.glob("step_*/doge_meta.json")) == ["step_00000001", "step_00000002"]


@pytest.mark.parametrize("override, named", [({"train.bf16": True}, "bf16 (train.bf16"),
                                             ({"train.decay_groups": "original"}, "train.decay_groups"),
                                             ({"data_types": {"grad_accum_dtype": "fp32"}}, "grad_accum_dtype")])
def test_a_resume_into_another_optimizer_layout_is_refused(override, named, tmp_path):
    """Precision, ZeRO-1's BF16_Optimizer and the AdamW groups decide the optimizer states DeepSpeed
    saves: a resume that changes them stops with the way out named, instead of a KeyError or
    ValueError inside DeepSpeed once the engine is built."""
    from doge_dist.config import ConfigError, TrainConfig
    from doge_dist.parallel.state import ParallelLayout
    from doge_dist.train import checkpoint
    from doge_dist.train.loop import loadable_checkpoint, optimizer_layout

    saved_ds = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": "data_types" in override}}
    tag = checkpoint.tag_for(4)
    (tmp_path / tag).mkdir()
    meta = {"step": 4, "dp_size": 1, "zero_stage": 1, "optimizer_layout": optimizer_layout(TrainConfig(), saved_ds)}
    (tmp_path / tag / checkpoint.META).write_text(json.dumps(meta))
    layout = ParallelLayout(world_size=1, tensor_parallel=1, expert_parallel=1)
    train = TrainConfig(**{key.split(".")[1]: value for key, value in override.items() if key.startswith("train.")})
    ds = {**saved_ds, **{key: value for key, value in override.items() if "." not in key}}
    if train.bf16:
        ds["bf16"] = {"enabled": True}
    assert loadable_checkpoint(tmp_path, tag, layout, saved_ds, tmp_path, TrainConfig()) == (tmp_path, tag)
    with pytest.raises(ConfigError, match=rf"another layout than this run builds \(.*{re.escape(named)}.*\): DeepSpeed "
                                          r"cannot load them. Resume with the checkpoint's settings, or start a new "
                                          r"run.dir from its weights with run.init_from"):
        loadable_checkpoint(tmp_path, tag, layout, ds, tmp_path, train)


def test_a_resume_in_bf16_of_an_fp32_checkpoint_stops_before_any_model(tmp_path):
    at_step_5_of(single_process_run(), tmp_path)  # ZeRO-0, fp32
    result = pretrain(tmp_path, 0, nproc=1, launcher="python", check=False, micro_batch_size=2,
                      gradient_accumulation_steps=2, **{"train.bf16": "true"})
    assert result.returncode == 2 and "bf16 (train.bf16, or the DeepSpeed JSON's bf16.enabled): False -> True" \
        in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
