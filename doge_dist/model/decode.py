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

``compiled`` (``generate(compile=True)``) goes one step further: the same step as one inductor graph
with the weights frozen in and a C++ wrapper, so a token dispatches no Python operations at all
(doge-20m at batch 1 on two CPU threads: 2.5-4 ms per token against 6-9 ms eager, after a compile of
about 20 s). Written by hand: neither transformers nor PyTorch has a decode step for dynamic-mask attention.
"""
from __future__ import annotations

import sys
import types
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .cache import KVCache
from .cdmoe import CDMoE
from .doge import DecoderLayer, DogeForCausalLM
from .norm import RMSNorm, rms_norm
from .precision import compute_dtype


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN can hold ``weight`` in its blocked layout on this CPU: fp32 always; bf16 and fp16
    only where the CPU has the instructions for them (AVX-512 bf16/fp16, AMX), otherwise reordering
    the weight raises. An unpackable weight goes through ``F.linear``: the same products."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if weight.dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return weight.dtype == torch.float32


class Linear(torch.nn.Module):
    """``F.linear`` over a weight prepared once: concatenated, in the compute dtype, and (``pack``, on a
    CPU that supports the dtype: ``packable``) in oneDNN's blocked layout. The input is cast to the
    compute dtype, as autocast would. A module whose weight is a buffer, so that the compiled step
    (``pack=False``) freezes it as a constant and inductor packs it itself."""

    def __init__(self, linears: list[torch.nn.Linear], dtype: torch.dtype, pack: bool = True) -> None:
        super().__init__()
        weight = torch.cat([linear.weight.detach().to(dtype) for linear in linears]) if len(linears) > 1 \
            else linears[0].weight.detach().to(dtype)
        has_bias = linears[0].bias is not None
        bias = torch.cat([linear.bias.detach().to(dtype) for linear in linears]) if has_bias else None
        self.dtype = dtype
        self.packed = pack and packable(weight)
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class LayerWeights(torch.nn.Module):
    """One decoder layer's linears prepared for decode."""

    def __init__(self, layer: DecoderLayer, dtype: torch.dtype, pack: bool) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        dense = not isinstance(mlp, CDMoE)
        self.qkv = Linear([attn.q_proj, attn.k_proj, attn.v_proj], dtype, pack)
        qk_norm = None  # v2: the q and k norm weights per head, [nh + nkv, 1, d]
        if attn.q_norm is not None:
            qk_norm = torch.cat([attn.q_norm.weight.detach().expand(attn.num_heads, 1, -1),
                                 attn.k_norm.weight.detach().expand(attn.num_kv_heads, 1, -1)])
        self.register_buffer("qk_norm", qk_norm)
        self.dt_proj = Linear([attn.dt_proj], dtype, pack)
        self.o_proj = Linear([attn.o_proj], dtype, pack)
        self.gate_up = Linear([mlp.gate_proj, mlp.up_proj], dtype, pack) if dense else None  # None: CDMoE runs as it is
        self.down_proj = Linear([mlp.down_proj], dtype, pack) if dense else None


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


class DecodeStep(torch.nn.Module):
    """The layer math of ``doge.py`` for one new position over prepared weights.

    ``position`` is an int (eager: attention over the cache up to it) or a one-element tensor (the
    compiled step: attention over the whole buffer with the later positions masked out, so that one
    graph serves every position). Holds the model's body (norms, residual scales, A, CDMoE modules)
    as a submodule, never the model itself, which keys the cache of prepared steps."""

    def __init__(self, model: DogeForCausalLM, dtype: torch.dtype, autocast: bool, pack: bool) -> None:
        super().__init__()
        self.body = model.model
        self.prepared = torch.nn.ModuleList(LayerWeights(layer, dtype, pack) for layer in self.body.layers)
        self.lm_head = Linear([model.lm_head], dtype, pack)
        self.dtype, self.autocast = dtype, autocast
        self.device_type = model.lm_head.weight.device.type

    def forward(self, tokens: torch.Tensor, position, rope: Rope, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        """``tokens`` [B] at ``position`` -> logits [B, V]; writes the position's keys and values."""
        visible = None if isinstance(position, int) else torch.arange(keys[0].shape[2], device=tokens.device) <= position
        x = self.body.embed_tokens(tokens[:, None])  # [B, 1, H]
        for layer, weights, k_buffer, v_buffer in zip(self.body.layers, self.prepared, keys, values):
            attended = self._attention(layer.self_attn, weights, stream_norm(layer.input_layernorm, x), rope,
                                       position, visible, k_buffer, v_buffer)
            x = torch.addcmul(attended, layer.input_residual, x)
            h = stream_norm(layer.post_attention_layernorm, x)
            if weights.gate_up is None:
                with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
                    mixed, _ = layer.mlp(h)
            else:
                gate, up = weights.gate_up(h).chunk(2, dim=-1)
                mixed = weights.down_proj(F.silu(gate) * up)
            x = torch.addcmul(mixed, layer.post_attention_residual, x)
        return self.lm_head(stream_norm(self.body.norm, x))[:, -1]

    def _attention(self, attn, weights: LayerWeights, h: torch.Tensor, rope: Rope, position,
                   visible: Optional[torch.Tensor], keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
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
        groups = heads // nkv
        if groups > 1:  # v1: one cached key/value per query head
            k, v = k.repeat_interleave(groups, dim=1), v.view(B, nkv, 1, d).repeat_interleave(groups, dim=1)
        key = torch.cat([k.view(B, heads, d), bias.to(k.dtype)], dim=-1).to(self.dtype)
        value = v.reshape(B, heads, d).to(self.dtype)
        if visible is None:
            keys[:, :, position], values[:, :, position] = key, value
            S = position + 1
        else:  # the compiled step, always within the keep window (Decoder): every earlier key counts
            keys.index_copy_(2, position, key[:, :, None].float())
            values.index_copy_(2, position, value[:, :, None].float())
            S = keys.shape[2]
        query = F.pad(q.view(B, heads, nh // heads, d) * attn.scaling, (0, 1), value=1.0).to(self.dtype)  # [scale * q, 1]
        scores = torch.matmul(query.float(), keys[:, :, :S].transpose(2, 3)).to(self.dtype)
        if visible is not None:
            scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        elif S > attn.keep_window_size:  # DMA's keep window: only the keys with the largest bias count
            bias_all = keys[:, :, :S, d]
            kept = torch.zeros_like(bias_all, dtype=torch.bool).scatter(-1, bias_all.topk(attn.keep_window_size, dim=-1).indices, True)
            scores = scores.masked_fill(~kept[:, :, None], torch.finfo(scores.dtype).min)
        out = torch.matmul(F.softmax(scores, dim=-1).float(), values[:, :, :S]).to(self.dtype)  # [B, heads, g, d]
        return weights.o_proj(out.reshape(B, 1, nh * d))


_PREPARED: "weakref.WeakKeyDictionary[DogeForCausalLM, dict]" = weakref.WeakKeyDictionary()


class CompiledStep:
    """``step`` as one graph (``fullgraph``: a graph break would bring the Python dispatch back),
    compiled under inductor's ``freezing`` (the weights become constants: the linears go to oneDNN
    prepacked), ``cpp_wrapper`` and ``emulate_precision_casts`` (bf16 rounded where the eager step
    rounds, not once per fused kernel: the presets' layers give the eager step's bf16-autocast logits
    to the bit with torch 2.13; 2.11 and 2.12's C++ kernels ignore the setting: within bf16 rounding).
    Those settings are inductor's global config, read when a call compiles, so each call sets them
    (``torch.compile``'s ``options`` did not reach the freezing pass).

    Dynamo keeps compiled graphs on the code object they came from, guarded by the ids of the weights
    they froze (a later weight can reuse a freed one's id): the step gets a copy of ``forward``'s code
    (and of its module's globals, where dynamo installs the compiled functions), so no other step can
    pick its graphs up. Within the step nothing guarded on its modules can change (``prepared_step``
    makes a new step when a parameter does), so those guards are skipped: they cost more than a
    tenth of a step. When this object goes (new weights, the model freed) ``release`` drops what
    PyTorch would keep for the life of the process: the code's cache and inductor's loaded modules,
    which hold the frozen weights (a model's worth per compile)."""

    def __init__(self, step: DecodeStep) -> None:
        forward = DecodeStep.forward
        own = types.FunctionType(forward.__code__.replace(), dict(forward.__globals__), "forward")
        step.forward = types.MethodType(own, step)
        self.compiled = torch.compile(step, dynamic=False, fullgraph=True,
                                      options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self.modules: list[types.ModuleType] = []  # inductor's modules loaded for this step's graphs
        weakref.finalize(self, CompiledStep.release, own.__code__, self.modules)

    def __call__(self, *args) -> torch.Tensor:
        from torch._inductor.codecache import PyCodeCache

        loaded = PyCodeCache.modules
        before = len(loaded)
        with torch._inductor.config.patch(freezing=True, cpp_wrapper=True, emulate_precision_casts=True):
            logits = self.compiled(*args)
        if len(loaded) > before:  # this call compiled
            self.modules.extend(loaded[before:])
        return logits

    @staticmethod
    def release(code: types.CodeType, modules: list[types.ModuleType]) -> None:
        from torch._inductor.codecache import PyCodeCache

        torch._dynamo.reset_code(code)
        mine = {id(module) for module in modules}
        PyCodeCache.modules[:] = [module for module in PyCodeCache.modules if id(module) not in mine]
        for module in modules:
            if sys.modules.get(module.__name__) is module:
                del sys.modules[module.__name__]


def prepared_step(model: DogeForCausalLM, dtype: torch.dtype, autocast: bool, compiled: bool):
    """The decode step of ``model`` in ``dtype``, kept (beside the model, which stays copyable and
    picklable) until a parameter changes: an in-place update bumps its version counter, a replaced
    tensor has a new address. ``compiled``: one inductor graph with the weights frozen in (inductor
    packs the linears for oneDNN itself) and a C++ wrapper, so a step dispatches no Python operations;
    compiled again for a new batch size or buffer length, and for new weights."""
    state = tuple((p.data_ptr(), p._version) for p in model.parameters())
    key = (dtype, autocast, compiled)
    kept = _PREPARED.get(model, {}).get(key)
    if kept is not None and kept[0] == state:
        return kept[1]
    step = DecodeStep(model, dtype, autocast, pack=not compiled)
    if compiled:
        step = CompiledStep(step)
    _PREPARED.setdefault(model, {})[key] = (state, step)
    return step


class Decoder:
    """Decode steps of ``model`` after a prompt, up to ``max_length`` positions in all. ``compiled``:
    through the compiled step, with the cache rounded up to a multiple of ``COMPILED_LENGTH_STEP``
    positions so that nearby lengths share one graph. Only within the keep window: past it the keep
    window chooses among equal biases (frequent in bf16) by ``topk`` over exactly the cached keys, as
    the model's forward does, which a graph over the whole buffer would not reproduce; such a
    generation runs the eager step."""

    COMPILED_LENGTH_STEP = 64

    @staticmethod
    def supports(model: DogeForCausalLM) -> bool:
        """The single-device model only: tensor- and expert-parallel forms run their own forward."""
        return type(model) is DogeForCausalLM

    def __init__(self, model: DogeForCausalLM, cache: KVCache, max_length: int, compiled: bool = False) -> None:
        weight = next(model.parameters())
        dtype = compute_dtype(weight)
        self.dtype, self.device_type = dtype, weight.device.type
        keep_window = model.config.keep_window_size
        self.compiled = compiled and max_length <= keep_window
        self.forward = prepared_step(model, dtype, torch.is_autocast_enabled(self.device_type), self.compiled)
        self.length = cache.length
        self.end = max_length
        rounded = min(-(-max_length // self.COMPILED_LENGTH_STEP) * self.COMPILED_LENGTH_STEP, keep_window)
        self.keys, self.values = self._seed(cache, rounded if self.compiled else max_length)
        self.start = cache.length
        self.ropes = decode_ropes(model, self.start, max_length, dtype)

    def _seed(self, cache: KVCache, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer: keys with the bias channel [B, nb, capacity, d + 1] and values [B, nb, capacity, d],
        one head per bias head (v1 repeats each key/value head for its query heads), holding the prompt.
        Stored in fp32 with the values the attention matmuls would see (rounded to the compute dtype)."""
        keys, values = [], []
        for key, value, bias in cache.layers:
            groups = bias.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            B, heads, S, d = key.shape
            k_buffer = key.new_zeros(B, heads, capacity, d + 1, dtype=torch.float32)
            k_buffer[:, :, :S] = torch.cat([key, bias[..., None].to(key.dtype)], dim=-1).to(self.dtype)
            v_buffer = value.new_zeros(B, heads, capacity, d, dtype=torch.float32)
            v_buffer[:, :, :S] = value.to(self.dtype)
            keys.append(k_buffer)
            values.append(v_buffer)
        return keys, values

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [B] at the next position -> logits [B, V].

        Runs with autocast off and does its casts itself: linears take their input in the compute
        dtype (as autocast would); the two attention matmuls, the only other operations autocast
        changes here, multiply operands rounded to the compute dtype in fp32 and round the result,
        which is what a bf16 matmul with fp32 accumulation computes, at a fraction of the cost for
        these tiny shapes."""
        position = self.length
        if position >= self.end:
            raise ValueError(f"The decoder was prepared for {self.end} positions.")
        rope = self.ropes[position - self.start]  # broadcast over [B, heads, 1, d]
        where = torch.tensor([position], device=tokens.device) if self.compiled else position
        with torch.autocast(self.device_type, enabled=False):
            logits = self.forward(tokens, where, rope, self.keys, self.values)
        self.length += 1
        return logits
