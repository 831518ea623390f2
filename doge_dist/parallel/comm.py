"""Autograd-aware collectives the parallel layers need and megatron-core does not provide on every
device (its sequence-parallel mappings allocate on CUDA only), written by hand for CPU and GPU."""
import torch
import torch.distributed as dist
from torch import nn


class _Gather(torch.autograd.Function):
    """Concatenate every rank's tensor along ``dim``; backward reduce-scatters (sums partial grads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ReduceScatter.apply(grad, ctx.dim, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    """Sum over the group and keep this rank's slice along ``dim``; backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [part.contiguous() for part in x.chunk(dist.get_world_size(group), dim=dim)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Gather.apply(grad, ctx.dim, ctx.group), None, None


class _AllReduce(torch.autograd.Function):
    """Sum over the group (forward), identity (backward): megatron's ``reduce_from_tensor_model_parallel_region``
    out of place. Megatron's all-reduces its input in place and returns it as its output, which a
    compiled layer (``train.compile``) refuses once that output passes another such function."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherForReplicatedUse(torch.autograd.Function):
    """Concatenate along dim 0 for a computation every rank repeats identically: the backward hands
    each rank its own rows' gradient, without summing the identical copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return _Gather.apply(x, dim, group)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return _ReduceScatter.apply(x, dim, group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduce.apply(x, group)


def gather_for_replicated_use(x: torch.Tensor, group) -> torch.Tensor:
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)
    return _GatherForReplicatedUse.apply(x, group)


def sum_gradients_over_group(param: nn.Parameter, group) -> None:
    """For a replicated parameter whose gradient each rank computes only in part."""

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    param.register_hook(all_reduce)
