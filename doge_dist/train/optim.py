"""AdamW with weight-decay parameter groups.

Two groupings (``train.decay_groups``):

- ``matrices`` (default): decay only parameters with two or more dimensions (linear weights and the
  embedding). Norm weights, biases and the 1-D Doge parameters (residual scales, ``A``) are not
  decayed, since pulling a gain or a residual scale towards 0 fights the function it computes.
- ``original``: what the small-doge recipes got from the Hugging Face Trainer of their time
  (transformers < 4.50): ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` without names
  containing "bias". ``ALL_LAYERNORM_LAYERS`` was ``[nn.LayerNorm]`` and Doge's RMSNorm is not an
  ``nn.LayerNorm``, so everything except biases was decayed, RMSNorm weights included. (transformers
  >= 4.50 also excludes names matching layernorm/rmsnorm/norm/_norm; that is not what the original got.)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..convert.upcycle import is_new_moe_parameter
from ..config import ConfigError, TrainConfig

DECAY_GROUPS = ("matrices", "original")


def decayed_parameter_names(model: nn.Module, grouping: str) -> set[str]:
    names = dict(model.named_parameters())
    if grouping == "matrices":
        return {name for name, param in names.items() if param.ndim >= 2}
    if grouping == "original":
        layer_norm_params = {
            f"{module_name}.{param_name}".lstrip(".")
            for module_name, module in model.named_modules()
            if isinstance(module, nn.LayerNorm)
            for param_name, _ in module.named_parameters(recurse=False)
        }
        return {name for name in names if name not in layer_norm_params and "bias" not in name}
    raise ConfigError(f"train.decay_groups = {grouping!r} is not one of {', '.join(DECAY_GROUPS)}.")


def parameter_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """AdamW groups, decayed and not, in ``named_parameters`` order (tied weights once). With
    ``train.freeze_dense_steps`` the parameters an upcycled MoE model inherited from its dense
    model get their own groups, marked ``frozen_until`` (their schedule holds lr 0 until then, and
    ``DenseFreeze`` keeps their gradients at zero)."""
    decayed = decayed_parameter_names(model, train.decay_groups)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    frozen = {name for name, _ in params if not is_new_moe_parameter(name)} if train.freeze_dense_steps else set()
    groups = []
    for names, extra in ((set(n for n, _ in params) - frozen, {}), (frozen, {"frozen_until": train.freeze_dense_steps})):
        groups += [
            {"params": [p for n, p in params if n in names and n in decayed], "weight_decay": train.weight_decay,
             "decayed": True, **extra},
            {"params": [p for n, p in params if n in names and n not in decayed], "weight_decay": 0.0, "decayed": False, **extra},
        ]
    return [group for group in groups if group["params"]]


class DenseFreeze:
    """Zero gradients for the inherited dense parameters while ``train.freeze_dense_steps`` lasts.

    small-doge's MoE warm-up (``DogeWarmupCallback``) sets ``requires_grad=False`` on everything but the
    new router/expert tables, so the frozen weights have no gradient: none in the clipping norm (which
    would otherwise shrink the new tables' updates) and none in AdamW's moments. DeepSpeed's ZeRO lays
    out its gradient partitions once, so requires_grad cannot change mid-run; written by hand instead:
    a tensor hook on each frozen parameter replaces its gradient by zeros before the engine accumulates,
    reduces or clips it. The weights themselves stay as they are through their lr-0 schedule groups
    (schedule.py); the hooks are removed once the freeze is over (``release``).

    AdamW still counts its steps on the frozen groups (their gradients are zeros, not None), and its
    bias correction reads that count: left at N, the first update after the freeze would be
    (1 - beta1) / sqrt(1 - beta2) = 3.2x a fresh AdamW's (beta2 0.95). small-doge restarts training
    after its warm-up, so the released weights start from a fresh AdamW: a step post-hook on
    ``optimizer`` puts the frozen groups' counts back to 0 after each step of the freeze (their
    moments stay zero). ``scheduler`` is the run's, on the client optimizer: ZeRO 1-3 step that on the
    same group dicts, holding their flat fp32 partitions (ZeRO-3 one sub-group at a time). The freeze
    counts the applied steps, as the schedule that holds the groups at lr 0 does (its ``last_epoch``;
    DeepSpeed does not step it for a step skipped as non-finite).
    """

    def __init__(self, model: nn.Module, scheduler: torch.optim.lr_scheduler.LRScheduler, train: TrainConfig) -> None:
        self.until = train.freeze_dense_steps
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer
        self.handles = []
        if scheduler.last_epoch < self.until:
            self.handles = [param.register_hook(torch.zeros_like) for name, param in model.named_parameters()
                            if param.requires_grad and not is_new_moe_parameter(name)]
            self.handles.append(self.optimizer.register_step_post_hook(self._count_no_step))

    def lr(self) -> float | None:
        """The inherited weights' learning rate (None without a freeze): 0 during it, then their own schedule."""
        return next((group["lr"] for group in self.optimizer.param_groups if group.get("frozen_until")), None)

    @staticmethod
    def _count_no_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            if group.get("frozen_until"):
                for param in group["params"]:
                    if "step" in optimizer.state.get(param, {}):
                        optimizer.state[param]["step"].zero_()

    def release(self) -> None:
        """After each step: from the end of the freeze on, every gradient flows."""
        if self.scheduler.last_epoch >= self.until:
            for handle in self.handles:
                handle.remove()
            self.handles = []


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that clips, and skips a step whose gradients are not finite, reporting it as ``overflow``.

    Written by hand because DeepSpeed checks for non-finite gradients in its ZeRO and bf16 optimizers
    (a skipped step shows as ``engine.was_step_applied() == False``) but calls a plain fp32 client
    optimizer directly at ZeRO stage 0, after clipping without keeping the norm. For that one case the
    engine glue moves clipping here (DeepSpeed's ``gradient_clipping`` set to 0), so it has the same
    contract and reports the pre-clip norm as ``_global_grad_norm`` as the other optimizers do.
    Gradients are already all-reduced over data parallel at stage 0; under model parallelism the norm
    is summed over the ``mpu``'s model-parallel group by DeepSpeed's rules (``model_parallel_grad_norm``).
    """

    def __init__(self, params, max_grad_norm: float = 0.0, mpu=None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.mpu = mpu
        self.overflow = False
        self._global_grad_norm = 0.0

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        self._global_grad_norm = model_parallel_grad_norm(params, self.mpu)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.max_grad_norm > 0 and self._global_grad_norm > self.max_grad_norm:
            torch._foreach_mul_(grads, self.max_grad_norm / (self._global_grad_norm + 1e-6))
        return super().step(closure)


def model_parallel_grad_norm(params: list[nn.Parameter], mpu=None) -> float:
    """The global L2 norm of ``params``' gradients as DeepSpeed's ZeRO and bf16 optimizers count it:
    a tensor marked model-parallel on every rank of the mpu's model-parallel group, any other tensor on
    that group's rank 0 only, never one flagged ``ds_pipe_replicated``; squares summed over the group."""
    from deepspeed.runtime.utils import get_global_norm_of_tensors, is_model_parallel_parameter

    rank = mpu.get_model_parallel_rank() if mpu is not None else 0
    counted = [p.grad for p in params
               if not getattr(p, "ds_pipe_replicated", False) and (rank == 0 or is_model_parallel_parameter(p))]
    if not counted:
        counted = [torch.zeros(1, device=params[0].device if params else None)]
    norm = get_global_norm_of_tensors(counted, mpu=mpu).item()
    return norm if norm >= 0 else float("inf")  # DeepSpeed marks a non-finite norm as -1


def build_optimizer(model: nn.Module, train: TrainConfig, stage0_fp32_clip: float | None, mpu=None) -> torch.optim.Optimizer:
    """AdamW, fused on CUDA and on CPU (on CPU about 6x faster than the per-tensor loop: 8.5 -> 1.4 ms
    per step for 4.4M parameters on two threads). ``stage0_fp32_clip`` is not None exactly when
    DeepSpeed will call the optimizer directly (ZeRO 0 in fp32): then the optimizer clips and guards
    by itself (see above)."""
    groups = parameter_groups(model, train)
    kwargs = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    if next(model.parameters()).device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    if stage0_fp32_clip is not None:
        return SkipNonFiniteAdamW(groups, max_grad_norm=stage0_fp32_clip, mpu=mpu, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
