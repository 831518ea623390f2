"""train.compile: compiled decoder layers train like eager ones (same losses and gradient norms,
also under activation checkpointing), and ZeRO-3 is refused before any work starts."""
import pytest

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
