"""Apply the parallel layout to a single-device model, in torchtitan's fixed order: tensor/sequence
parallel, then expert parallel (activation checkpointing and ZeRO follow in the trainer's engine)."""
from megatron.core import parallel_state

from ..config import ParallelConfig
from ..model import DogeForCausalLM
from .expert import parallelize_experts
from .state import MegatronMPU
from .tensor import parallelize_tensor


def parallelize(model: DogeForCausalLM, parallel: ParallelConfig) -> DogeForCausalLM:
    """This rank's part of ``model`` (every rank passes the same weights); groups must exist."""
    if parallel.tensor_parallel > 1:
        model = parallelize_tensor(model, parallel_state.get_tensor_model_parallel_group(), parallel.sequence_parallel)
    if parallel.expert_parallel > 1:
        model = parallelize_experts(model, parallel_state.get_expert_model_parallel_group())
    return model


def deepspeed_mpu(parallel: ParallelConfig):
    """The ``mpu`` for ``deepspeed.initialize`` (None without tensor parallelism)."""
    return MegatronMPU() if parallel.tensor_parallel > 1 else None
