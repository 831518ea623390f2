"""Rotary position embeddings (half-rotation / NeoX style), plain or dynamic-NTK scaled, in fp32."""
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions.

    Dynamic NTK (the published models' ``rope_scaling``) leaves the frequencies untouched up to
    ``max_position_embeddings`` and grows the base beyond it, from the longest position seen in
    this call (stateless, unlike transformers' cached growth; identical for a single forward).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.max_positions = config.max_position_embeddings
        self.dynamic_factor = (config.rope_scaling or {}).get("factor") if config.rope_type == "dynamic" else None
        self.register_buffer("inv_freq", self._inv_freq(self.base), persistent=False)

    def _inv_freq(self, base: float, device: Optional[torch.device] = None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (base**exponents)

    def frequencies(self, seq_len: int, device: torch.device) -> torch.Tensor:
        if self.dynamic_factor is None or seq_len <= self.max_positions:
            return self.inv_freq.to(device)
        factor = self.dynamic_factor
        base = self.base * ((factor * seq_len / self.max_positions) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return self._inv_freq(base, device)

    def forward(self, position_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` [B or 1, T]; ``seq_len`` = largest position + 1. Returns fp32 cos, sin [B, T, d]."""
        inv_freq = self.frequencies(seq_len, position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, d] by cos/sin [B, T, d] (cast to x's dtype, like the reference)."""
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    return x * cos + rotate_half(x) * sin
