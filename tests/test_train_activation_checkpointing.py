"""Activation checkpointing recomputes each decoder layer in the backward: same loss and gradients,
unchanged parameter names (so checkpoints do not depend on it)."""
import copy

import torch

from doge_dist.config import ModelConfig
from doge_dist.model import build_model, shift_labels
from doge_dist.train.engine import enable_activation_checkpointing
from model_helpers import perturb_all, unique_tokens


def test_checkpointed_layers_give_the_same_loss_and_gradients():
    model = build_model(ModelConfig.from_preset("doge-tiny-moe"))
    perturb_all(model)
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed)
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in model.named_parameters()]
    ids = unique_tokens(2, 16, 512)
    losses = []
    for m in (model, checkpointed):
        out = m(ids)
        total, count = m.loss_sum(out.logits, shift_labels(ids))
        loss = total / count + 0.01 * out.balance_loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
