"""Expert-parallel CDMoE equals the single-device model on the same data-parallel split."""
import copy

import pytest
import torch
import torch.distributed as dist

from doge_dist.config import ModelConfig, ParallelConfig
from doge_dist.model import build_model, shift_labels
from doge_dist.parallel.expert import is_expert_param, merge_experts, shard_experts
from doge_dist.parallel.state import initialize_parallel
from doge_dist.parallel.spawn import run_distributed
from model_helpers import perturb_all, unique_tokens


def _ep_matches_single(rank, world_size, tensor_parallel, sequence_parallel):
    from megatron.core import parallel_state

    from doge_dist.parallel.expert import parallelize_experts
    from doge_dist.parallel.tensor import merge_state_dicts, parallelize_tensor

    expert_parallel = world_size // tensor_parallel
    initialize_parallel(ParallelConfig(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
                                       sequence_parallel=sequence_parallel))
    config = ModelConfig.from_preset("doge-tiny-moe", num_experts=64, num_experts_per_tok=8, num_key_value_heads=4)
    torch.manual_seed(0)
    single = build_model(config)
    perturb_all(single)
    sharded = copy.deepcopy(single)
    if tensor_parallel > 1:
        sharded = parallelize_tensor(sharded, parallel_state.get_tensor_model_parallel_group(), sequence_parallel)
    sharded = parallelize_experts(sharded, parallel_state.get_expert_model_parallel_group())
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    ids = unique_tokens(2 * dp, 12, config.vocab_size, seed=5)
    labels = shift_labels(ids)
    count = (labels != -100).sum()

    def loss_of(model, rows):
        out = model(ids[rows])
        total, _ = model.loss_sum(out.logits, labels[rows])
        return total / count + config.router_aux_loss_coef * out.balance_loss / dp

    single_loss = sum(loss_of(single, slice(2 * r, 2 * r + 2)) for r in range(dp))  # the DP oracle
    single_loss.backward()
    local_loss = loss_of(sharded, slice(2 * dp_rank, 2 * dp_rank + 2))
    local_loss.backward()
    total = local_loss.detach().clone()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())

    grads = {}
    for name, param in sharded.named_parameters():
        grad = param.grad.clone()
        if not is_expert_param(name):  # replicated over data parallel: sum as DDP/ZeRO would (then /dp)
            dist.all_reduce(grad, group=parallel_state.get_data_parallel_group())
        grads[name] = grad
    expert_shards = [None] * expert_parallel
    dist.all_gather_object(expert_shards, grads, group=parallel_state.get_expert_model_parallel_group())
    grads = merge_experts(expert_shards)
    if tensor_parallel > 1:
        tp_shards = [None] * tensor_parallel
        dist.all_gather_object(tp_shards, grads, group=parallel_state.get_tensor_model_parallel_group())
        grads = merge_state_dicts(tp_shards, config)
    expert_bytes = sum(p.numel() for n, p in sharded.named_parameters() if is_expert_param(n))
    return {
        "loss": (single_loss.item(), total.item()),
        "grads": {n: ((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-6)).item()
                  for n, p in single.named_parameters()},
        "expert_fraction": expert_bytes / sum(p.numel() for n, p in single.named_parameters() if is_expert_param(n)),
    }


@pytest.mark.parametrize("world_size, tensor_parallel, sequence_parallel", [(2, 1, False), (4, 2, False), (4, 2, True)],
                         ids=["ep2", "ep2xtp2", "ep2xtp2_sequence_parallel"])
def test_expert_parallel_equals_single_device(world_size, tensor_parallel, sequence_parallel):
    for result in run_distributed(_ep_matches_single, world_size, tensor_parallel, sequence_parallel):
        single, sharded = result["loss"]
        assert abs(single - sharded) <= 1e-5
        worst = max(result["grads"], key=result["grads"].get)
        assert result["grads"][worst] <= 1e-5, worst
        assert result["expert_fraction"] == pytest.approx(1 / (world_size // tensor_parallel))


def test_shard_then_merge_experts_is_identity():
    state = build_model(ModelConfig.from_preset("doge-tiny-moe")).state_dict()
    merged = merge_experts([shard_experts(state, r, 4) for r in range(4)])
    assert all(torch.equal(merged[k], state[k]) for k in state)


def test_merge_grid_inverts_a_tp2_x_ep2_split():
    """ZeRO-0 exports merge DeepSpeed's model-parallel files in rank order: ep_rank * tp + tp_rank."""
    from doge_dist.parallel.grid_checkpoint import merge_grid
    from doge_dist.parallel.tensor import shard_state_dict

    config = ModelConfig.from_preset("doge-tiny-moe")
    state = build_model(config).state_dict()
    shards = [shard_state_dict(shard_experts(state, e, 2), config, t, 2) for e in range(2) for t in range(2)]
    merged = merge_grid(shards, config, 2)
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)


def test_a_zero0_export_merges_more_than_100_model_parallel_files_in_rank_order(tmp_path):
    """DeepSpeed names the files mp_rank_00 .. mp_rank_127: sorted by name, mp_rank_100 came before
    mp_rank_11 and the experts of an EP-128 run were merged out of order, silently."""
    import dataclasses
    import json

    from doge_dist.train import checkpoint
    from doge_dist.train.export import consolidated_state

    config = ModelConfig.from_preset("doge-tiny-moe", num_experts=256)
    state = build_model(config).state_dict()
    tag, ep = "step_00000001", 128
    (tmp_path / tag).mkdir()
    for rank in range(ep):
        torch.save({"module": shard_experts(state, rank, ep)}, tmp_path / tag / f"mp_rank_{rank:02d}_model_states.pt")
    meta = {"step": 1, "tensor_parallel": 1, "expert_parallel": ep, "zero_stage": 0, "dp_size": ep,
            "model": dataclasses.asdict(config)}
    (tmp_path / tag / checkpoint.META).write_text(json.dumps(meta))
    merged = consolidated_state(tmp_path, tag)
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)
