"""Process groups through ``megatron.core.parallel_state`` and the ``mpu`` object DeepSpeed takes.

Ranks are laid out tensor-parallel first (neighbouring ranks share a layer, as in Megatron-LM),
then data-parallel. DeepSpeed gets ``MegatronMPU`` so that ZeRO partitions and gradient
all-reduces happen only across the data-parallel group.
"""
import math
from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state

from ..config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tensor_parallel: int
    expert_parallel: int

    @property
    def dp_size(self) -> int:
        """Data-parallel size: the ranks that hold the same model shard."""
        return self.world_size // self.tensor_parallel


def check_layout(parallel: ParallelConfig, world_size: int) -> ParallelLayout:
    """Refuse impossible layouts before any group or model is built."""
    tp, ep = parallel.tensor_parallel, parallel.expert_parallel
    if tp < 1 or ep < 1:
        raise ConfigError("parallel.tensor_parallel and parallel.expert_parallel must be >= 1.")
    if world_size % tp:
        raise ConfigError(
            f"The world size ({world_size} processes) is not a multiple of parallel.tensor_parallel ({tp}); "
            f"launch a multiple of {tp} processes or set parallel.tensor_parallel to a divisor of {world_size}."
        )
    if (world_size // tp) % ep:
        raise ConfigError(
            f"parallel.expert_parallel ({ep}) must divide the data-parallel size ({world_size // tp} = "
            f"{world_size} processes / tensor_parallel {tp})."
        )
    if parallel.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1.")
    return ParallelLayout(world_size, tp, ep)


def initialize_parallel(parallel: ParallelConfig) -> ParallelLayout:
    """Create the tensor/expert/data-parallel groups (torch.distributed must be initialised), with the world
    group's collective timeout: DeepSpeed's, ``DEEPSPEED_TIMEOUT`` minutes (default 10). Megatron's own default is
    30 minutes, and a training step's collectives run on these groups, so a stuck rank hung the job for 30
    minutes whatever DEEPSPEED_TIMEOUT said (Megatron-LM passes its --distributed-timeout-minutes to both)."""
    from deepspeed.constants import default_pg_timeout

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    layout = check_layout(parallel, world_size)
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel needs torch.distributed; call it after init_process_group.")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        expert_model_parallel_size=layout.expert_parallel,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=max(1, math.ceil(default_pg_timeout.total_seconds() / 60)),
    )
    return layout


def data_parallel_group():
    """The data-parallel group (ranks holding the same model shard), or None (all ranks) before setup."""
    return parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None


class MegatronMPU:
    """The model-parallel unit DeepSpeed expects (``mpu=`` of ``deepspeed.initialize``)."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(lambda: 0)
    get_pipeline_model_parallel_world_size = staticmethod(lambda: 1)


class ExpertParallelMPU(MegatronMPU):
    """The ``mpu`` for expert parallelism (alone or with tensor parallelism): DeepSpeed sees the
    expert-tensor-and-model-parallel group (the tp x ep ranks that together hold one copy of every
    expert) as its model-parallel group and the expert-data-parallel group (ranks holding the same
    shard) as its data-parallel group. So ZeRO reduces and partitions every gradient only among
    replicas of the same shard and saves one model file per shard; ``expert.prepare_expert_gradients``
    makes the dense gradients whole and marks the copies the gradient norm must count once."""

    get_model_parallel_rank = staticmethod(parallel_state.get_expert_tensor_and_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_expert_tensor_and_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_expert_tensor_and_model_parallel_group)
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_data_parallel_rank = staticmethod(parallel_state.get_expert_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_expert_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_expert_data_parallel_group)
