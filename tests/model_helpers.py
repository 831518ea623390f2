"""Shared builders for the model tests: our model and transformers' eager Doge with equal weights."""
import torch
from torch import nn

from doge_dist.config import ModelConfig
from doge_dist.convert.hf import to_hf_config
from doge_dist.model import build_model


def randomise_dynamic_mask(model: nn.Module, seed: int = 0) -> None:
    """A away from zero, so the per-key biases differ and the keep-window top-k has no ties (defect 4)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(".A"):
            with torch.no_grad():
                signs = torch.randint(0, 2, param.shape, generator=generator) * 2 - 1
                param.copy_(signs * (1 + torch.rand(param.shape, generator=generator)))


def perturb_all(model: nn.Module, seed: int = 0) -> None:
    """Move every parameter off its initial value (norms, residual scales, embeddings...)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def unique_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids without repeats, so no two keys of layer 0 share a value vector (and a bias)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab - 3, generator=generator)[: batch * length].view(batch, length) + 3


def use_backend(model: nn.Module, backend: str) -> None:
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend


def model_pair(config: ModelConfig, seed: int = 0, variant_v1: bool = False):
    """(ours, transformers' DogeForCausalLM in eager fp32) with identical weights."""
    from transformers import DogeForCausalLM

    torch.manual_seed(seed)
    ours = build_model(config)
    randomise_dynamic_mask(ours, seed)
    perturb_all(ours, seed)
    hf_config = to_hf_config(config.__class__(**{**config.to_dict(), "attention_variant": "v2"}))
    hf_config._attn_implementation = "eager"
    hf = DogeForCausalLM(hf_config)
    if variant_v1:
        # small-doge's v1 with one key/value head per query head: transformers' math without q/k norms
        for layer in hf.model.layers:
            layer.self_attn.q_norm = nn.Identity()
            layer.self_attn.k_norm = nn.Identity()
    hf.load_state_dict(ours.state_dict(), strict=True)
    return ours, hf.eval()
