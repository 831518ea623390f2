"""Weight-decay groups, the fused optimizer and the stage-0 fp32 optimizer's non-finite guard."""
import math

import torch

from doge_dist.config import ModelConfig, TrainConfig
from doge_dist.model import build_model
from doge_dist.train.optim import SkipNonFiniteAdamW, build_optimizer, decayed_parameter_names


def test_matrices_grouping_skips_norms_residuals_and_a():
    model = build_model(ModelConfig.from_preset("doge-tiny"))
    decayed = decayed_parameter_names(model, "matrices")
    assert "model.embed_tokens.weight" in decayed and "model.layers.0.self_attn.q_proj.weight" in decayed
    for name in ("model.norm.weight", "model.layers.0.input_residual", "model.layers.0.self_attn.A",
                 "model.layers.0.self_attn.q_norm.weight", "model.layers.0.input_layernorm.weight"):
        assert name not in decayed


def test_original_grouping_decays_everything_but_biases():
    """transformers < 4.50 Trainer: get_parameter_names(model, [nn.LayerNorm]) minus "bias"; our RMSNorm
    is no nn.LayerNorm, so its weights were decayed."""
    model = build_model(ModelConfig.from_preset("doge-tiny", attention_bias=True))
    names = {name for name, _ in model.named_parameters()}
    decayed = decayed_parameter_names(model, "original")
    assert decayed == {n for n in names if "bias" not in n}
    assert "model.norm.weight" in decayed and "model.layers.0.self_attn.A" in decayed


def test_non_finite_gradients_skip_the_step_and_clip_reports_the_pre_clip_norm():
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = SkipNonFiniteAdamW([param], max_grad_norm=1.0, lr=0.1)
    param.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    optimizer.step()
    assert optimizer.overflow and torch.equal(param.detach(), torch.ones(4))
    param.grad = torch.full((4,), 3.0)
    optimizer.step()
    assert not optimizer.overflow and math.isclose(optimizer._global_grad_norm, 6.0, rel_tol=1e-6)
    assert torch.allclose(param.grad, torch.full((4,), 0.5), atol=1e-5)


def test_the_optimizer_is_fused_on_cpu_too():
    """The per-tensor AdamW loop costs a pass per operation over every tensor; the fused kernel one."""
    model = build_model(ModelConfig.from_preset("doge-tiny"))
    for clip in (None, 1.0):  # DeepSpeed's client optimizer, and the stage-0 fp32 one that clips itself
        optimizer = build_optimizer(model, TrainConfig(), stage0_fp32_clip=clip)
        assert optimizer.defaults["fused"] is True


def test_the_dense_freeze_lasts_as_many_applied_steps_as_the_schedule_holds_it():
    """The frozen groups' schedule holds lr 0 for train.freeze_dense_steps applied steps (DeepSpeed does
    not step it for a step skipped as non-finite): the gradient hooks stay as long, or the inherited
    weights' AdamW would count a step at lr 0 with real gradients after a skipped one."""
    from doge_dist.config import ModelConfig, TrainConfig
    from doge_dist.model import build_model
    from doge_dist.train.optim import DenseFreeze, build_optimizer
    from doge_dist.train.schedule import build_scheduler

    model = build_model(ModelConfig.from_preset("doge-tiny-moe"))
    train = TrainConfig(max_steps=10, warmup_steps=0, decay_steps=0, freeze_dense_steps=2)
    scheduler = build_scheduler(build_optimizer(model, train, None), train)
    freeze = DenseFreeze(model, scheduler, train)
    hooks = len(freeze.handles)
    for applied in (True, False, True):  # the second step is skipped: no scheduler step
        if applied:
            scheduler.optimizer.step()
            scheduler.step()
        freeze.release()
        assert freeze.lr() == (0.0 if scheduler.last_epoch < 2 else train.lr)
        assert len(freeze.handles) == (hooks if scheduler.last_epoch < 2 else 0), scheduler.last_epoch
