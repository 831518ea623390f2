"""WSD and cosine schedules: linear WSD equals transformers.get_wsd_schedule step for step, cosine equals
transformers' cosine_with_min_lr (the small-doge SFT/DPO recipes' schedule)."""
import math

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_wsd_schedule

from doge_dist.config import ConfigError, TrainConfig
from doge_dist.train.schedule import build_scheduler, check_schedule, lr_multiplier


def lrs(scheduler, steps):
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("warmup,decay,total,floor", [(800, 800, 8000, 0.0), (10, 30, 100, 0.1), (0, 5, 20, 0.0), (3, 0, 10, 0.0)])
def test_wsd_linear_equals_transformers(warmup, decay, total, floor):
    train = TrainConfig(lr=1.0, max_steps=total, warmup_steps=warmup, decay_steps=decay, min_lr_ratio=floor)
    ours = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), train)
    reference = get_wsd_schedule(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_warmup_steps=warmup,
        num_decay_steps=decay, num_training_steps=total, decay_type="linear", min_lr_ratio=floor,
    )
    assert lrs(ours, total + 2) == pytest.approx(lrs(reference, total + 2), abs=1e-12)


@pytest.mark.parametrize("warmup,total,floor", [(10, 100, 0.1), (205, 2050, 0.1), (0, 20, 0.1), (3, 10, 0.0)])
def test_cosine_equals_transformers_cosine_with_min_lr(warmup, total, floor):
    """The SFT/DPO recipes' ``lr_scheduler_type: cosine_with_min_lr``, ``min_lr_rate: 0.1``: its warmup
    starts at 0, not at the floor (transformers' WSD starts at the floor; its cosine does not)."""
    train = TrainConfig(scheduler="cosine", lr=1.0, max_steps=total, warmup_steps=warmup, min_lr_ratio=floor)
    ours = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), train)
    reference = get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_warmup_steps=warmup,
        num_training_steps=total, min_lr_rate=floor,
    )  # to the last step: past it transformers' cosine climbs again, ours stays at the floor
    assert lrs(ours, total + 1) == pytest.approx(lrs(reference, total + 1), abs=1e-12)


def test_decay_shapes_and_cosine():
    for decay_type in ("linear", "cosine", "1-sqrt"):
        train = TrainConfig(max_steps=100, warmup_steps=10, decay_steps=20, decay_type=decay_type, min_lr_ratio=0.1)
        assert lr_multiplier(0, train) == pytest.approx(0.1)
        assert lr_multiplier(10, train) == lr_multiplier(79, train) == 1.0
        assert lr_multiplier(90, train) < 1.0 and lr_multiplier(100, train) == pytest.approx(0.1)
    cosine = TrainConfig(scheduler="cosine", max_steps=110, warmup_steps=10, min_lr_ratio=0.0)
    assert lr_multiplier(60, cosine) == pytest.approx(0.5)
    assert lr_multiplier(110, cosine) == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(lr_multiplier(5, cosine), 0.5)


def test_impossible_schedule_is_rejected():
    with pytest.raises(ConfigError, match="fit in train.max_steps"):
        check_schedule(TrainConfig(max_steps=10, warmup_steps=6, decay_steps=6))
    with pytest.raises(ConfigError, match="decay_type"):
        check_schedule(TrainConfig(decay_type="exp"))


def test_freeze_dense_steps_beyond_max_steps_names_both_keys():
    with pytest.raises(ConfigError, match=r"train.freeze_dense_steps \(10\) is not less than train.max_steps \(8\)"):
        check_schedule(TrainConfig(max_steps=8, freeze_dense_steps=10))


def test_freeze_dense_steps_as_long_as_the_run_is_refused():
    """A freeze over every step (with no warmup or decay to fit after it) would end the run with the dense
    weights never trained: refused like a longer one."""
    with pytest.raises(ConfigError, match=r"train.freeze_dense_steps \(8\) is not less than train.max_steps \(8\)"):
        check_schedule(TrainConfig(max_steps=8, warmup_steps=0, decay_steps=0, freeze_dense_steps=8))


def test_freeze_dense_steps_with_cosine_counts_its_warmup_only():
    """Cosine decays over everything after the warmup: only the warmup must fit after the freeze."""
    check_schedule(TrainConfig(max_steps=8, scheduler="cosine", warmup_steps=5, freeze_dense_steps=3))
    with pytest.raises(ConfigError, match="freeze_dense_steps"):
        check_schedule(TrainConfig(max_steps=8, scheduler="cosine", warmup_steps=6, freeze_dense_steps=3))


@pytest.mark.parametrize("setting", [{"decay_steps": 4}, {"decay_type": "1-sqrt"}])
def test_wsd_settings_under_cosine_are_refused(setting):
    """Cosine decays over every step after the warmup, as a cosine: it ignored train.decay_steps and
    train.decay_type without a word (a run asked for a 1-sqrt decay over its last 4 steps got neither)."""
    (key, value), = setting.items()
    with pytest.raises(ConfigError, match=rf"train.{key} = {value!r} applies to the wsd scheduler only; train.scheduler "
                                          rf"= 'cosine' decays over all steps after the warmup, as a cosine. Remove "
                                          rf"train.{key} \(or set train.scheduler=wsd\)."):
        check_schedule(TrainConfig(max_steps=8, scheduler="cosine", warmup_steps=2, **setting))
    check_schedule(TrainConfig(max_steps=8, scheduler="wsd", warmup_steps=2, **setting))


def test_a_resume_takes_its_adamw_settings_from_this_run():
    """Loading a checkpoint restores the optimizer groups' settings as saved (DeepSpeed and torch load
    them with the state): a resume or run.init_optimizer with another train.weight_decay, adam_beta1/2
    or adam_eps trained with the old ones, while config.yaml showed the new. Like the lr, this run's win."""
    import dataclasses

    from doge_dist.config import ModelConfig
    from doge_dist.model import build_model
    from doge_dist.train.optim import build_optimizer
    from doge_dist.train.schedule import reapply_optimizer_settings

    model = build_model(ModelConfig.from_preset("doge-tiny"))
    saved = TrainConfig(max_steps=10, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    resumed = dataclasses.replace(saved, weight_decay=0.02, adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-6)
    state = build_optimizer(model, saved, None).state_dict()
    optimizer = build_optimizer(model, resumed, None)
    scheduler = build_scheduler(optimizer, resumed)
    optimizer.load_state_dict(state)  # as engine.load_checkpoint does
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    reapply_optimizer_settings(scheduler, resumed)
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in optimizer.param_groups] == [(0.02, (0.8, 0.99), 1e-6),
                                                                                          (0.0, (0.8, 0.99), 1e-6)]


@pytest.mark.parametrize("max_steps, warns", [(12, True), (7, False)])
def test_a_resume_whose_schedule_raises_the_lr_after_its_decay_warns(max_steps, warns):
    """A run decayed to step 7 (of 7) resumed with train.max_steps 12 moves its decay past step 7: the lr
    jumps back to the peak with no warmup (Megatron-LM refuses a changed schedule); said, with the way to
    a re-warmup. The same schedule resumes without a word."""
    import dataclasses
    import warnings

    from doge_dist.train.schedule import lr_multipliers, reapply_optimizer_settings, warn_if_lr_jumps

    saved = TrainConfig(lr=1.0, max_steps=7, warmup_steps=2, decay_steps=2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, saved)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()  # at step 6, in the decay (lr 0.5)
    resumed = dataclasses.replace(saved, max_steps=max_steps)
    scheduler = build_scheduler(optimizer, resumed)
    scheduler.load_state_dict(state)
    optimizer.param_groups[0]["lr"] = state["_last_lr"][0]  # as the optimizer's own state restores it
    before = lr_multipliers(scheduler)
    reapply_optimizer_settings(scheduler, resumed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_lr_jumps(before, scheduler, resumed, 6)
    assert before == [pytest.approx(0.5)]
    assert [("a jump with no warmup" in str(w.message)) for w in caught] == ([True] if warns else [])
