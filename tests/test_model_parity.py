"""Our Doge equals transformers' DogeForCausalLM (eager, fp32): logits, loss and every gradient."""
import pytest
import torch

from doge_dist.config import ModelConfig
from doge_dist.model import shift_labels, token_loss_sum
from model_helpers import model_pair, unique_tokens, use_backend

CASES = {
    "doge-20m shape": ("doge-20m", {}),
    "gqa g=2": ("doge-tiny", {}),
    "untied embeddings": ("doge-tiny", {"tie_word_embeddings": False}),
    "v1": ("doge-tiny", {"attention_variant": "v1", "num_key_value_heads": 4}),
    "moe hf_compat": ("doge-tiny-moe", {"router_layout": "hf_compat", "balance_loss": "hf_compat"}),
    "keep window < T": ("doge-tiny", {"keep_window_size": 7}),
    "head_dim != hidden / heads": ("doge-tiny", {"head_dim": 8, "num_key_value_heads": 1}),
    "dynamic rope beyond max positions": (
        "doge-tiny",
        {"max_position_embeddings": 8, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
    ),
    "rope_theta and rms_norm_eps not the defaults": ("doge-tiny", {"rope_theta": 500.0, "rms_norm_eps": 1e-3}),
}


def _loss(ours_logits, ids, mask):
    total, count = token_loss_sum(ours_logits, shift_labels(ids, mask))
    return total / count


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [None, "right", "left"], ids=["full", "right-padded", "left-padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_loss_match_transformers(case, padded, backend):
    preset, overrides = CASES[case]
    config = ModelConfig.from_preset(preset, **overrides)
    ours, hf = model_pair(config, variant_v1=config.attention_variant == "v1")
    use_backend(ours, backend)
    ids = unique_tokens(2, 24, config.vocab_size)
    mask = torch.ones_like(ids)
    padding = slice(17, None) if padded == "right" else slice(None, 7)
    if padded:
        mask[1, padding] = 0
        ids[1, padding] = config.pad_token_id
    attention_mask = mask if padded else None
    ours.eval()
    with torch.no_grad():
        out = ours(ids, attention_mask=attention_mask)
        ref = hf(ids, attention_mask=attention_mask, labels=ids.masked_fill(mask == 0, -100),
                 output_router_logits=config.is_moe)
    real = mask.bool()
    assert (out.logits - ref.logits)[real].abs().max().item() <= 1e-5
    assert abs(_loss(out.logits, ids, mask).item() - (ref.loss - (config.router_aux_loss_coef * ref.aux_loss if config.is_moe else 0)).item()) <= 1e-5
    if config.is_moe:
        assert abs(out.balance_loss.item() - ref.aux_loss.item()) <= 1e-6


def test_keep_window_and_dynamic_rope_cases_are_exercised():
    """The two special cases above must actually change the function, or their parity proves nothing."""
    ids = unique_tokens(1, 24, 512)
    for preset, overrides in (CASES["keep window < T"], CASES["dynamic rope beyond max positions"]):
        special, _ = model_pair(ModelConfig.from_preset(preset, **overrides))
        plain_overrides = {k: v for k, v in overrides.items() if k not in ("keep_window_size", "rope_scaling")}
        plain, _ = model_pair(ModelConfig.from_preset(preset, **plain_overrides))
        with torch.no_grad():
            assert (special(ids).logits - plain(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("case", ["gqa g=2", "untied embeddings", "moe hf_compat", "keep window < T", "v1",
                                  "head_dim != hidden / heads"])
def test_every_gradient_matches_transformers(case, padding):
    """Left padding leaves the first queries of a row no visible key; their rows' gradient must not
    reach the keys' bias (the last padding position's prediction of the first token is in the loss)."""
    preset, overrides = CASES[case]
    config = ModelConfig.from_preset(preset, **overrides)
    ours, hf = model_pair(config, variant_v1=config.attention_variant == "v1")
    use_backend(ours, "sdpa")
    ids = unique_tokens(2, 20, config.vocab_size, seed=1)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, 15:] = 0
    else:
        mask[0, :5] = 0
        ids[0, :5] = config.pad_token_id
    ours.train()
    hf.train()
    out = ours(ids, attention_mask=mask)
    loss = _loss(out.logits, ids, mask)
    if config.is_moe:
        loss = loss + config.router_aux_loss_coef * out.balance_loss
    loss.backward()
    ref = hf(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), output_router_logits=config.is_moe)
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, param in ours.named_parameters():
        expected = hf_params[name].grad
        scale = expected.abs().max().clamp(min=1e-6)
        assert (param.grad - expected).abs().max() / scale <= 1e-4, name
        checked += 1
    assert checked == len(hf_params)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_padding_row_starts_at_zero_as_in_transformers(tied):
    """init_weights zeroed the padding row, then the tied LM head drew the same tensor again (every preset
    ties): the row started at norm 0.16, where transformers' DogeForCausalLM starts it at 0."""
    from transformers import DogeForCausalLM

    from doge_dist.convert.hf import to_hf_config
    from doge_dist.model import build_model

    config = ModelConfig.from_preset("doge-tiny", tie_word_embeddings=tied)
    ours, hf = build_model(config), DogeForCausalLM(to_hf_config(config))
    for model in (ours, hf):
        embedding = model.model.embed_tokens.weight
        assert torch.equal(embedding[config.pad_token_id], torch.zeros(config.hidden_size))
        assert embedding.std().item() == pytest.approx(config.initializer_range, rel=0.05)
        assert (model.lm_head.weight is embedding) == tied
