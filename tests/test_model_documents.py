"""Packed documents (``document_ids``, ``data.reset_attention_mask``): with positions reset per
document, a row that packs several documents gives each of them exactly the logits and gradients it
gets alone, in every attention backend, with a keep window and with CDMoE. The oracle is the same
model run on each document separately."""
import pytest
import torch

from doge_dist.config import ModelConfig
from doge_dist.model import build_model, shift_labels
from doge_dist.train.data import document_ids
from model_helpers import perturb_all, randomise_dynamic_mask, unique_tokens, use_backend

LENGTHS = (9, 4, 7)  # three documents in one row


def _model(preset, **overrides):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset(preset, **overrides)).eval()
    randomise_dynamic_mask(model)
    perturb_all(model)
    return model


def _packed():
    ids = unique_tokens(1, sum(LENGTHS), 512, seed=5)
    documents = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])[None]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return ids, documents, positions


CASES = {"dense": ("doge-tiny", {}), "keep-window": ("doge-tiny", {"keep_window_size": 5}),
         "moe": ("doge-tiny-moe", {}), "v1": ("doge-tiny", {"attention_variant": "v1"})}


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_documents_give_the_logits_of_separate_documents(backend, case):
    preset, overrides = CASES[case]
    model = _model(preset, **overrides)
    use_backend(model, backend)
    ids, documents, positions = _packed()
    with torch.no_grad():
        packed = model(ids, position_ids=positions, document_ids=documents).logits
        alone = torch.cat([model(part).logits for part in ids.split(LENGTHS, dim=1)], dim=1)
        crossing = model(ids, position_ids=positions).logits
    assert (packed - alone).abs().max() <= 1e-5
    assert (crossing - alone)[:, LENGTHS[0]:].abs().max() > 1e-4  # without document_ids attention crosses


def test_packed_documents_give_the_gradients_of_separate_documents():
    model = _model("doge-tiny", keep_window_size=5)
    ids, documents, positions = _packed()
    grads = []
    for pieces in ([(ids, positions, documents)], [(part, None, None) for part in ids.split(LENGTHS, dim=1)]):
        model.zero_grad()
        for part, pos, docs in pieces:
            labels = shift_labels(part)
            if docs is not None:  # the last token of a document does not predict the next one
                labels[:, torch.tensor(LENGTHS).cumsum(0)[:-1] - 1] = -100
            total, _ = model.loss_sum(model(part, position_ids=pos, document_ids=docs).logits, labels)
            total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[1].items():
        assert (grads[0][name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp(min=1e-6), name


def test_document_ids_follow_megatron_reset_attention_mask():
    """A document ends with its end-of-document token: the tokens after an EOD start a new one."""
    eod = 1
    ids = torch.tensor([[5, 6, eod, 7, eod, eod, 8], [eod, 9, 9, 9, 9, 9, 9]])
    assert document_ids(ids, eod).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_document_ids_are_refused_with_a_cache():
    from doge_dist.model.cache import KVCache

    model = _model("doge-tiny")
    ids, documents, _ = _packed()
    with pytest.raises(ValueError, match="document_ids"):
        model(ids, document_ids=documents, cache=KVCache())
