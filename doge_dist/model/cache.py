"""Key/value cache for generation. Doge's dynamic bias depends only on each key's value vector,
so the cache keeps the bias next to K and V instead of recomputing it over the whole prefix."""
from typing import Optional

import torch


class KVCache:
    def __init__(self) -> None:
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []

    @property
    def length(self) -> int:
        """Number of cached positions (0 before the first forward)."""
        return self.layers[0][0].shape[-2] if self.layers and self.layers[0] is not None else 0

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append this step's key/value [B, nkv, T, d] and bias [B, nb, T]; return the full ones."""
        while len(self.layers) <= layer_idx:
            self.layers.append(None)
        past = self.layers[layer_idx]
        if past is not None:
            key = torch.cat([past[0], key], dim=-2)
            value = torch.cat([past[1], value], dim=-2)
            bias = torch.cat([past[2], bias], dim=-1)
        self.layers[layer_idx] = (key, value, bias)
        return key, value, bias
