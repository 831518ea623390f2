"""tok/s, TFLOP/s and MFU: the real tokens of a step (fine-tuning pads its sequences) at their own
lengths' FLOPs, over training time only (validation and checkpoints left out, as in Megatron-LM).
The clock is a fake one: the numbers are exact."""
import pytest
import torch

from doge_dist.config import ModelConfig
from doge_dist.data.chat_dataset import collate_lm, collate_pairs
from doge_dist.model.flops import training_flops, training_flops_per_token
from doge_dist.train import metrics
from doge_dist.train.loop import real_lengths
from train_helpers import scalars


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rates_count_the_logged_steps_work_and_leave_validation_and_checkpoints_out(monkeypatch, tmp_path):
    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    reporter = metrics.Reporter(str(tmp_path), True, peak=2.0, world_size=4, max_steps=10)
    for _ in range(2):  # two steps of 1,000 tokens and 8e12 FLOPs (all ranks), 1 s each
        clock.now += 1.0
        reporter.count(1000, 8e12)
    with reporter.paused():  # a validation and a checkpoint: 30 s
        clock.now += 30.0
    reporter.train_step(2, 5.0, 1e-3, 1.0, 2000, torch.device("cpu"), None)
    clock.now += 4.0
    reporter.count(500, 2e12)
    reporter.train_step(3, 5.0, 1e-3, 1.0, 2500, torch.device("cpu"), None)
    reporter.close()
    assert scalars(tmp_path, "train/tokens_per_sec") == {2: 1000.0, 3: 125.0}
    assert scalars(tmp_path, "train/tflops_per_device") == {2: pytest.approx(2.0), 3: pytest.approx(0.125)}
    assert scalars(tmp_path, "train/mfu") == {2: pytest.approx(1.0), 3: pytest.approx(0.0625)}
    assert scalars(tmp_path, "train/consumed_tokens") == {2: 2000.0, 3: 2500.0}


def test_the_logged_losses_are_the_means_of_the_applied_steps_since_the_last_log_point(tmp_path, capsys):
    """log_interval 3 over 7 steps: a log point showed only its own step's loss (two of three never shown)
    beside rates averaged over the interval. A step skipped for a non-finite loss is left out of the mean;
    when every step of an interval was skipped, the log point shows its own step's loss."""
    reporter = metrics.Reporter(str(tmp_path), True, peak=0.0, world_size=1, max_steps=7)
    steps = {1: (6.0, 0.3), 2: (5.0, 0.1), 3: None, 4: None, 5: None, 6: None, 7: (4.0, 0.2)}  # None: skipped
    for step, applied in steps.items():
        reporter.count(100, 1e9)
        if applied:
            reporter.count_loss(*applied)
        if step in (3, 6, 7):  # log points: every third step, and the last
            loss, balance = applied or (float("inf"), 0.9)
            reporter.train_step(step, loss, 1e-3, 1.0, 100 * step, torch.device("cpu"), balance)
    reporter.close()
    assert scalars(tmp_path, "train/loss") == {3: 5.5, 6: float("inf"), 7: 4.0}
    assert scalars(tmp_path, "moe/balance_loss") == pytest.approx({3: 0.2, 6: 0.9, 7: 0.2})
    assert "step      3/7 | loss 5.5000 |" in capsys.readouterr().out


def test_padded_sequences_count_their_real_tokens_at_their_own_length():
    samples = [{"input_ids": torch.arange(n), "labels": torch.arange(n), "position_ids": torch.arange(n)} for n in (20, 50)]
    assert real_lengths(collate_lm(samples, pad_id=2, multiple=8)) == [20, 50]  # padded to 56
    pairs = collate_pairs([{"chosen": samples[0], "rejected": samples[1], "index": 0}], pad_id=2)
    assert real_lengths(pairs) == [20, 50]
    assert real_lengths({"input_ids": torch.zeros(3, 64, dtype=torch.long)}) == [64, 64, 64]  # pretraining
    config = ModelConfig.from_preset("doge-tiny")
    assert training_flops(config, [20, 50]) == 20 * training_flops_per_token(config, 20) + 50 * training_flops_per_token(config, 50)


def test_a_run_restarted_before_its_first_checkpoint_replaces_the_killed_runs_points(tmp_path):
    """A run killed before it saved anything starts again at step 0: TensorBoard (which reads the
    directory as one run) showed the killed run's points beside the new ones, as two curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for steps, loss in ((3, 9.0), (2, 5.0)):  # killed at step 3, then restarted from scratch
        reporter = metrics.Reporter(str(tmp_path), True, 0.0, 1, 10, start_step=0)
        for step in range(1, steps + 1):
            reporter.scalars(step, {"train/loss": loss})
        reporter.writer.close()
    board = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    assert [(event.step, event.value) for event in board.Scalars("train/loss")] == [(1, 5.0), (2, 5.0)]


def test_a_device_without_a_known_peak_writes_no_mfu(tmp_path):
    """The console says "MFU n/a"; TensorBoard got a flat train/mfu of 0 that read as a measurement."""
    reporter = metrics.Reporter(str(tmp_path), True, peak=0.0, world_size=1, max_steps=2)
    reporter.count(1000, 1e12)
    reporter.train_step(1, 5.0, 1e-3, 1.0, 1000, torch.device("cpu"), None)
    reporter.close()
    assert scalars(tmp_path, "train/mfu") == {} and scalars(tmp_path, "train/tflops_per_device")
