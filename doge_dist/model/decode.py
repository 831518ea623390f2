"""One new token per sequence through the model, with as few operations as possible (generation).

At batch 1 a decode step of a small Doge is hundreds of tiny operations, and their dispatch cost,
not arithmetic, sets the speed. ``Decoder`` computes the layer math of ``doge.py`` for one new
position (same formulas, same roundings up to summation order) over weights prepared once and kept
until a parameter changes:

- q/k/v (and the MLP's gate/up) concatenated into one matrix each: one matrix-vector product
  instead of three (two); every weight already in the compute dtype (bf16 under autocast, so
  autocast casts nothing per step) and, on CPU, reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn``, what inductor's CPU weight freezing uses): at batch 1 a plain ``F.linear``
  re-packs the weight on every call, which took half of a step here;
- a preallocated cache filled in place; the per-key bias is stored as one more key channel
  (``scale * q.k_j + bias_j = [scale * q, 1] . [k_j, bias_j]``), so attention over the cache is
  one matmul, a softmax and one matmul;
- rotary tables built once per step for all layers, ``rotate_half`` as a flip of the two halves.

The prompt runs through the model's own forward; its cache seeds the buffers. With more cached keys
than ``keep_window_size`` the step applies DMA's keep window (the top keys by bias) as the model does.
Written by hand: neither transformers nor PyTorch has a decode step for dynamic-mask attention.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .cache import KVCache
from .cdmoe import CDMoE
from .doge import DecoderLayer, DogeForCausalLM
from .norm import RMSNorm, rms_norm
from .precision import compute_dtype


class Linear:
    """``F.linear`` over a weight prepared once: concatenated, in the compute dtype, and on CPU in
    oneDNN's blocked layout. The input is cast to the compute dtype, as autocast would."""

    def __init__(self, linears: list[torch.nn.Linear], dtype: torch.dtype) -> None:
        weight = torch.cat([linear.weight.detach().to(dtype) for linear in linears]) if len(linears) > 1 \
            else linears[0].weight.detach().to(dtype)
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([linear.bias.detach().to(dtype) for linear in linears]) if has_bias else None
        self.dtype = dtype
        self.packed = weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@dataclass
class LayerWeights:
    qkv: Linear
    qk_norm: Optional[torch.Tensor]  # v2: the q and k norm weights per head, [nh + nkv, 1, d]
    dt_proj: Linear
    o_proj: Linear
    gate_up: Optional[Linear]  # None for a CDMoE layer (its module runs as it is)
    down_proj: Optional[Linear]


_PREPARED: "weakref.WeakKeyDictionary[DogeForCausalLM, dict]" = weakref.WeakKeyDictionary()


def prepared_weights(model: DogeForCausalLM, dtype: torch.dtype) -> tuple[list[LayerWeights], Linear]:
    """The decode weights of ``model`` in ``dtype``, kept (beside the model, which stays copyable and
    picklable) until a parameter changes: an in-place update bumps its version counter, a replaced
    tensor has a new address."""
    state = tuple((p.data_ptr(), p._version) for p in model.parameters())
    kept = _PREPARED.get(model, {}).get(dtype)
    if kept is not None and kept[0] == state:
        return kept[1]
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        dense = not isinstance(mlp, CDMoE)
        qk_norm = None
        if attn.q_norm is not None:
            qk_norm = torch.cat([attn.q_norm.weight.detach().expand(attn.num_heads, 1, -1),
                                 attn.k_norm.weight.detach().expand(attn.num_kv_heads, 1, -1)])
        layers.append(LayerWeights(
            qkv=Linear([attn.q_proj, attn.k_proj, attn.v_proj], dtype),
            qk_norm=qk_norm,
            dt_proj=Linear([attn.dt_proj], dtype),
            o_proj=Linear([attn.o_proj], dtype),
            gate_up=Linear([mlp.gate_proj, mlp.up_proj], dtype) if dense else None,
            down_proj=Linear([mlp.down_proj], dtype) if dense else None,
        ))
    prepared = (layers, Linear([model.lm_head], dtype))
    _PREPARED.setdefault(model, {})[dtype] = (state, prepared)
    return prepared


def stream_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm of the fp32 residual stream through PyTorch's ``rms_norm`` (the same formula in
    fp32, fewer operations)."""
    return F.rms_norm(x, x.shape[-1:], norm.weight, norm.eps)


class Rope:
    """``apply_rotary`` at one position, tables cast once per dtype: ``rotate_half(x) * sin`` is the
    two halves swapped times (-sin, sin)."""

    def __init__(self, tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.tables = tables  # dtype -> (cos, signed sin) [1, 1, 1, d]; fp32 always present

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in self.tables:
            self.tables[x.dtype] = tuple(t.to(x.dtype) for t in self.tables[torch.float32])
        cos, sin = self.tables[x.dtype]
        swapped = x.view(*x.shape[:-1], 2, -1).flip(-2).view(x.shape)
        return x * cos + swapped * sin


def decode_ropes(model: DogeForCausalLM, start: int, end: int, dtype: torch.dtype) -> list[Rope]:
    """The rotation of each position in [start, end), computed together and cast to ``dtype`` once
    instead of once per step: the model's tables for a ``position + 1`` long sequence. Dynamic NTK
    grows the base beyond ``max_position_embeddings``, so positions there are computed one by one."""
    rotary = model.model.rotary_emb
    device = rotary.inv_freq.device
    plain_end = end if rotary.dynamic_factor is None else max(start, min(end, rotary.max_positions))
    parts = [rotary(torch.arange(start, plain_end, device=device)[None], plain_end)] if plain_end > start else []
    parts += [rotary(torch.tensor([[p]], device=device), p + 1) for p in range(plain_end, end)]
    cos, sin = (torch.cat([part[i] for part in parts], dim=1)[0] for i in (0, 1))  # [n, d]
    half = cos.shape[-1] // 2
    sin = sin * torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])
    casts = {torch.float32: (cos, sin)}
    casts.setdefault(dtype, (cos.to(dtype), sin.to(dtype)))
    return [Rope({t: (c[i].view(1, 1, 1, -1), s[i].view(1, 1, 1, -1)) for t, (c, s) in casts.items()})
            for i in range(end - start)]


class Decoder:
    """Decode steps of ``model`` after a prompt, up to ``max_length`` positions in all."""

    @staticmethod
    def supports(model: DogeForCausalLM) -> bool:
        """The single-device model only: tensor- and expert-parallel forms run their own forward."""
        return type(model) is DogeForCausalLM

    def __init__(self, model: DogeForCausalLM, cache: KVCache, max_length: int) -> None:
        self.model = model
        weight = next(model.parameters())
        dtype = compute_dtype(weight)
        self.dtype, self.device_type = dtype, weight.device.type
        self.autocast = torch.is_autocast_enabled(self.device_type)
        self.layers, self.lm_head = prepared_weights(model, dtype)
        self.length = cache.length
        self.keys, self.values = self._seed(cache, max_length)
        self.start = cache.length
        self.ropes = decode_ropes(model, self.start, max_length, dtype)
        self.query: Optional[torch.Tensor] = None

    def _seed(self, cache: KVCache, max_length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer: keys with the bias channel [B, nb, max_length, d + 1] and values [B, nb, max_length, d],
        one head per bias head (v1 repeats each key/value head for its query heads), holding the prompt.
        Stored in fp32 with the values the attention matmuls would see (rounded to the compute dtype)."""
        keys, values = [], []
        for key, value, bias in cache.layers:
            groups = bias.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            B, heads, S, d = key.shape
            k_buffer = key.new_zeros(B, heads, max_length, d + 1, dtype=torch.float32)
            k_buffer[:, :, :S] = torch.cat([key, bias[..., None].to(key.dtype)], dim=-1).to(self.dtype)
            v_buffer = value.new_zeros(B, heads, max_length, d, dtype=torch.float32)
            v_buffer[:, :, :S] = value.to(self.dtype)
            keys.append(k_buffer)
            values.append(v_buffer)
        return keys, values

    def _query(self, *shape: int) -> torch.Tensor:
        """The query buffer [B, heads, g, d + 1] in the compute dtype; its last channel, the bias
        channel's weight, stays 1."""
        if self.query is None or self.query.shape[:-1] != shape[:-1]:
            self.query = torch.ones(*shape[:-1], shape[-1] + 1, dtype=self.dtype, device=self.keys[0].device)
        return self.query

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [B] at the next position -> logits [B, V].

        Runs with autocast off and does its casts itself: linears take their input in the compute
        dtype (as autocast would); the two attention matmuls, the only other operations autocast
        changes here, multiply operands rounded to the compute dtype in fp32 and round the result,
        which is what a bf16 matmul with fp32 accumulation computes, at a fraction of the cost for
        these tiny shapes."""
        position = self.length
        if position >= self.keys[0].shape[2]:
            raise ValueError(f"The decoder was prepared for {self.keys[0].shape[2]} positions.")
        model = self.model.model
        with torch.autocast(self.device_type, enabled=False):
            x = model.embed_tokens(tokens[:, None])  # [B, 1, H]
            rope = self.ropes[position - self.start]  # broadcast over [B, heads, 1, d]
            for i, layer in enumerate(model.layers):
                x = self._layer(i, layer, x, rope)
            self.length += 1
            return self.lm_head(stream_norm(model.norm, x))[:, -1]

    def _layer(self, i: int, layer: DecoderLayer, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        attended = self._attention(i, layer, stream_norm(layer.input_layernorm, x), rope)
        x = torch.addcmul(attended, layer.input_residual, x)
        h = stream_norm(layer.post_attention_layernorm, x)
        weights = self.layers[i]
        if weights.gate_up is None:
            with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
                mixed, _ = layer.mlp(h)
        else:
            gate, up = weights.gate_up(h).chunk(2, dim=-1)
            mixed = weights.down_proj(F.silu(gate) * up)
        return torch.addcmul(mixed, layer.post_attention_residual, x)

    def _attention(self, i: int, layer: DecoderLayer, h: torch.Tensor, rope: Rope) -> torch.Tensor:
        attn, weights = layer.self_attn, self.layers[i]
        B, d = h.shape[0], attn.head_dim
        nh, nkv = attn.num_heads, attn.num_kv_heads
        qk, v = weights.qkv(h).split([(nh + nkv) * d, nkv * d], dim=-1)
        qk = qk.view(B, nh + nkv, 1, d)  # query and key heads normed and rotated together
        if weights.qk_norm is not None:
            qk = rms_norm(qk, weights.qk_norm, attn.q_norm.eps)
        q, k = rope.rotate(qk).split([nh, nkv], dim=1)
        dt = weights.dt_proj(v.view(B, 1, nkv * d))  # [B, 1, nb]
        bias = torch.exp(attn.A * F.softplus(dt)).view(B, -1, 1)  # [B, nb, 1]
        heads = bias.shape[1]
        position, keys, values = self.length, self.keys[i], self.values[i]
        groups = heads // nkv
        if groups > 1:  # v1: one cached key/value per query head
            k, v = k.repeat_interleave(groups, dim=1), v.view(B, nkv, 1, d).repeat_interleave(groups, dim=1)
        keys[:, :, position] = torch.cat([k.view(B, heads, d), bias.to(k.dtype)], dim=-1).to(self.dtype)
        values[:, :, position] = v.reshape(B, heads, d).to(self.dtype)
        S = position + 1
        query = self._query(B, heads, nh // heads, d)
        torch.mul(q.view(B, heads, nh // heads, d), attn.scaling, out=query[..., :d])  # [scale * q, 1], rounded
        scores = torch.matmul(query.float(), keys[:, :, :S].transpose(2, 3)).to(self.dtype)
        if S > attn.keep_window_size:  # DMA's keep window: only the keys with the largest bias count
            bias_all = keys[:, :, :S, d]
            kept = torch.zeros_like(bias_all, dtype=torch.bool).scatter(-1, bias_all.topk(attn.keep_window_size, dim=-1).indices, True)
            scores = scores.masked_fill(~kept[:, :, None], torch.finfo(scores.dtype).min)
        out = torch.matmul(F.softmax(scores, dim=-1).float(), values[:, :, :S]).to(self.dtype)  # [B, heads, g, d]
        return weights.o_proj(out.reshape(B, 1, nh * d))


