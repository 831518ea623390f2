"""Parameter counts and training FLOPs per token, the basis of MFU.

Training FLOPs per token = 6 x (weights each token multiplies with in a matrix product) + attention
scores: 12 x layers x heads x head_dim x sequence length for QK^T and PV, forward and backward, over the
whole causal square, as the PaLM paper's appendix B, torchtitan and nanoGPT count them (and as the
eager and SDPA kernels compute them). Megatron-LM's ``num_floating_point_operations`` counts half the
square for causal attention, 6 x layers x heads x head_dim x sequence length: for the same run its
TFLOP/s and MFU are lower by that term, 14% for doge-320m and 20% for doge-20m at sequence 2048.
The convention is the same for every model bench.py compares, so its ratios are ratios of tokens/s.
The forward that activation checkpointing recomputes is not counted (the model's FLOPs, not the
hardware's, as PaLM's MFU and Megatron-LM count them): checkpointed runs read a lower MFU for the same work.
"""
from ..config import ModelConfig


def _bias_heads(c: ModelConfig) -> int:
    return c.num_attention_heads if c.attention_variant == "v1" else c.num_key_value_heads


def _attention_matrices(c: ModelConfig) -> int:
    """The weights of q, k, v, dt_proj and o: the attention's matrix products."""
    q = c.hidden_size * c.num_attention_heads * c.head_dim
    kv = 2 * c.hidden_size * c.num_key_value_heads * c.head_dim
    dt = c.num_key_value_heads * c.head_dim * _bias_heads(c)
    o = c.num_attention_heads * c.head_dim * c.hidden_size
    return q + kv + dt + o


def _attention_params(c: ModelConfig) -> int:
    bias_heads = _bias_heads(c)
    biases = 0
    if c.attention_bias:
        biases = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + bias_heads + c.hidden_size
    norms = 2 * c.head_dim if c.attention_variant == "v2" else 0
    return _attention_matrices(c) + biases + bias_heads + norms  # bias_heads: the A of each bias head


def _mlp_params(c: ModelConfig) -> int:
    dense = 3 * c.hidden_size * c.intermediate_size + (2 * c.intermediate_size + c.hidden_size if c.mlp_bias else 0)
    if not c.is_moe:
        return dense
    return dense + c.hidden_size * 2 * c.num_keys + 2 * c.num_experts * c.hidden_size


def parameter_count(c: ModelConfig) -> int:
    """Exact number of parameters of ``build_model(c)`` (tied embeddings counted once)."""
    per_layer = _attention_params(c) + _mlp_params(c) + 4 * c.hidden_size  # two norms, two residual scales
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_hidden_layers * per_layer + embeddings + c.hidden_size


def matmul_weights_per_token(c: ModelConfig) -> int:
    """Weights one token multiplies with in a forward pass's matrix products (routed experts: only its
    k rows); biases, norms, A and residual scales are element-wise work, as Megatron-LM counts them."""
    attention = _attention_matrices(c)
    mlp = 3 * c.hidden_size * c.intermediate_size
    if c.is_moe:
        mlp += c.hidden_size * 2 * c.num_keys + 2 * c.num_experts_per_tok * c.hidden_size
    return c.num_hidden_layers * (attention + mlp) + c.vocab_size * c.hidden_size


def training_flops_per_token(c: ModelConfig, seq_length: int) -> float:
    """Forward + backward FLOPs per trained token at ``seq_length``."""
    attention_scores = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_length
    return 6 * matmul_weights_per_token(c) + attention_scores


def training_flops(c: ModelConfig, sequence_lengths: list[int]) -> float:
    """Forward + backward FLOPs of training on sequences of these (real, unpadded) lengths, each
    token's attention at the length of its own sequence."""
    return float(sum(n * training_flops_per_token(c, n) for n in sequence_lengths))
