"""DMA behaviour: causality in every backend, cached decode, flex equals sdpa, the keep window."""
import pytest
import torch

from doge_dist.config import ModelConfig
from doge_dist.model import build_model, shift_labels, token_loss_sum
from doge_dist.model.cache import KVCache
from doge_dist.model.masks import AttentionLayout, dynamic_mask, keep_window_threshold
from model_helpers import perturb_all, randomise_dynamic_mask, unique_tokens, use_backend


def _model(preset="doge-tiny", **overrides):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset(preset, **overrides)).eval()
    randomise_dynamic_mask(model)
    perturb_all(model)
    return model


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("preset", ["doge-tiny", "doge-tiny-moe"])
def test_changing_a_token_leaves_earlier_logits_unchanged(backend, preset):
    model = _model(preset, keep_window_size=6)
    use_backend(model, backend)
    ids = unique_tokens(2, 16, 512)
    changed = ids.clone()
    t = 9
    changed[:, t] = 500
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :t], after[:, :t]) or (before[:, :t] - after[:, :t]).abs().max() < 1e-6
    assert (before[:, t:] - after[:, t:]).abs().max() > 1e-4


def test_generation_with_the_flex_backend_runs_sdpa(monkeypatch):
    """A KV cache takes flex to SDPA: the compiled flex kernel is specialised to one key length and
    would recompile at every new token (the H100 decode bench timed out). Same logits as flex."""
    from doge_dist.model import flex

    model = _model(keep_window_size=10)
    use_backend(model, "flex")
    ids = unique_tokens(2, 14, 512)
    with torch.no_grad():
        full = model(ids).logits
        monkeypatch.setattr(flex, "flex_dma", lambda *args, **kwargs: pytest.fail("flex with a KV cache"))
        cache = KVCache()
        steps = [model(ids[:, :6], cache=cache).logits]
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 14)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_attention_dropout_never_goes_to_flex_which_has_none():
    """FlexAttention takes no dropout: on CUDA 'auto' trained with attention_dropout silently off.
    'auto' picks SDPA while dropout is on (training), and an explicit 'flex' with dropout is refused."""
    from doge_dist.config import ConfigError
    from doge_dist.model.attention import resolve_backend

    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda) == "flex" and resolve_backend("auto", cuda, dropout=0.1) == "sdpa"
    assert resolve_backend("auto", torch.device("cpu"), dropout=0.1) == "sdpa"
    with pytest.raises(ConfigError, match="model.attn_backend = 'flex' has no attention dropout"):
        ModelConfig.from_preset("doge-tiny", attn_backend="flex", attention_dropout=0.1)


def test_reference_router_reshape_leaks_future_tokens():
    """The hf_compat layout mixes tokens (defect 2): a later token changes earlier logits."""
    model = _model("doge-tiny-moe", router_layout="hf_compat")
    ids = unique_tokens(1, 16, 512)
    changed = ids.clone()
    changed[:, 12] = 500
    with torch.no_grad():
        assert (model(ids).logits[:, :12] - model(changed).logits[:, :12]).abs().max() > 1e-6


@pytest.mark.parametrize("preset", ["doge-tiny", "doge-tiny-moe"])
def test_cached_decode_equals_full_forward(preset):
    model = _model(preset, keep_window_size=10)  # decode runs past the keep window
    ids = unique_tokens(2, 20, 512)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache()
        steps = [model(ids[:, :6], cache=cache).logits]
        for t in range(6, 20):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.length == 20
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_cached_decode_with_padding_mask():
    model = _model()
    ids = unique_tokens(2, 12, 512)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        full = model(ids[:, :8], attention_mask=mask[:, :8]).logits
        cache = KVCache()
        first = model(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits
        rest = [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits for t in range(5, 8)]
    assert (torch.cat([first, *rest], dim=1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("overrides", [{}, {"keep_window_size": 7}, {"attention_variant": "v1"}], ids=["plain", "keep-window", "v1"])
def test_flex_forward_equals_sdpa(overrides):
    """FlexAttention has no CPU backward, but its forward runs here: bias as score_mod, block mask. At every
    position, padding included, and in the loss (shift_labels counts the last left-padding position, which
    predicts the first real token): a query that sees no key (left padding; padding that opens a packed
    document) is the reference's uniform average of the values, where FlexAttention alone gives 0 (the loss
    was 6.260 against transformers' 6.272)."""
    model = _model(**overrides)
    ids = unique_tokens(3, 24, 512)
    mask = torch.ones_like(ids)
    mask[1, 19:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    documents = (torch.arange(24) >= 10).long().expand(3, -1)  # row 2's second document opens with padding
    mask_in_document = mask.clone()
    mask_in_document[2, 10:13] = 0
    labels = shift_labels(ids, mask)
    out = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            use_backend(model, backend)
            out[backend] = model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask_in_document,
                                                                         document_ids=documents).logits
    for sdpa, flex in zip(out["sdpa"], out["flex"]):
        assert (sdpa - flex).abs().max() <= 1e-5
    losses = [token_loss_sum(out[backend][0], labels) for backend in ("sdpa", "flex")]
    assert losses[0][1] == losses[1][1] and losses[0][0] == pytest.approx(losses[1][0].item(), rel=1e-6)


@pytest.mark.parametrize("keep_window_size", [16, 2048])
def test_flex_gradients_of_rows_without_keys_equal_eager(keep_window_size, monkeypatch):
    """The backward of a left-padded batch through PyTorch's dense flex backward (the reference of its
    CUDA kernels; only the device check stops it on CPU): the rows that see no key have the reference's
    gradient. With the reference's huge score instead, the probabilities recomputed from the logsumexp
    were S times too large (gradients 100x off); with a score of 0 * score, q and k got none (0.5 off)."""
    import torch.nn.attention.flex_attention as flex_attention

    monkeypatch.setattr(flex_attention, "_validate_device", lambda *args, **kwargs: None)
    model = _model(keep_window_size=keep_window_size)
    ids = unique_tokens(2, 24, 512)
    mask = (torch.arange(24) >= torch.tensor([[0], [7]])).long()
    grads = {}
    for backend in ("eager", "flex"):
        use_backend(model, backend)
        model.zero_grad()
        model(ids, attention_mask=mask).logits.float().pow(2).mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads["eager"].items():
        assert (grad - grads["flex"][name]).abs().max() <= 1e-4 * grad.abs().max().clamp(min=1e-6), name


@pytest.fixture
def compiled_flex(monkeypatch):
    """flex.py's compiled flex_attention and create_block_mask afresh, for CPU tensors too (as for CUDA ones)."""
    from doge_dist.model import flex

    monkeypatch.setattr(flex, "COMPILED_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(flex, "_compiled", {})
    torch._dynamo.reset()
    yield flex
    torch._dynamo.reset()


def _compiled_graphs(function) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(function.__code__))


def test_compiled_flex_serves_every_length_after_the_second(compiled_flex):
    """Fine-tuning pads each micro-batch to its longest sample, so the length changes from one to the
    next. Compiled with dynamic=False, flex_attention compiled again at every new length, and past
    dynamo's recompile limit (8) ran its unfused path, which materialises the [B, H, T, S] scores. Sizes
    become dynamic at the second length: 12 lengths, two graphs each of flex_attention and
    create_block_mask, the logits of the eager backend."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    model = _model()
    for T in range(40, 52):
        ids = unique_tokens(2, T, 512, seed=T)
        logits = {}
        with torch.no_grad():
            for backend in ("flex", "eager"):
                use_backend(model, backend)
                logits[backend] = model(ids).logits
        assert (logits["flex"] - logits["eager"]).abs().max() <= 1e-5
    assert _compiled_graphs(flex_attention) == 2 and _compiled_graphs(create_block_mask) == 2


def test_compiled_flex_past_the_recompile_limit_is_an_error_not_the_unfused_path(compiled_flex):
    """Past the limit dynamo would run flex_attention uncompiled, materialising the [B, H, T, S] scores
    (an OOM or a many-fold slowdown, behind one warning): an error that names the cause instead."""
    model = _model()
    use_backend(model, "flex")
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        model(unique_tokens(2, 30, 512))
        with pytest.raises(RuntimeError, match=r"recompile_limit.*would materialise \[B, H, T, S\]"):
            model(unique_tokens(2, 31, 512))


def test_keep_window_block_mask_compiles_with_a_trainable_bias(compiled_flex, monkeypatch):
    """On CUDA the block mask is built by a compiled create_block_mask, which cannot trace a bias that
    records gradients (the H100 run failed there); compiled here on CPU, it gives the eager mask."""
    flex = compiled_flex
    bias = (torch.randn(2, 2, 40) * 3).requires_grad_()
    threshold = keep_window_threshold(bias.detach(), AttentionLayout(torch.arange(40), 40).allowed, 9)
    masks = []
    for compiled_on in ({"cuda"}, {"cuda", "cpu"}):
        monkeypatch.setattr(flex, "COMPILED_DEVICE_TYPES", compiled_on)
        layout = AttentionLayout(torch.arange(40), 40)
        block_mask = flex._block_mask(layout, 2, 4, 40, bias * 1.0, 2, threshold)
        masks.append(block_mask.to_dense())
    assert torch.equal(masks[0], masks[1])
    from torch.nn.attention.flex_attention import create_block_mask

    assert _compiled_graphs(create_block_mask) == 1


def test_keep_window_threshold_selects_the_same_keys_as_topk():
    torch.manual_seed(0)
    bias = torch.rand(2, 3, 40)
    layout = AttentionLayout(torch.arange(40), 40)
    kept_topk = dynamic_mask(bias, layout.allowed, 9, torch.float32) > torch.finfo(torch.float32).min
    threshold = keep_window_threshold(bias, layout.allowed, 9, chunk=16)
    kept_threshold = layout.allowed & (bias[:, :, None, :] >= threshold[..., None])
    assert torch.equal(kept_topk, kept_threshold)
    assert kept_topk.sum(-1).max() == 9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: flex_attention backward needs a GPU")
@pytest.mark.parametrize("compiled_layers", [False, True], ids=["flex-compiled", "layers-compiled"])
def test_cuda_flex_training_serves_every_length_after_the_second(compiled_flex, compiled_layers):
    """Fine-tuning's lengths change from one micro-batch to the next: the compiled flex kernels (alone, and
    inside train.compile's layers) with the keep window active, forward and backward, give the sdpa
    gradients and compile nothing after the second length (dynamic sizes; a recompile at every length ran
    into dynamo's limit and then the unfused [B, H, T, S] path)."""
    from torch._dynamo.utils import counters

    from doge_dist.model.compile import compile_model

    reference, model = _model(keep_window_size=16).cuda(), _model(keep_window_size=16).cuda()
    use_backend(reference, "sdpa")
    use_backend(model, "flex")
    if compiled_layers:
        compile_model(model)
    graphs = []
    for length in (24, 40, 56, 72):
        ids = unique_tokens(2, length, 512, seed=length).cuda()
        grads = []
        for each in (reference, model):
            each.zero_grad()
            each(ids).logits.float().pow(2).mean().backward()
            grads.append({n: p.grad.clone() for n, p in each.named_parameters()})
        for name, grad in grads[0].items():
            assert (grad - grads[1][name]).abs().max() <= 1e-4 * grad.abs().max().clamp(min=1e-6), name
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: flex_attention backward needs a GPU")
@pytest.mark.parametrize("layout", ["one-document", "packed-documents", "left-padded"])
def test_cuda_flex_training_step_matches_sdpa_gradients(layout):
    """Compiled flex kernels, forward and backward; left padding: the rows that see no key are the
    reference's uniform softmax, whose gradient reaches q and k (every position is in this loss), against
    the eager backend, whose softmax keeps its probabilities (a fused kernel recomputes them from the
    row's logsumexp)."""
    model = _model(keep_window_size=16).cuda()
    ids = unique_tokens(2, 48, 512).cuda()
    documents = (torch.arange(48, device="cuda") >= torch.tensor([[20], [33]], device="cuda")).long() \
        if layout == "packed-documents" else None
    mask = (torch.arange(48, device="cuda") >= torch.tensor([[0], [7]], device="cuda")).long() if layout == "left-padded" else None
    reference = "eager" if layout == "left-padded" else "sdpa"
    grads = {}
    for backend in (reference, "flex"):
        use_backend(model, backend)
        model.zero_grad()
        model(ids, attention_mask=mask, document_ids=documents).logits.float().pow(2).mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads[reference].items():
        assert (grad - grads["flex"][name]).abs().max() <= 1e-4 * grad.abs().max().clamp(min=1e-6), name
