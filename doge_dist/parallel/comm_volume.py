"""Communication volume per training step: what the parallel layers send, counted two ways.

``analytic_tp_bytes`` derives it from the layer shapes; ``CollectiveCounter`` counts the collectives a
real step issues. Both use the NCCL bus-bandwidth convention for the bytes one rank sends over a
group of p ranks: all-reduce of S bytes 2(p-1)/p x S, all-gather (S = gathered size) and
reduce-scatter (S = input size) (p-1)/p x S. Written here because neither megatron-core nor DeepSpeed
reports it.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import ModelConfig


def _allreduce(size: float, p: int) -> float:
    return 2 * (p - 1) / p * size


def _allgather(size: float, p: int) -> float:
    return (p - 1) / p * size


def analytic_tp_bytes(c: ModelConfig, tokens: int, tp: int, sequence_parallel: bool, dtype_bytes: int = 4) -> float:
    """Bytes one tensor-parallel rank sends for one forward+backward of ``tokens`` (= micro-batch x T)."""
    N, H, L = tokens, c.hidden_size, c.num_hidden_layers
    bias_heads = c.num_attention_heads if c.attention_variant == "v1" else c.num_key_value_heads
    per_layer = 2 * _allreduce(N * bias_heads, tp)  # dt_proj partial sums, forward and backward
    if c.attention_variant == "v2":
        per_layer += _allreduce(2 * c.head_dim, tp)  # q/k norm weight gradients
    if sequence_parallel:
        # forward: gather for q, k, v, gate, up; reduce-scatter after o, down; backward mirrors each
        per_layer += 2 * (5 * _allgather(N * H, tp) + 2 * _allgather(N * H, tp))
        per_layer += _allreduce(4 * H, tp)  # norm and residual-scale gradients over sequence shards
        per_layer += _allreduce((c.attention_bias + c.mlp_bias) * H, tp)  # o_proj, down_proj bias gradients, likewise
        if c.is_moe:
            per_layer += _allreduce(H * 2 * c.num_keys + 2 * c.num_experts * H, tp)  # router and expert gradients
            # the balance loss sees every rank's tokens: router logits, and int64 expert ids (2 floats each)
            per_layer += _allgather(N * 2 * c.num_keys, tp) + _allgather(N * c.num_experts_per_tok * 8 / dtype_bytes, tp)
        ends = 2 * 2 * _allgather(N * H, tp) + _allreduce(H, tp)  # embedding and head gathers, final norm
    else:
        # forward all-reduce after o, down; backward all-reduce of the input gradient of q, k, v, gate, up
        per_layer += (2 + 5) * _allreduce(N * H, tp)
        ends = 2 * _allreduce(N * H, tp)  # embedding forward, LM head input gradient
    cross_entropy = 3 * _allreduce(N, tp)  # max, target logit, sum of exponentials
    return (L * per_layer + ends + cross_entropy) * dtype_bytes


@dataclass
class CollectiveCounter:
    """Bytes sent by this rank in collectives on ``group`` while counting (see the module docstring)."""

    group: object
    sent: float = 0.0
    calls: dict = field(default_factory=dict)

    def _count(self, name: str, nbytes: float, group) -> None:
        if group is self.group:
            p = dist.get_world_size(group)
            self.sent += _allreduce(nbytes, p) if name == "all_reduce" else _allgather(nbytes, p)
            self.calls[name] = self.calls.get(name, 0) + 1

    @contextmanager
    def counting(self):
        originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "reduce_scatter")}

        def all_reduce(tensor, *args, group=None, **kwargs):
            self._count("all_reduce", tensor.numel() * tensor.element_size(), group)
            return originals["all_reduce"](tensor, *args, group=group, **kwargs)

        def all_gather(outputs, tensor, *args, group=None, **kwargs):
            self._count("all_gather", sum(t.numel() * t.element_size() for t in outputs), group)
            return originals["all_gather"](outputs, tensor, *args, group=group, **kwargs)

        def reduce_scatter(output, inputs, *args, group=None, **kwargs):
            self._count("reduce_scatter", sum(t.numel() * t.element_size() for t in inputs), group)
            return originals["reduce_scatter"](output, inputs, *args, group=group, **kwargs)

        dist.all_reduce, dist.all_gather, dist.reduce_scatter = all_reduce, all_gather, reduce_scatter
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def moe_exchange_bytes(c: ModelConfig, tokens: int, ep: int, dtype_bytes: int = 2) -> dict[str, float]:
    """Per rank and micro-batch (forward + backward), the expert-parallel exchange of ``parallelize_experts``
    against an all-to-all token dispatch, for ``tokens`` tokens per rank."""
    N, H, L, k = tokens, c.hidden_size, c.num_hidden_layers, c.num_experts_per_tok
    # gather tokens and gates, reduce-scatter outputs (the backward mirrors each), gather int32 ids once
    floats = 2 * (2 * _allgather(ep * N * H, ep) + _allgather(ep * N * k, ep))
    ours = L * (floats * dtype_bytes + _allgather(ep * N * k, ep) * 4)
    # all-to-all: each token goes once to every other rank owning one of its k experts, and returns
    ranks_reached = ep * (1 - (1 - 1 / ep) ** k)  # expected distinct ranks among k uniform experts
    remote = max(ranks_reached - 1, 0.0)
    all_to_all = L * 2 * 2 * N * remote * H * dtype_bytes  # dispatch + combine, forward + backward
    return {"gather_reduce_scatter": ours, "all_to_all": all_to_all}


def _measure_rank(rank: int, world_size: int, cases: list, micro_batch: int, seq_length: int) -> list[float]:
    import copy

    from megatron.core import parallel_state

    from ..config import ParallelConfig
    from ..model import build_model, shift_labels
    from .state import initialize_parallel
    from .tensor import parallelize_tensor

    initialize_parallel(ParallelConfig(tensor_parallel=world_size))
    group = parallel_state.get_tensor_model_parallel_group()
    sent = []
    for config, sequence_parallel in cases:
        torch.manual_seed(0)
        model = parallelize_tensor(copy.deepcopy(build_model(config)), group, sequence_parallel)
        ids = torch.randint(3, config.vocab_size, (micro_batch, seq_length))
        counter = CollectiveCounter(group)
        with counter.counting():
            out = model(ids)
            total, count = model.loss_sum(out.logits, shift_labels(ids))
            (total / count + (out.balance_loss if config.is_moe else 0)).backward()
        sent.append(counter.sent)
    return sent


def measure_tp_bytes(cases: list[tuple[ModelConfig, bool]], micro_batch: int, seq_length: int, tp: int) -> list[float]:
    """Bytes rank 0 sends in one forward+backward of each (config, sequence_parallel), counted on
    ``tp`` local gloo processes."""
    from .spawn import run_distributed

    return run_distributed(_measure_rank, tp, cases, micro_batch, seq_length)[0]
