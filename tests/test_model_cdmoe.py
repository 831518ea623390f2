"""CDMoE: the router switch is real, top-k over product keys is exact, balance losses are right."""
import torch
import torch.nn.functional as F

from doge_dist.config import ModelConfig
from doge_dist.model.cdmoe import CDMoE, Routing, balance_loss


def _layer(router_layout: str, seed: int = 0) -> CDMoE:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("doge-tiny-moe", router_layout=router_layout, num_experts=64, num_experts_per_tok=6)
    layer = CDMoE(config)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_router_layouts_agree_for_one_token_and_differ_for_a_batch():
    split, compat = _layer("split"), _layer("hf_compat")
    compat.load_state_dict(split.state_dict())
    one = torch.randn(1, 1, 64)
    assert torch.equal(split(one)[0], compat(one)[0])
    batch = torch.randn(2, 5, 64)
    assert (split(batch)[0] - compat(batch)[0]).abs().max() > 1e-3


def test_product_key_topk_is_the_exact_topk_over_all_experts():
    layer = _layer("split")
    x = torch.randn(3, 7, 64)
    scores, ids, routing = layer.route(x)
    all_scores = (routing.logits_x[:, :, None] + routing.logits_y[:, None, :]).reshape(21, -1)
    exact_scores, exact_ids = all_scores.topk(layer.top_k, dim=-1)
    assert torch.allclose(scores, exact_scores)
    assert torch.equal(ids, exact_ids)


def test_split_routing_uses_only_each_tokens_own_logits():
    layer = _layer("split")
    x = torch.randn(1, 6, 64)
    alone = layer(x[:, 2:3])[0]
    together = layer(x)[0][:, 2:3]
    assert torch.allclose(alone, together, rtol=1e-5, atol=1e-5)


def test_per_expert_balance_loss_equals_a_direct_computation():
    torch.manual_seed(0)
    nk, k, N, E = 4, 3, 10, 16
    routings = []
    direct = []
    for _ in range(2):  # two layers, each with its own experts
        lx, ly = torch.randn(N, nk), torch.randn(N, nk)
        scores = (lx[:, :, None] + ly[:, None, :]).reshape(N, E)  # expert id i * nk + j
        ids = scores.topk(k, dim=-1).indices
        routings.append(Routing(lx, ly, ids))
        fraction = torch.bincount(ids.reshape(-1), minlength=E).float() / (N * k)
        prob = F.softmax(scores, dim=-1).mean(0)
        direct.append(E * (fraction * prob).sum())
    assert torch.allclose(balance_loss(routings, E, "per_expert"), torch.stack(direct).mean(), atol=1e-6)
    pooled = balance_loss(routings, E, "hf_compat")
    assert not torch.allclose(pooled, torch.stack(direct).mean())


def test_balance_loss_ignores_padding_tokens():
    torch.manual_seed(0)
    lx, ly = torch.randn(6, 4), torch.randn(6, 4)
    ids = (lx[:, :, None] + ly[:, None, :]).reshape(6, 16).topk(2, dim=-1).indices
    mask = torch.tensor([1, 1, 1, 1, 0, 0])
    masked = balance_loss([Routing(lx, ly, ids)], 16, "per_expert", mask)
    kept = balance_loss([Routing(lx[:4], ly[:4], ids[:4])], 16, "per_expert")
    assert torch.allclose(masked, kept, atol=1e-6)
