"""The communication volume bench.py reports: counted collectives of a real TP step equal the analytic
formula, for dense and MoE models, with and without sequence parallelism."""
import copy

import pytest
import torch

from doge_dist.config import ModelConfig, ParallelConfig
from doge_dist.parallel.comm_volume import analytic_tp_bytes, moe_exchange_bytes
from dist_helpers import run_distributed

SHAPES = {"dense": ("doge-tiny", {}), "moe": ("doge-tiny-moe", {})}


def _measure(rank, world_size):
    from megatron.core import parallel_state

    from doge_dist.model import build_model, shift_labels
    from doge_dist.parallel.comm_volume import CollectiveCounter
    from doge_dist.parallel.state import initialize_parallel
    from doge_dist.parallel.tensor import parallelize_tensor

    initialize_parallel(ParallelConfig(tensor_parallel=world_size))
    group = parallel_state.get_tensor_model_parallel_group()
    measured = {}
    for name, (preset, overrides) in SHAPES.items():
        config = ModelConfig.from_preset(preset, **overrides)
        torch.manual_seed(0)
        single = build_model(config)
        for sequence_parallel in (False, True):
            model = parallelize_tensor(copy.deepcopy(single), group, sequence_parallel)
            ids = torch.randint(3, config.vocab_size, (2, 16))
            counter = CollectiveCounter(group)
            with counter.counting():
                out = model(ids)
                total, count = model.loss_sum(out.logits, shift_labels(ids))
                loss = total / count + (out.balance_loss if config.is_moe else 0)
                loss.backward()
            measured[(name, sequence_parallel)] = counter.sent
    return measured


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure, 2)[0]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_counted_tp_bytes_equal_the_formula(measured, shape, sequence_parallel):
    preset, overrides = SHAPES[shape]
    config = ModelConfig.from_preset(preset, **overrides)
    expected = analytic_tp_bytes(config, tokens=2 * 16, tp=2, sequence_parallel=sequence_parallel)
    assert measured[(shape, sequence_parallel)] == pytest.approx(expected, rel=1e-9)


def test_moe_exchange_volume_is_within_a_few_percent_of_all_to_all_for_doge_shapes():
    """k = 64 experts per token reach every one of EP <= 8 ranks, so gathering all tokens costs what an
    all-to-all dispatch does; the extra is the routing weights and ids."""
    config = ModelConfig.from_preset("doge-1.4b-moe")
    for ep in (2, 4, 8):
        volume = moe_exchange_bytes(config, tokens=2048, ep=ep)
        assert volume["all_to_all"] <= volume["gather_reduce_scatter"] <= 1.07 * volume["all_to_all"]
