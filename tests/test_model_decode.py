"""The decode step (``model.decode.Decoder``) equals the model's own cached forward, one new token at
a time: fp32 logits within 1e-5 for every attention variant, GQA, MoE, biases, a keep window that
the cache outgrows, dynamic NTK past the trained length and batch 2; bf16 autocast logits within
bf16 rounding; its prepared weights follow every change of the parameters."""
import pytest
import torch

from doge_dist.config import ModelConfig
from doge_dist.model import build_model
from doge_dist.model.cache import KVCache
from doge_dist.model.decode import Decoder
from doge_dist.model.generate import generate
from model_helpers import perturb_all, randomise_dynamic_mask

CASES = {
    "v2_gqa": {},
    "v1": {"attention_variant": "v1", "num_key_value_heads": 4},
    "moe": {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 4},
    "biases": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    "keep_window": {"keep_window_size": 8},
    "dynamic_ntk": {"max_position_embeddings": 12, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
}


def _model(overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny", **overrides)).eval()
    randomise_dynamic_mask(model)
    perturb_all(model)
    return model


def _both_ways(model, prompt, tokens, autocast: bool):
    """(decoder logits, model logits) for each token fed after the prompt."""
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        cache, reference_cache = KVCache(), KVCache()
        model(prompt, cache=cache)
        model(prompt, cache=reference_cache)
        decoder = Decoder(model, cache, prompt.shape[1] + tokens.shape[1])
        ours = [decoder.step(tokens[:, i]).float() for i in range(tokens.shape[1])]
        reference = [model(tokens[:, i : i + 1], cache=reference_cache).logits[:, -1].float() for i in range(tokens.shape[1])]
    return torch.stack(ours), torch.stack(reference)


@pytest.mark.parametrize("case", CASES)
def test_decode_step_equals_the_cached_forward_fp32(case):
    model = _model(CASES[case])
    generator = torch.Generator().manual_seed(1)
    prompt, tokens = torch.randint(3, 512, (2, 6), generator=generator), torch.randint(3, 512, (2, 10), generator=generator)
    ours, reference = _both_ways(model, prompt, tokens, autocast=False)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_decode_step_under_bf16_autocast_matches_within_bf16_rounding():
    model = _model({})
    generator = torch.Generator().manual_seed(2)
    prompt, tokens = torch.randint(3, 512, (1, 6), generator=generator), torch.randint(3, 512, (1, 10), generator=generator)
    ours, reference = _both_ways(model, prompt, tokens, autocast=True)
    assert (ours - reference).abs().max() <= 2e-2 * reference.abs().max()


def test_prepared_weights_follow_parameter_changes():
    model = _model({})
    prompt = torch.randint(3, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    before = generate(model, prompt, 6, temperature=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # in place, as an optimizer step: the greedy choice changes
    after = generate(model, prompt, 6, temperature=0)
    with torch.no_grad():
        expected = model(after[:, :-1]).logits.argmax(-1)[:, prompt.shape[1] - 1 :]
    assert not torch.equal(before, after)
    assert torch.equal(after[:, prompt.shape[1] :], expected)


def test_model_stays_copyable_and_picklable_after_generate(tmp_path):
    import copy

    model = _model({})
    generate(model, torch.tensor([[5, 6, 7]]), 3, temperature=0)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    assert torch.equal(generate(twin, torch.tensor([[5, 6, 7]]), 3, temperature=0),
                       generate(model, torch.tensor([[5, 6, 7]]), 3, temperature=0))


def test_generated_tokens_can_feed_a_training_step():
    """Generation runs in inference mode, but what it returns is an ordinary tensor: a training step on
    generated samples (self-training, preference pairs) can save it for the backward."""
    model = _model({})
    sample = generate(model, torch.tensor([[5, 6, 7]]), 4, temperature=0)
    assert not sample.is_inference()
    model.train()
    total, count = model.loss_sum(model(sample).logits, sample)
    (total / count).backward()
    assert model.model.embed_tokens.weight.grad is not None
