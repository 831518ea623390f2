"""TensorBoard: every documented tag exists with finite values (moe/balance_loss for an MoE model),
and the resolved config is stored as text."""
import math
import re
from functools import lru_cache

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train_helpers import losses, pretrain, scalars, scratch, single_process_run

TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tflops_per_device", "train/mfu",
        "train/memory_gb", "train/consumed_tokens", "val/loss", "val/ppl"]


def test_tags_exist_with_finite_values():
    run_dir = single_process_run()
    for tag in TAGS:
        values = scalars(run_dir, tag)
        assert values, tag
        assert all(math.isfinite(v) for v in values.values()), tag
    assert scalars(run_dir, "train/consumed_tokens")[10] == 10 * 4 * 64
    assert all(0 < v < 1 for v in scalars(run_dir, "train/mfu").values())  # against the CPU's measured peak
    events = next((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert any("config" in tag for tag in accumulator.Tags()["tensors"])


def test_a_log_point_shows_the_mean_loss_of_the_steps_since_the_previous_one():
    """At train.log_interval 4 the logged loss was that of every fourth step only (and of the last): the
    three before it were never shown, while tok/s beside it was the interval's mean. As Megatron-LM logs
    it: the mean over the steps since the previous log point; lr and grad norm are the logged step's."""
    run_dir = scratch() / "log_interval_4"
    pretrain(run_dir, 0, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2, log_interval=4,
             eval_interval=0)
    reference = single_process_run()  # the same steps, logged at every step
    per_step = losses(reference)
    assert scalars(run_dir, "train/loss") == pytest.approx(
        {4: sum(per_step[0:4]) / 4, 8: sum(per_step[4:8]) / 4, 10: sum(per_step[8:10]) / 2}, rel=1e-6)
    norms = scalars(reference, "train/grad_norm")
    assert scalars(run_dir, "train/grad_norm") == pytest.approx({step: norms[step] for step in (4, 8, 10)}, rel=1e-6)


MOE_TAGS = ["moe/balance_loss", "moe/expert_load_max_over_mean", "moe/unused_expert_fraction", "moe/router_entropy"]


def moe_run(name: str, nproc: int = 1, **parallel):
    return pretrain(scratch() / name, 1, nproc=nproc, launcher="python" if nproc == 1 else "torchrun", max_steps=2,
                    warmup_steps=0, decay_steps=0, eval_interval=0, **{"model.preset": "doge-tiny-moe", **parallel})


@lru_cache(maxsize=None)
def one_process_moe_run():
    return moe_run("moe")


def test_moe_balance_and_routing_statistics_are_logged():
    run_dir = scratch() / "moe"
    result = one_process_moe_run()
    assert re.search(r"\| MFU \d+\.\d% \|", result.stdout)  # the CPU's peak is measured
    values = scalars(run_dir, "moe/balance_loss")
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values.values())
    load = scalars(run_dir, "moe/expert_load_max_over_mean")
    assert len(load) == 2 and all(v >= 1.0 for v in load.values())
    unused = scalars(run_dir, "moe/unused_expert_fraction")
    assert all(0.0 <= v < 1.0 for v in unused.values())
    entropy = scalars(run_dir, "moe/router_entropy")
    assert all(0.0 < v <= math.log(16) + 1e-6 for v in entropy.values())  # 16 experts


def test_moe_statistics_under_sequence_parallelism_count_every_token():
    """Tensor-parallel ranks with sequence parallelism route different parts of each sequence: the
    moe/* scalars count all of them, as one process does."""
    one_process_moe_run()
    moe_run("moe_tp2_sp", nproc=2, **{"parallel.tensor_parallel": 2, "parallel.sequence_parallel": "true"})
    for tag in MOE_TAGS:
        assert scalars(scratch() / "moe_tp2_sp", tag) == pytest.approx(scalars(scratch() / "moe", tag), rel=1e-4), tag
