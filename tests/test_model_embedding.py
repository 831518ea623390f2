"""TokenEmbedding gives nn.Embedding's gradients bit for bit, from a buffer kept across steps on CPU,
and never overwrites a gradient that something still holds."""
import copy

import pytest
import torch
from torch import nn

from doge_dist.config import ModelConfig
from doge_dist.model import build_model, shift_labels
from doge_dist.model.embedding import TokenEmbedding

VOCAB, HIDDEN, PAD = 50, 8, 0


def _pair():
    ours = TokenEmbedding(VOCAB, HIDDEN, padding_idx=PAD)
    reference = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def _ids(seed=0):
    ids = torch.randint(0, VOCAB, (4, 300), generator=torch.Generator().manual_seed(seed))
    ids[0, :5] = PAD  # the padding row must get no gradient
    ids[1, :7] = 3  # repeats add up in token order
    return ids


USES = {
    "alone": lambda embed, ids: (embed(ids).tanh() * 1.7).sum(),
    "tied LM head": lambda embed, ids: (embed(ids).tanh() @ embed.weight.T).square().sum(),
    "two calls, no head": lambda embed, ids: embed(ids).sin().sum() + (3 * embed(ids.flip(1))).cos().sum(),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("use", list(USES))
def test_gradient_equals_nn_embedding_bit_for_bit(use, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, reference = _pair()
        for step in range(2):  # the second step reuses the kept buffer
            for embed in (ours, reference):
                embed.weight.grad = None
                USES[use](embed, _ids(step)).backward()
            assert torch.equal(ours.weight.grad, reference.weight.grad)
            assert ours.weight.grad[PAD].abs().max() == 0
    finally:
        torch.set_num_threads(previous)


def _tied_models():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny"))
    reference = copy.deepcopy(model)
    reference.model.embed_tokens = nn.Embedding(*model.model.embed_tokens.weight.shape,
                                                padding_idx=model.config.pad_token_id)
    reference.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    reference.lm_head.weight = reference.model.embed_tokens.weight
    return model, reference


def _chunked_loss(model, ids):
    out = model(ids, compute_logits=False)
    total, count = model.hidden_loss_sum(out.hidden_states, shift_labels(ids), out.lm_head_weight)
    return total / count, out


def test_tied_model_gradient_is_nn_embeddings_and_stays_in_one_kept_buffer():
    model, reference = _tied_models()
    assert isinstance(model.model.embed_tokens, TokenEmbedding) and model.config.tie_word_embeddings
    addresses = []
    for step in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step))
        ids[0, :3] = model.config.pad_token_id
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
            loss, out = _chunked_loss(m, ids)
            loss.backward()
        assert (out.lm_head_weight is None) is (m is reference)  # nn.Embedding gives no alias
        for (name, param), want in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(param.grad, want.grad), name
        addresses.append(model.lm_head.weight.grad.data_ptr())
    assert addresses[1] == addresses[2]  # the tied gradient reuses its buffer: no new [vocab, hidden] block


def test_two_losses_before_one_backward_keep_their_own_buffers():
    model, reference = _tied_models()
    ids = [torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    for m in (model, reference):
        (_chunked_loss(m, ids[0])[0] + 2 * _chunked_loss(m, ids[1])[0]).backward()
    # the four [vocab, hidden] terms are summed in another order than autograd's: fp32 rounding apart
    got, want = model.lm_head.weight.grad, reference.lm_head.weight.grad
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_a_gradient_still_held_is_not_overwritten():
    ours, reference = _pair()
    held = []
    ours.weight.register_hook(held.append)  # keeps autograd's gradient, a view of the kept buffer
    ours(_ids(0)).sum().backward()
    first = held[0].clone()
    ours.weight.grad = None
    (2 * ours(_ids(1))).sum().backward()
    assert torch.equal(held[0], first)
    reference(_ids(1)).sum().backward()
    assert torch.equal(held[1], 2 * reference.weight.grad)


def test_other_dtypes_and_options_take_nn_embeddings_path():
    ids = _ids()
    assert type(TokenEmbedding(VOCAB, HIDDEN)(ids).grad_fn).__name__ == "_EmbeddingKeptGradientBackward"
    assert TokenEmbedding(VOCAB, HIDDEN, dtype=torch.bfloat16)(ids).grad_fn.name() == "EmbeddingBackward0"
    assert TokenEmbedding(VOCAB, HIDDEN, sparse=True)(ids).grad_fn.name() == "EmbeddingBackward0"
    with torch.no_grad():
        assert TokenEmbedding(VOCAB, HIDDEN)(ids).grad_fn is None
