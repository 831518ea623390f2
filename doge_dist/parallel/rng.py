"""Dropout under tensor parallelism, as Megatron's RNG tracker does it: activations split over the
tensor-parallel ranks (attention probabilities of this rank's heads; with sequence parallelism, the
hidden states of this rank's tokens) get masks drawn independently on each rank, while replicated
activations get the same mask on every rank, or the replicas would stop being copies of each other.

Every rank of a tensor-parallel group holds its default generators in the same state (one seed, the
same draws). A region that must draw per rank (``rank_local_random``) takes one number from that
shared stream, so the stream goes on alike on every rank, and draws its masks from that number plus
the rank. Nothing else is kept: a checkpoint's saved generator states resume it exactly, and
activation checkpointing, which restores the default generators before recomputing a layer, draws
the same masks again. A module in eval mode draws no masks and takes no number either: an
evaluation between two steps (validation, a DPO reference forward) leaves the training's stream,
and with it every later mask, as it was, as in Megatron-LM.
"""
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

SEED_RANGE = 2**62  # seed + rank stays below 2**63


def device_generator(device: torch.device) -> torch.Generator:
    """The default generator that random ops on ``device`` draw from."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


@contextmanager
def rank_local_random(device: torch.device, rank: int):
    """Random ops on ``device`` inside draw from a stream of this rank's own (see the module docstring)."""
    seed = int(torch.randint(SEED_RANGE, (), generator=torch.default_generator))  # the shared CPU stream
    generator = device_generator(device)
    shared_state = generator.get_state()
    generator.manual_seed(seed + rank)
    try:
        yield
    finally:
        generator.set_state(shared_state)


def draw_per_rank(module: nn.Module, rank: int) -> None:
    """Run ``module``'s forward (its first argument: the activations) inside ``rank_local_random``
    while it trains (dropout is off in eval mode: nothing to draw); replaced on the instance, so
    parameter names stay as they are."""
    forward: Callable = module.forward

    def forward_per_rank(x, *args, **kwargs):
        if not module.training:
            return forward(x, *args, **kwargs)
        with rank_local_random(x.device, rank):
            return forward(x, *args, **kwargs)

    module.forward = forward_per_rank
