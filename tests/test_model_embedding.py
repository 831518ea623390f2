"""TokenEmbedding gives nn.Embedding's gradients bit for bit, from a buffer kept across steps on CPU,
and never overwrites a gradient that something still holds."""
import pytest
import torch
from torch import nn

from doge_dist.config import ModelConfig
from doge_dist.model import build_model, shift_labels
from doge_dist.model import embedding as embedding_module
from doge_dist.model.embedding import TokenEmbedding
from doge_dist.model.loss import chunked_token_loss_sum

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


def test_tied_model_adds_its_embedding_gradient_from_one_kept_buffer():
    model = build_model(ModelConfig.from_preset("doge-tiny"))
    assert isinstance(model.model.embed_tokens, TokenEmbedding) and model.config.tie_word_embeddings
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    kept = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        total, count = chunked_token_loss_sum(model(ids, compute_logits=False).hidden_states, model.lm_head.weight,
                                              shift_labels(ids))
        (total / count).backward()
        buffer = embedding_module._kept_buffers[(tuple(model.lm_head.weight.shape), torch.float32)]
        kept.append(buffer.data_ptr())
        assert model.lm_head.weight.grad.data_ptr() != buffer.data_ptr()  # added into the LM head's gradient
    assert kept[0] == kept[1] == kept[2]  # no new [vocab, hidden] buffer after the first step


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
