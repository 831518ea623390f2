"""Upcycling a dense Doge to CDMoE keeps the dense function exactly at step 0."""
import pytest
import torch

from doge_dist.config import ConfigError, ModelConfig
from doge_dist.convert.upcycle import is_new_moe_parameter, upcycle
from doge_dist.model import build_model
from model_helpers import perturb_all, unique_tokens


def test_upcycled_logits_equal_dense_logits_exactly():
    dense = build_model(ModelConfig.from_preset("doge-tiny"))
    perturb_all(dense)
    moe = upcycle(dense, ModelConfig.from_preset("doge-tiny-moe"))
    ids = unique_tokens(2, 16, 512)
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, dense(ids).logits)
    new = [n for n, _ in moe.named_parameters() if is_new_moe_parameter(n)]
    assert len(new) == 3 * 2  # router, down_embed, up_embed in both layers


def test_shape_mismatch_is_named():
    dense = build_model(ModelConfig.from_preset("doge-tiny"))
    with pytest.raises(ConfigError, match="model.hidden_size differs"):
        upcycle(dense, ModelConfig.from_preset("doge-tiny-moe", hidden_size=128))
    with pytest.raises(ConfigError, match="not a MoE config"):
        upcycle(dense, ModelConfig.from_preset("doge-tiny"))
