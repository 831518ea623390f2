"""training_flops (the basis of MFU) against an independent count: torch's FlopCounterMode over one
forward and backward of the model with the eager attention backend, which computes every score of
the causal square (the convention flops.py documents), for dense, GQA, v1, biases, untied heads, a
keep window and CDMoE; and the difference to Megatron-LM's num_floating_point_operations, which
counts half of the causal square."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from doge_dist.config import ModelConfig
from doge_dist.model import build_model, shift_labels
from doge_dist.model.flops import training_flops, training_flops_per_token

SHAPES = {
    "dense": ("doge-tiny", {}),
    "untied": ("doge-tiny", {"tie_word_embeddings": False}),
    "mha": ("doge-tiny", {"num_key_value_heads": 4}),
    "v1": ("doge-tiny", {"attention_variant": "v1"}),
    "biases": ("doge-tiny", {"attention_bias": True, "mlp_bias": True}),
    "keep_window": ("doge-tiny", {"keep_window_size": 8}),
    "moe": ("doge-tiny-moe", {}),
}


def counted_training_flops(config: ModelConfig, batch: int, seq: int) -> int:
    """Matrix-product FLOPs of one training step's forward and backward (the optimizer has none)."""
    model = build_model(config)
    model.compute_balance_loss = lambda routings, token_mask: None  # a loss term, not the model's work per token
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        total, count = model.loss_sum(model(ids).logits, shift_labels(ids))
        (total / count).backward()
    flops = counter.get_total_flops()
    if config.is_moe:  # the k up_embed rows go through embedding_bag, which FlopCounterMode does not count:
        # k x H multiply-adds per token forward, twice that backward (rows' and gates' gradients)
        flops += 6 * config.num_experts_per_tok * config.hidden_size * config.num_hidden_layers * batch * seq
    return flops


@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_flops_equal_the_counted_matrix_products(shape):
    preset, overrides = SHAPES[shape]
    config = ModelConfig.from_preset(preset, attn_backend="eager", **overrides)
    batch, seq = 2, 24
    assert training_flops(config, [seq] * batch) == counted_training_flops(config, batch, seq)


def megatron_lm_flops_per_token(c: ModelConfig, seq: int) -> float:
    """Megatron-LM's transformer_flops (megatron/training/training.py) per token for Doge's shape: SwiGLU
    MLP, GQA, causal attention over half the square; plus Doge's dt_proj, router and tiny experts,
    which Megatron has no term for."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    bias_heads = c.num_attention_heads if c.attention_variant == "v1" else c.num_key_value_heads
    attention = c.hidden_size * (q + 2 * kv) + q * seq / 2 * 2 + q * c.hidden_size
    mlp = c.hidden_size * c.intermediate_size * 3
    doge = kv * bias_heads + (c.hidden_size * 2 * c.num_keys + 2 * c.num_experts_per_tok * c.hidden_size if c.is_moe else 0)
    return 3 * 2 * (c.num_hidden_layers * (attention + mlp + doge) + c.hidden_size * c.vocab_size)


@pytest.mark.parametrize("preset", ["doge-20m", "doge-320m", "doge-1.4b-moe"])
def test_causal_attention_counts_the_half_megatron_lm_leaves_out(preset):
    config = ModelConfig.from_preset(preset)
    seq = 2048
    causal_half = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq
    assert training_flops_per_token(config, seq) == megatron_lm_flops_per_token(config, seq) + causal_half
