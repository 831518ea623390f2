"""train.compile: compiled decoder layers train like eager ones (same losses and gradient norms,
also under activation checkpointing) and serve every sequence length from the second on without
compiling again, and ZeRO-3 is refused before any work starts."""
import copy

import pytest
import torch

from doge_dist.config import ModelConfig
from doge_dist.model import build_model
from model_helpers import perturb_all, randomise_dynamic_mask, unique_tokens
from train_helpers import losses, pretrain, scalars, scratch, single_process_run


def test_compiled_layers_train_like_eager_ones():
    reference = single_process_run()
    run_dir = scratch() / "compiled"
    result = pretrain(run_dir, 0, nproc=1, launcher="python", micro_batch_size=2, gradient_accumulation_steps=2,
                      compile="true", activation_checkpointing="true", peak_tflops=0.5)
    assert "compiled layers" in result.stdout
    assert "| MFU n/a |" not in result.stdout and "% | ETA" in result.stdout  # train.peak_tflops given
    assert "freed host memory kept for reuse" in result.stdout  # CPU training: host_memory.keep_freed_memory
    assert len(losses(run_dir)) == 10
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5)
    norms, expected = scalars(run_dir, "train/grad_norm"), scalars(reference, "train/grad_norm")
    assert sorted(norms) == sorted(expected)
    assert [norms[s] for s in sorted(norms)] == pytest.approx([expected[s] for s in sorted(expected)], rel=1e-4)


def test_compile_with_zero3_is_refused_up_front():
    result = pretrain(scratch() / "compiled_zero3", 3, nproc=1, launcher="python", check=False, compile="true")
    assert result.returncode != 0
    assert "train.compile" in result.stderr and "ZeRO 0-2" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_compiled_layers_serve_every_length_past_the_keep_window(backend):
    """Fine-tuning pads each micro-batch to its longest sample, so the length changes. With more keys than
    keep_window_size, layer 0 built the layout's mask of allowed keys and the later layers read it (two
    graphs), and the flex threshold's loop over query chunks specialised the graph to the length: every
    new length compiled both again (8 graphs after 4 lengths, dynamo's limit). Now every layer takes
    the same graph, and lengths from the second on the graphs already compiled, with the uncompiled
    model's logits. (A cheap dynamo backend: what recompiles is decided before the backend.)"""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    from doge_dist.model.doge import DecoderLayer

    torch._dynamo.reset()
    torch.manual_seed(0)
    reference = build_model(ModelConfig.from_preset("doge-tiny", attn_backend=backend, keep_window_size=16)).eval()
    randomise_dynamic_mask(reference)
    perturb_all(reference)
    model = copy.deepcopy(reference)
    for layer in model.model.layers:  # compile_model's compile, with a cheap backend
        layer.compile(backend="aot_eager")
    graphs = []
    for length in (24, 32, 40, 48, 56, 64):
        ids = unique_tokens(2, length, 512, seed=length)
        with torch.no_grad():
            assert (model(ids).logits - reference(ids).logits).abs().max() <= 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1]
    assert len(_debug_get_cache_entry_list(DecoderLayer.forward.__code__)) == 2  # every layer: one length, then any
    torch._dynamo.reset()
