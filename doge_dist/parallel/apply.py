"""Apply the parallel layout to a single-device model, in torchtitan's fixed order: tensor/sequence
parallel, then expert parallel (activation checkpointing and ZeRO follow in the trainer's engine);
and what DeepSpeed needs to know about that layout (its mpu, batch arithmetic, checkpoint merging rules)."""
from megatron.core import parallel_state

from ..config import ModelConfig, ParallelConfig
from ..model import DogeForCausalLM
from .expert import expert_universal_info, parallelize_experts, prepare_expert_gradients
from .grid_checkpoint import grid_universal_info, mark_grid_restore
from .state import ExpertParallelMPU, MegatronMPU
from .tensor import parallelize_tensor
from .tensor import universal_checkpoint_info as tensor_universal_info


def parallelize(model: DogeForCausalLM, parallel: ParallelConfig, zero3: bool = False) -> DogeForCausalLM:
    """This rank's part of ``model`` (every rank passes the same weights); groups must exist.

    Each parameter gets its restore map (``mark_grid_restore``) where DeepSpeed's universal loader needs
    one to cut this rank's piece out of a full tensor: under tp x ep always, and under tensor parallelism
    alone at ZeRO-3 (``zero3``), whose loader slices no tensor-parallel shard by the checkpoint's name
    categories (ZeRO 1-2's does, padded vocabulary included). The maps split the vocabulary unpadded:
    without them (a vocabulary not divisible by tp) ``loop.loadable_checkpoint`` refuses such loads."""
    tp, ep = parallel.tensor_parallel, parallel.expert_parallel
    tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    if tp > 1:
        model = parallelize_tensor(model, tp_group, parallel.sequence_parallel)
    if ep > 1:
        group = parallel_state.get_expert_model_parallel_group()
        model = parallelize_experts(model, group)
        prepare_expert_gradients(model, group, tp_group)
    if tp > 1 and (ep > 1 or (zero3 and model.config.vocab_size % tp == 0)):
        mark_grid_restore(model, model.config, tp, ep)
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


def universal_checkpoint_info(config: ModelConfig, tensor_parallel: int, expert_parallel: int) -> dict:
    """How ``ds_to_universal`` merges a checkpoint saved at this layout."""
    if tensor_parallel > 1 and expert_parallel > 1:
        return grid_universal_info(config, tensor_parallel, expert_parallel)
    return expert_universal_info() if expert_parallel > 1 else tensor_universal_info(config)

