"""The communication volume bench.py reports: counted collectives of a real TP step equal the analytic
formula, for dense and MoE models and a dense one with biases, with and without sequence parallelism."""
import pytest

from doge_dist.config import ModelConfig
from doge_dist.parallel.comm_volume import analytic_tp_bytes, measure_tp_bytes, moe_exchange_bytes

SHAPES = {"dense": ("doge-tiny", {}), "moe": ("doge-tiny-moe", {}),
          "biased": ("doge-tiny", {"attention_bias": True, "mlp_bias": True})}  # o_proj/down_proj biases: sp sums their gradients
CASES = [(shape, sequence_parallel) for shape in SHAPES for sequence_parallel in (False, True)]


def config_of(shape: str) -> ModelConfig:
    preset, overrides = SHAPES[shape]
    return ModelConfig.from_preset(preset, **overrides)


@pytest.fixture(scope="module")
def measured():
    configs = [(config_of(shape), sp) for shape, sp in CASES]
    return dict(zip(CASES, measure_tp_bytes(configs, micro_batch=2, seq_length=16, tp=2)))


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_counted_tp_bytes_equal_the_formula(measured, shape, sequence_parallel):
    config = config_of(shape)
    expected = analytic_tp_bytes(config, tokens=2 * 16, tp=2, sequence_parallel=sequence_parallel)
    assert measured[(shape, sequence_parallel)] == pytest.approx(expected, rel=1e-9)


def test_moe_exchange_volume_is_within_a_few_percent_of_all_to_all_for_doge_shapes():
    """k = 64 experts per token reach every one of EP <= 8 ranks, so gathering all tokens costs what an
    all-to-all dispatch does; the extra is the routing weights and ids."""
    config = ModelConfig.from_preset("doge-1.4b-moe")
    for ep in (2, 4, 8):
        volume = moe_exchange_bytes(config, tokens=2048, ep=ep)
        assert volume["all_to_all"] <= volume["gather_reduce_scatter"] <= 1.07 * volume["all_to_all"]
