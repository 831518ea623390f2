"""Apply the parallel layout to a single-device model, in torchtitan's fixed order: tensor/sequence
parallel, then expert parallel (activation checkpointing and ZeRO follow in the trainer's engine)."""
from megatron.core import parallel_state

from ..config import ParallelConfig
from ..model import DogeForCausalLM
from .expert import parallelize_experts, prepare_expert_gradients
from .state import ExpertParallelMPU, MegatronMPU
from .tensor import parallelize_tensor


def parallelize(model: DogeForCausalLM, parallel: ParallelConfig) -> DogeForCausalLM:
    """This rank's part of ``model`` (every rank passes the same weights); groups must exist."""
    if parallel.tensor_parallel > 1:
        model = parallelize_tensor(model, parallel_state.get_tensor_model_parallel_group(), parallel.sequence_parallel)
    if parallel.expert_parallel > 1:
        group = parallel_state.get_expert_model_parallel_group()
        model = parallelize_experts(model, group)
        prepare_expert_gradients(model, group)
    return model


def deepspeed_mpu(parallel: ParallelConfig):
    """The ``mpu`` for ``deepspeed.initialize`` (None without model parallelism)."""
    if parallel.expert_parallel > 1:
        return ExpertParallelMPU()
    return MegatronMPU() if parallel.tensor_parallel > 1 else None


def deepspeed_data_parallel_size(parallel: ParallelConfig, dp_size: int) -> int:
    """The data-parallel size DeepSpeed sees (its batch-size arithmetic): under expert parallelism,
    the ranks holding the same experts."""
    return dp_size // parallel.expert_parallel
