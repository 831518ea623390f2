"""Dynamic Mask Attention (DMA).

Each key gets a learned importance ``bias = exp(A * softplus(dt_proj(V)))`` that is added to the
attention scores of every query that may see it; with more keys than ``keep_window_size`` each
query keeps only the keys with the largest bias. "v2" (transformers) has one bias per key/value
head and RMS-normalised q/k; "v1" (small-doge's file) has one bias per query head and no q/k norm.

Backends: ``eager`` (explicit softmax, the reference's arithmetic), ``sdpa`` (CPU default: a float
mask [B, nh, T, S]), ``flex`` (CUDA default: the bias enters as a ``score_mod`` and causality,
padding and the keep window as a block mask, so no [B, nh, T, S] tensor exists) and ``flash``
(flash-attn's kernel on the folded q/k, flash.py; opt-in with the ``[gpu]`` extra; for CUDA tensors
only: elsewhere, e.g. a flash-trained checkpoint generating on CPU, ``flash`` computes as ``auto``).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .gpu_extra import runs_gpu_kernel
from .masks import AttentionLayout, dynamic_mask, keep_window_threshold
from .norm import RMSNorm
from .precision import compute_dtype
from .rope import apply_rotary


def resolve_backend(name: str, device: torch.device, cached: bool = False, dropout: float = 0.0) -> str:
    """auto: FlexAttention on CUDA, SDPA elsewhere and wherever attention dropout is on (FlexAttention
    has none; an explicit ``flex`` with dropout is refused by ModelConfig). With a KV cache
    (generation) flex becomes SDPA: the compiled flex kernel and block mask are specialised to one
    key length and would recompile at every new token. flash-attn computes CUDA tensors only:
    ``flash`` elsewhere is ``auto``."""
    if name == "flash" and not runs_gpu_kernel(device):
        name = "auto"
    if name == "auto":
        name = "flex" if device.type == "cuda" and not dropout else "sdpa"
    if name == "flex" and cached:
        return "sdpa"
    return name


class DynamicMaskAttention(nn.Module):
    CPU_CAUSAL_QUERY_BLOCKS = 2  # the CPU attention's query blocks (_grouped_matmul_attention)

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.keep_window_size = config.keep_window_size
        self.dropout = config.attention_dropout
        self.backend = config.attn_backend
        self.per_query_head_bias = config.attention_variant == "v1"
        bias_heads = self.num_heads if self.per_query_head_bias else self.num_kv_heads
        kv_width = self.num_kv_heads * self.head_dim

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.A = nn.Parameter(torch.zeros(bias_heads))
        self.dt_proj = nn.Linear(kv_width, bias_heads, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        if config.attention_variant == "v2":
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def key_bias(self, value: torch.Tensor) -> torch.Tensor:
        """The per-key importance [B, nb, S] from values [B, nkv, S, d]."""
        B, _, S, _ = value.shape
        dt = self.dt_proj(value.transpose(1, 2).reshape(B, S, -1))
        return torch.exp(self.A * F.softplus(dt)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: AttentionLayout,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        B, T = q.shape[:2]  # T can exceed x's length: sequence-parallel projections gather the sequence
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), *rope), apply_rotary(k.transpose(1, 2), *rope)
        bias = self.key_bias(v)
        if cache is not None:
            k, v, bias = cache.update(self.layer_idx, k, v, bias)

        dropout = self.dropout if self.training else 0.0
        backend = resolve_backend(self.backend, x.device, cached=cache is not None, dropout=dropout)
        if backend == "flex":
            out = self._flex(q, k, v, bias, layout)
        elif backend in ("sdpa", "flash") and k.shape[-2] <= self.keep_window_size:
            out = self._sdpa_bias_as_key_channel(q, k, v, bias, layout, dropout, flash=backend == "flash")
        else:
            mask = dynamic_mask(bias, layout.allowed, self.keep_window_size, q.dtype)
            if not self.per_query_head_bias:
                mask = mask.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            attend = self._eager if backend == "eager" else self._sdpa
            out = attend(q, k, v, mask, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _sdpa_bias_as_key_channel(self, q, k, v, bias, layout: AttentionLayout, dropout, flash: bool) -> torch.Tensor:
        """DMA without a keep window as plain attention: ``scale * q.k_j + bias_j`` equals
        ``[scale * q, 1] . [k_j, bias_j]``, so the per-key bias rides along as one more key channel.

        No mask carries the bias, so none needs a gradient: causality is ``is_causal`` or a mask
        built once per batch and shared by all layers, and SDPA keeps its fused kernels (forward
        and backward). On CPU, where PyTorch's fused kernel is several times slower than two
        matmuls at training lengths, the same folded q and k go through explicit grouped matmuls.
        """
        if bias.shape[1] != k.shape[1]:  # v1: one bias per query head, so one key per query head
            groups = bias.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        device_type = q.device.type
        if device_type == "cpu":  # folded in the layout the matmuls read, so inductor writes it with vector stores
            q = q.contiguous()
        bias_weight = layout.bias_weight(q.dtype)
        bias_weight = torch.ones_like(q[..., :1]) if bias_weight is None else bias_weight.expand_as(q[..., :1])
        q = torch.cat([q * self.scaling, bias_weight], dim=-1)
        k = torch.cat([k, bias[..., None].to(k.dtype)], dim=-1)
        dtype = compute_dtype(q)
        mask, causal = layout.sdpa_mask(dtype)
        flash = flash and layout.key_valid is None and layout.documents is None
        if device_type == "cpu" and not flash:
            query_blocks = self.CPU_CAUSAL_QUERY_BLOCKS if layout.key_valid is None else 1
            return self._grouped_matmul_attention(q, k, v, layout.additive_mask(dtype) if causal else mask, dropout,
                                                  query_blocks)
        pad = -q.shape[-1] % 8  # fused kernels (SDPA's, flash-attn's) want a head size that is a multiple of 8
        q, k, v = F.pad(q, (0, pad)), F.pad(k, (0, pad)), F.pad(v, (0, q.shape[-1] + pad - v.shape[-1]))
        if flash:
            from .flash import flash_dma

            out = flash_dma(q, k, v, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, scale=1.0, enable_gqa=True
            )
        return out[..., : self.head_dim]

    def _grouped_matmul_attention(self, q, k, v, mask: Optional[torch.Tensor], dropout: float,
                                  query_blocks: int = 1) -> torch.Tensor:
        """softmax(q k^T + mask) v with the g query heads of a key/value head stacked as one
        [g * T] block, so keys and values are never repeated; q and k are already scaled/folded.

        ``query_blocks`` > 1 splits the queries into blocks of positions, each against the keys up
        to its last position only. Attention is causal, so the scores skipped are ones the mask
        sends to exactly zero: with two blocks a quarter of the scores is never computed. The
        caller asks for blocks only without key padding, where every query row sees some key (a
        fully masked row would spread its uniform weights over fewer keys).
        """
        B, heads, T, d = q.shape
        kv_heads, S = k.shape[1], k.shape[2]
        groups, past = heads // kv_heads, S - T
        q = q.view(B, kv_heads, groups, T, d)
        query_blocks = min(query_blocks, T)
        outputs = []
        for block in range(query_blocks):
            start, stop = block * T // query_blocks, (block + 1) * T // query_blocks
            keys = past + stop
            scores = torch.matmul(q[:, :, :, start:stop].reshape(B, kv_heads, -1, d), k[:, :, :keys].transpose(2, 3))
            scores = scores.view(B, kv_heads, groups, stop - start, keys)
            if mask is not None:
                scores = scores + mask[:, :, None, start:stop, :keys]
            probs = F.dropout(F.softmax(scores.flatten(2, 3), dim=-1), p=dropout, training=self.training)
            outputs.append(torch.matmul(probs, v[:, :, :keys]).view(B, kv_heads, groups, stop - start, -1))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=3)
        return out.view(B, heads, T, -1)

    def _sdpa(self, q, k, v, mask, dropout) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout, scale=self.scaling, enable_gqa=True
        )

    def _eager(self, q, k, v, mask, dropout) -> torch.Tensor:
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=self.training)
        return torch.matmul(probs, v)

    def _flex(self, q, k, v, bias, layout: AttentionLayout) -> torch.Tensor:
        from .flex import flex_dma

        threshold = None
        if k.shape[-2] > self.keep_window_size:
            threshold = keep_window_threshold(bias, layout.allowed, self.keep_window_size)
        head_to_bias = 1 if self.per_query_head_bias else self.num_heads // self.num_kv_heads
        return flex_dma(q, k, v, bias, layout, self.scaling, head_to_bias, threshold)
