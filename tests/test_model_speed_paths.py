"""The fast paths equal the reference paths: the chunked LM loss equals ``token_loss_sum`` on full
logits (value and gradients), and the bias-as-key-channel attention equals the explicit DMA mask."""
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from doge_dist.config import ModelConfig
from doge_dist.model import IGNORE_INDEX, build_model, shift_labels, token_loss_sum
from doge_dist.model.cache import KVCache
from doge_dist.model import loss as loss_module
from doge_dist.model.loss import chunked_token_loss_sum
from doge_dist.model.masks import AttentionLayout
from model_helpers import perturb_all, randomise_dynamic_mask, unique_tokens, use_backend


def _loss_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 20, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (3, 20), generator=generator)
    labels[1, 12:] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, None])
def test_chunked_loss_equals_token_loss_sum_in_value_and_gradient(chunk_tokens, compiled):
    hidden, weight, labels = _loss_inputs()
    reference, reference_count = token_loss_sum(hidden @ weight.T, labels)
    (reference / reference_count).backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    total, count = chunked_token_loss_sum(hidden, weight, labels, chunk_tokens, compiled=compiled)
    (total / count).backward()
    if compiled:  # the softmax went through dynamo: a frame of loss.py was compiled
        assert counters["frames"]["ok"] > 0 and loss_module._compile.cache_info().currsize == 1
    assert count == reference_count
    assert torch.allclose(total, reference, rtol=1e-6, atol=1e-5)
    assert torch.allclose(hidden.grad, expected[0], atol=1e-6)
    assert torch.allclose(weight.grad, expected[1], atol=1e-6)
    assert hidden.grad[1, 12:].abs().max() == 0  # ignored tokens get no gradient


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunked_loss_under_bf16_autocast_matches_the_autocast_reference(compiled):
    hidden, weight, labels = _loss_inputs(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, _ = token_loss_sum(torch.nn.functional.linear(hidden, weight), labels)
        total, _ = chunked_token_loss_sum(hidden, weight, labels, chunk_tokens=8, compiled=compiled)
    grads = torch.autograd.grad(total, (hidden, weight))
    expected = torch.autograd.grad(reference, (hidden, weight))
    assert grads[0].dtype == hidden.dtype and grads[1].dtype == weight.dtype
    assert torch.allclose(total, reference, rtol=1e-5)
    for got, want in zip(grads, expected):
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunked_loss_weight_gradient_in_groups_of_chunks(monkeypatch, compiled):
    """On CPU the weight gradient is one product per group of chunks: groups of two 7-row chunks,
    the last one ragged, added in fp32, give the reference gradients; a returned gradient does not
    share the workspace that the next call overwrites."""
    monkeypatch.setattr(loss_module, "CPU_WEIGHT_GRAD_BYTES", 2 * 7 * 50 * 4)
    assert loss_module.weight_grad_group_tokens(7, 50, torch.float32, "cpu") == 14
    assert loss_module.weight_grad_group_tokens(7, 50, torch.bfloat16, "cpu") == 28
    assert loss_module.weight_grad_group_tokens(7, 50, torch.float32, "cuda") == 7
    hidden, weight, labels = _loss_inputs()
    assert (labels != IGNORE_INDEX).sum() == 50  # groups of 14, 14, 14 and 8 rows
    reference, reference_count = token_loss_sum(hidden @ weight.T, labels)
    expected = torch.autograd.grad(reference / reference_count, (hidden, weight))

    total, count = chunked_token_loss_sum(hidden, weight, labels, chunk_tokens=7, compiled=compiled)
    grads = torch.autograd.grad(total / count, (hidden, weight))
    assert torch.allclose(total, reference, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-6)
    again, _ = chunked_token_loss_sum(hidden * 2, weight, labels, chunk_tokens=7, compiled=compiled)
    torch.autograd.grad(again, (hidden, weight))
    assert torch.allclose(grads[1], expected[1], atol=1e-6)


def test_chunked_loss_without_grad_and_a_second_backward_refused():
    hidden, weight, labels = _loss_inputs()
    with torch.no_grad():
        total, _ = chunked_token_loss_sum(hidden, weight, labels)
    assert torch.allclose(total, token_loss_sum(hidden @ weight.T, labels)[0].detach(), rtol=1e-6)
    total, _ = chunked_token_loss_sum(hidden, weight, labels)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        total.backward()


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny", **overrides))
    randomise_dynamic_mask(model)
    perturb_all(model)
    return model


CASES = {"gqa": {}, "v1 per-query-head bias": {"attention_variant": "v1"}, "mha": {"num_key_value_heads": 4}}


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_bias_as_key_channel_equals_the_explicit_mask_with_gradients(case, padded):
    """``sdpa`` (bias folded into q/k) against ``eager`` (the reference's [B, nh, T, S] mask)."""
    model = _model(**CASES[case]).train()
    ids = unique_tokens(2, 24, 512)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 17:] = 0
    labels = shift_labels(ids, mask)
    results = {}
    for backend in ("eager", "sdpa"):
        use_backend(model, backend)
        model.zero_grad()
        logits = model(ids, attention_mask=mask if padded else None).logits
        total, count = token_loss_sum(logits, labels)
        (total / count).backward()
        results[backend] = logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    real = mask.bool()
    assert (results["eager"][0] - results["sdpa"][0])[real].abs().max() <= 1e-5
    for name, grad in results["eager"][1].items():
        assert (grad - results["sdpa"][1][name]).abs().max() <= 1e-5 * grad.abs().max().clamp(min=1e-6), name


@pytest.mark.parametrize("past", [0, 5])
def test_cpu_attention_query_blocks_skip_a_quarter_of_the_scores(past):
    """Two causal query blocks: the same output and gradients as one block, from 3/4 of the score
    and value products (the first half of the queries never meets the second half of the keys)."""
    attention = _model().model.layers[0].self_attn
    generator = torch.Generator().manual_seed(3)
    B, heads, kv_heads, T, d = 2, 4, 2, 12, 9
    q = torch.randn(B, heads, T, d, generator=generator, requires_grad=True)
    k = torch.randn(B, kv_heads, past + T, d, generator=generator, requires_grad=True)
    v = torch.randn(B, kv_heads, past + T, d, generator=generator, requires_grad=True)
    layout = AttentionLayout(torch.arange(past, past + T), past + T)
    mask = layout.additive_mask(torch.float32)
    results = []
    for blocks in (1, 2):
        with FlopCounterMode(display=False) as flops:
            out = attention._grouped_matmul_attention(q, k, v, mask, 0.0, query_blocks=blocks)
        results.append((flops.get_total_flops(), out, torch.autograd.grad(out.square().sum(), (q, k, v))))
    (full_flops, full, full_grads), (block_flops, blocked, block_grads) = results
    per_score = 2 * B * heads * 2 * d  # q.k and p.v multiply-adds per (query, key) pair
    assert full_flops == per_score * T * (past + T)
    assert block_flops == per_score * (T // 2) * (2 * past + T // 2 + T)
    assert torch.allclose(blocked, full, atol=1e-6)
    for got, want in zip(block_grads, full_grads):
        assert torch.allclose(got, want, atol=1e-5)


def test_left_padded_rows_keep_one_query_block():
    """A left-padded row's first queries see no key; their uniform weights span all keys, as in one
    block, so with key padding the CPU attention does not split the queries."""
    model = _model().eval()
    ids = unique_tokens(2, 16, 512)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        blocked = model(ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.self_attn.CPU_CAUSAL_QUERY_BLOCKS = 1
        single = model(ids, attention_mask=mask).logits
    assert torch.equal(blocked, single)


def test_bias_as_key_channel_cached_decode_and_chunked_prefill():
    model = _model().eval()
    ids = unique_tokens(2, 20, 512)
    with torch.no_grad():
        use_backend(model, "eager")
        full = model(ids).logits
        use_backend(model, "sdpa")
        cache = KVCache()
        steps = [model(ids[:, :5], cache=cache).logits, model(ids[:, 5:9], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(9, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_masks_are_built_once_per_forward_and_shared_by_layers():
    layout = AttentionLayout(torch.arange(6), 6, torch.tensor([[1, 1, 1, 1, 0, 0]]).bool())
    mask, causal = layout.sdpa_mask(torch.float32)
    assert not causal and mask is layout.sdpa_mask(torch.float32)[0] and mask.shape == (1, 1, 6, 6)
    assert mask[0, 0, 5, 4] == torch.finfo(torch.float32).min and mask[0, 0, 3, 3] == 0
    assert AttentionLayout(torch.arange(6), 6).sdpa_mask(torch.float32) == (None, True)
    assert AttentionLayout(torch.arange(5, 6), 6).sdpa_mask(torch.float32) == (None, False)


def test_bf16_autocast_training_step_runs_the_fast_paths_close_to_eager():
    model = _model().train()
    ids = unique_tokens(2, 24, 512)
    labels = shift_labels(ids)
    losses = {}
    for backend in ("eager", "sdpa"):
        use_backend(model, backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(ids, compute_logits=False).hidden_states
            total, count = chunked_token_loss_sum(hidden, model.lm_head.weight, labels)
        (total / count).backward()
        losses[backend] = (total / count).item()
    assert abs(losses["eager"] - losses["sdpa"]) <= 2e-2 * abs(losses["eager"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the compiled loss kernel is Triton on a GPU")
def test_cuda_compiled_loss_matches_the_eager_chunks_under_bf16_autocast():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 300, 64, generator=generator).cuda().requires_grad_()
    weight = (torch.randn(1000, 64, generator=generator) * 0.1).cuda().requires_grad_()
    labels = torch.randint(0, 1000, (4, 300), generator=generator).cuda()
    labels[2, 100:] = IGNORE_INDEX
    results = []
    for compiled in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, count = chunked_token_loss_sum(hidden, weight, labels, chunk_tokens=256, compiled=compiled)
        results.append((total.detach(), *torch.autograd.grad(total / count, (hidden, weight))))
    (eager_loss, *eager_grads), (compiled_loss, *compiled_grads) = results
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()
