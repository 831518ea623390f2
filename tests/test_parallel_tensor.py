"""Tensor- and sequence-parallel Doge equals the single-device model: logits, loss, every gradient."""
import copy

import pytest
import torch
import torch.distributed as dist

from doge_dist.config import ConfigError, ModelConfig, ParallelConfig
from doge_dist.model import build_model, shift_labels
from doge_dist.model.cache import KVCache
from doge_dist.parallel.state import check_layout, initialize_parallel
from doge_dist.parallel.tensor import check_tensor_parallel, merge_state_dicts, shard_state_dict
from doge_dist.parallel.spawn import run_distributed
from model_helpers import perturb_all, randomise_dynamic_mask, unique_tokens

CASES = {
    "dense gqa": ("doge-tiny", {}),
    "moe": ("doge-tiny-moe", {}),
    "v1 untied keep-window": ("doge-tiny", {"attention_variant": "v1", "tie_word_embeddings": False, "keep_window_size": 9}),
    "odd vocab (padded)": ("doge-tiny", {"vocab_size": 509}),
    "head_dim != hidden / heads": ("doge-tiny", {"head_dim": 8}),
    "packed documents": ("doge-tiny", {"keep_window_size": 5, "packed_documents": True}),
    "moe with biases": ("doge-tiny-moe", {"attention_bias": True, "mlp_bias": True}),
}


def _compare_all_cases(rank, world_size):
    """One set of processes runs every case (process start-up dominates these tests)."""
    from megatron.core import parallel_state

    initialize_parallel(ParallelConfig(tensor_parallel=world_size))
    group = parallel_state.get_tensor_model_parallel_group()
    results = {
        (case, sequence_parallel): _compare_with_single_device(group, world_size, *CASES[case], sequence_parallel)
        for case in CASES
        for sequence_parallel in (False, True)
    }
    refused = {"odd length": dict(input_ids=unique_tokens(1, 15, 512)), "decode": dict(input_ids=unique_tokens(1, 16, 512),
                                                                                     cache=KVCache())}
    return {**results, **{name: _refusal(group, call) for name, call in refused.items()}}


def _refusal(group, call: dict) -> str:
    """The error of a sequence-parallel forward ``call``: 15 tokens over 2 ranks aborted gloo in its
    reduce-scatter; a decoding call drew tokens from this rank's vocabulary shard."""
    from doge_dist.parallel.tensor import parallelize_tensor

    model = parallelize_tensor(build_model(ModelConfig.from_preset("doge-tiny")), group, sequence_parallel=True)
    try:
        model(**call)
    except ValueError as error:
        return str(error)
    return "no error"


def _compare_with_single_device(group, world_size, preset, overrides, sequence_parallel):
    from doge_dist.parallel.tensor import parallelize_tensor

    packed = overrides.get("packed_documents", False)
    config = ModelConfig.from_preset(preset, **{k: v for k, v in overrides.items() if k != "packed_documents"})
    torch.manual_seed(0)
    single = build_model(config)
    randomise_dynamic_mask(single)
    perturb_all(single)
    sharded = parallelize_tensor(copy.deepcopy(single), group, sequence_parallel)

    ids = unique_tokens(2, 16, config.vocab_size, seed=3)
    ids[0, 4] = config.pad_token_id  # a lookup of the padding row: no gradient from it (nn.Embedding's padding_idx)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    labels = shift_labels(ids, mask)
    documents = (torch.arange(16) >= torch.tensor([[6], [9]])).long() if packed else None
    results = {}
    for name, model in (("single", single), ("tp", sharded)):
        out = model(ids, attention_mask=mask, document_ids=documents)
        total, count = model.loss_sum(out.logits, labels)
        loss = total / count + (config.router_aux_loss_coef * out.balance_loss if config.is_moe else 0)
        loss.backward()
        results[name] = (loss.detach(), out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})

    local_logits = results["tp"][1]
    parts = [torch.empty_like(local_logits) for _ in range(world_size)]
    dist.all_gather(parts, local_logits.contiguous(), group=group)
    full_logits = torch.cat(parts, dim=-1)[..., : config.vocab_size]
    grad_shards = [None] * world_size
    dist.all_gather_object(grad_shards, results["tp"][2], group=group)
    merged_grads = merge_state_dicts(grad_shards, config)
    return {
        "loss": (results["single"][0].item(), results["tp"][0].item()),
        "logits": (full_logits - results["single"][1])[mask.bool()].abs().max().item(),
        "grads": {n: ((merged_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-6)).item()
                  for n, g in results["single"][2].items()},
    }


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_compare_all_cases, 2)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_equals_single_device(tp2_results, case, sequence_parallel):
    for per_rank in tp2_results:
        result = per_rank[(case, sequence_parallel)]
        single_loss, tp_loss = result["loss"]
        assert abs(single_loss - tp_loss) <= 1e-5
        assert result["logits"] <= 1e-5
        worst = max(result["grads"], key=result["grads"].get)
        assert result["grads"][worst] <= 1e-5, worst


def test_a_sequence_parallel_forward_needs_a_length_the_ranks_divide_and_does_not_decode(tp2_results):
    for per_rank in tp2_results:
        assert per_rank["odd length"] == ("15 tokens per sequence do not split over parallel.tensor_parallel = 2 ranks "
                                          "with sequence parallelism: pad them to a multiple of 2.")
        assert per_rank["decode"].startswith("A tensor-parallel model does not decode: generate with the single-device")


def test_shard_then_merge_returns_the_full_state():
    config = ModelConfig.from_preset("doge-tiny", vocab_size=510, num_key_value_heads=4)
    state = build_model(config).state_dict()
    shards = [shard_state_dict(state, config, r, 4) for r in range(4)]
    assert shards[0]["model.embed_tokens.weight"].shape[0] == 128  # 510 padded to 512, split 4 ways
    merged = merge_state_dicts(shards, config)
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)


def test_invalid_layouts_fail_before_building():
    with pytest.raises(ConfigError, match=r"num_key_value_heads = 2 is not divisible by parallel.tensor_parallel = 4\. "
                                          r"Key/value heads are not replicated"):
        check_tensor_parallel(ModelConfig.from_preset("doge-tiny"), 4)  # 2 kv heads over 4 ranks
    with pytest.raises(ConfigError, match=r"intermediate_size = 129 is not divisible by parallel.tensor_parallel = 2: "
                                          r"each rank holds 1/2 of it\. Choose a tensor_parallel size that divides it\.$"):
        check_tensor_parallel(ModelConfig.from_preset("doge-tiny", intermediate_size=129), 2)  # the advice named kv heads
    with pytest.raises(ConfigError, match="not a multiple of parallel.tensor_parallel"):
        check_layout(ParallelConfig(tensor_parallel=2), 3)
    with pytest.raises(ConfigError, match="sequence_parallel"):
        check_layout(ParallelConfig(tensor_parallel=1, sequence_parallel=True), 2)


def _dropout_masks(rank, world_size, sequence_parallel):
    """Every dropout mask of one training forward at tensor parallel ``world_size``, as drawn on each rank."""
    import torch.nn.functional as F
    from megatron.core import parallel_state

    from doge_dist.parallel.tensor import parallelize_tensor

    initialize_parallel(ParallelConfig(tensor_parallel=world_size, sequence_parallel=sequence_parallel))
    group = parallel_state.get_tensor_model_parallel_group()
    config = ModelConfig.from_preset("doge-tiny", hidden_dropout=0.5, attention_dropout=0.5, attn_backend="eager")
    torch.manual_seed(0)
    model = parallelize_tensor(build_model(config), group, sequence_parallel).train()
    masks, dropout = [], F.dropout

    def recording_dropout(x, p=0.5, training=True, inplace=False):
        out = dropout(x, p, training, inplace)
        masks.append(out == 0)
        return out

    F.dropout = recording_dropout
    torch.manual_seed(1)  # the same default generator state on every rank, as the trainer seeds them
    model(unique_tokens(2, 16, config.vocab_size))
    every_rank = [None] * world_size
    dist.all_gather_object(every_rank, masks, group=group)
    return every_rank


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_dropout_masks_differ_on_sharded_activations_only(sequence_parallel):
    """As Megatron's RNG tracker: attention dropout acts on this rank's heads and, with sequence
    parallelism, hidden dropout on this rank's tokens, so tensor-parallel ranks draw different masks
    there (the same mask on two shards would correlate heads or positions a single device draws
    independently); hidden dropout of replicated activations draws the same mask on every rank, or the
    replicas would stop being copies of each other. Per layer: attention probabilities, then the
    two hidden dropouts."""
    rank0, rank1 = run_distributed(_dropout_masks, 2, sequence_parallel)[0]
    assert len(rank0) == len(rank1) == 3 * ModelConfig.from_preset("doge-tiny").num_hidden_layers
    for call, (mask0, mask1) in enumerate(zip(rank0, rank1)):
        sharded = call % 3 == 0 or sequence_parallel
        assert torch.equal(mask0, mask1) != sharded, f"dropout call {call}: sharded={sharded}"


def _compiled_and_eager(rank, world_size):
    from megatron.core import parallel_state

    from doge_dist.model.compile import compile_model
    from doge_dist.parallel.tensor import parallelize_tensor

    initialize_parallel(ParallelConfig(tensor_parallel=world_size))
    group = parallel_state.get_tensor_model_parallel_group()
    torch.manual_seed(0)
    single = build_model(ModelConfig.from_preset("doge-tiny", num_hidden_layers=1))  # one layer to compile is enough
    eager, compiled = (parallelize_tensor(copy.deepcopy(single), group) for _ in range(2))
    compile_model(compiled)
    ids = unique_tokens(2, 16, single.config.vocab_size)
    losses = []
    for model in (eager, compiled):
        out = model(ids)
        total, count = model.loss_sum(out.logits, shift_labels(ids))
        (total / count).backward()
        losses.append((total / count).item())
    worst_grad = max((p.grad - q.grad).abs().max().item() for p, q in zip(eager.parameters(), compiled.parameters()))
    return losses, worst_grad


def test_compiled_tensor_parallel_layers_equal_eager_ones():
    """train.compile with tensor parallelism: dt_proj's all-reduce of partial sums (HeadLocalDtProj)
    compiles (megatron's all-reduces its input in place and returns it, which the compiled
    autograd refused for a view modified in place)."""
    for (eager, compiled), worst_grad in run_distributed(_compiled_and_eager, 2):
        assert compiled == pytest.approx(eager, rel=1e-6)
        assert worst_grad <= 1e-6
