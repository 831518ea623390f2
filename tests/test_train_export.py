"""launch/export_hf.py: a ZeRO-2 (2 ranks) and a ZeRO-0 checkpoint become Hugging Face directories
that AutoModelForCausalLM/AutoTokenizer load without remote code, with logits equal to ours; an HF
directory or a checkpoint of any ZeRO stage initialises a new run (run.init_from) with the same weights."""
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from doge_dist.model import build_model
from doge_dist.model.generate import generate
from doge_dist.train.export import load_checkpoint_model
from train_helpers import PYTHON, REPO, env, losses, pretrain, scalars, scratch, single_process_run, two_rank_run


def _export(run_dir, output):
    result = subprocess.run([PYTHON, "launch/export_hf.py", "--checkpoint", str(run_dir), "--output", str(output)],
                            cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("source", ["zero2", "zero0"])
def test_export_loads_in_transformers_with_equal_logits(source):
    run_dir = two_rank_run(2, "deepspeed") if source == "zero2" else single_process_run()
    output = scratch() / f"hf_{source}"
    _export(run_dir, output)
    hf = AutoModelForCausalLM.from_pretrained(output, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    ours = load_checkpoint_model(run_dir).eval()
    ids = torch.tensor([tokenizer("The list of attributes is")["input_ids"]])
    with torch.no_grad():
        expected = ours(ids).logits
        assert torch.allclose(hf(ids).logits, expected, atol=1e-4, rtol=1e-4)
    torch.manual_seed(233)  # the run's seed: the exported weights are the trained ones, not the initial ones
    fresh = build_model(ours.config)
    assert not torch.allclose(fresh.model.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_cached_generation_equals_full_recompute():
    model = load_checkpoint_model(single_process_run()).eval()
    prompt = torch.tensor([[1, 40, 41, 42]])
    out = generate(model, prompt, max_new_tokens=8, temperature=0)
    ids = prompt
    for _ in range(8):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("init", ["hf", "checkpoint"])
def test_init_from_starts_from_the_given_weights(init):
    """run.init_from: an HF directory, or a run's checkpoint (continue mode, with its optimizer states,
    a fresh schedule and fresh data position)."""
    output = scratch() / "hf_zero0"
    if init == "hf" and not output.is_dir():
        _export(single_process_run(), output)
    source = output if init == "hf" else single_process_run()
    run_dir = scratch() / f"from_{init}"
    result = pretrain(run_dir, 0, nproc=1, launcher="python", max_steps=2, warmup_steps=1, decay_steps=0, eval_interval=0,
                      **{"run.init_from": str(source), "run.init_optimizer": str(init == "checkpoint").lower()})
    assert f"from the weights of {'the Hugging Face directory ' if init == 'hf' else ''}{source}" in result.stdout
    # the continued run's first loss is the trained model's: far below a fresh start's
    assert losses(run_dir)[0] < losses(single_process_run())[0] - 0.3
    assert scalars(run_dir, "train/lr")[1] == 0.0  # a fresh WSD starts its re-warmup at 0


def test_init_from_weights_of_any_zero_stage():
    """Weights only (run.init_optimizer false): a checkpoint's consolidated fp32 weights, whatever
    ZeRO stage saved it and whatever stage the new run uses (DeepSpeed's module-only load reads only
    its own stage's files)."""
    zero2, zero3 = two_rank_run(2, "deepspeed"), two_rank_run(3, "torchrun")
    first = {}
    for source, stage in (("zero2", 3), ("zero2", 0), ("zero3", 0)):
        run_dir = scratch() / f"weights_{source}_to_zero{stage}"
        pretrain(run_dir, stage, nproc=1, launcher="python", max_steps=2, warmup_steps=1, decay_steps=0, eval_interval=0,
                 **{"run.init_from": str(zero2 if source == "zero2" else zero3)})
        first[source, stage] = losses(run_dir)[0]
    assert first["zero2", 3] == pytest.approx(first["zero2", 0], rel=1e-6)  # the same weights, the same batch
    assert first["zero3", 0] == pytest.approx(first["zero2", 0], rel=1e-4)  # two runs that agree to 2e-5 a step
    assert first["zero2", 0] < losses(single_process_run())[0] - 0.3  # trained weights, not a fresh start


def test_a_run_tokenizer_not_found_from_here_names_the_way_out(tmp_path, monkeypatch):
    """config.yaml keeps data.tokenizer as given (relative to where the run started): exporting or
    sampling from another directory says so and names --tokenizer."""
    import json

    from doge_dist.config import ConfigError
    from doge_dist.train.export import run_tokenizer_path

    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000001" / "doge_meta.json").write_text(json.dumps({"step": 1}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000001")
    (tmp_path / "run" / "config.yaml").write_text("data:\n  tokenizer: data/tokenizer/tokenizer.model\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"relative to the directory the run was started in\): run from that directory, or pass --tokenizer"):
        run_tokenizer_path(tmp_path / "run")
    (tmp_path / "data" / "tokenizer").mkdir(parents=True)
    (tmp_path / "data" / "tokenizer" / "tokenizer.model").touch()
    assert run_tokenizer_path(tmp_path / "run") == "data/tokenizer/tokenizer.model"
