"""launch/export_hf.py: a ZeRO-2 (2 ranks) and a ZeRO-0 checkpoint become Hugging Face directories
that AutoModelForCausalLM/AutoTokenizer load without remote code, with logits equal to ours; an HF
directory or a checkpoint of any ZeRO stage initialises a new run (run.init_from) with the same weights."""
import functools
import json
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from doge_dist.model import build_model
from doge_dist.model.generate import generate
from doge_dist.train.export import load_checkpoint_model
from train_helpers import (PYTHON, REPO, base_overrides, concurrently, env, losses, pretrain, scalars, scratch, single_process_run,
                           two_rank_run)


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
    runs = {(source, stage): scratch() / f"weights_{source}_to_zero{stage}" for source, stage in (("zero2", 3), ("zero2", 0), ("zero3", 0))}
    concurrently(*(  # three independent one-process runs, at the same time
        functools.partial(pretrain, run_dir, stage, nproc=1, launcher="python", max_steps=2, warmup_steps=1, decay_steps=0,
                          eval_interval=0, **{"run.init_from": str(zero2 if source == "zero2" else zero3)})
        for (source, stage), run_dir in runs.items()))
    first = {key: losses(run_dir)[0] for key, run_dir in runs.items()}
    assert first["zero2", 3] == pytest.approx(first["zero2", 0], rel=1e-6)  # the same weights, the same batch
    assert first["zero3", 0] == pytest.approx(first["zero2", 0], rel=1e-4)  # two runs that agree to 2e-5 a step
    assert first["zero2", 0] < losses(single_process_run())[0] - 0.3  # trained weights, not a fresh start


@pytest.mark.parametrize("stage,nproc,fp32_accumulation", [(0, 1, False), (2, 2, False), (3, 3, False), (1, 1, True)])
def test_a_bf16_run_starts_from_the_exact_fp32_weights_of_init_from(stage, nproc, fp32_accumulation):
    """DeepSpeed casts the module to bf16 and made the fp32 master weights from that copy: a bf16 run
    from an fp32 HF directory trained on its weights rounded to bf16 (3.9e-3 off), and exported them.
    One bf16 step at lr 0 keeps the masters, so the checkpoint holds the directory's weights exactly.
    ZeRO-3 on 3 ranks: most parameters do not split evenly (engine.zero3_partition). ZeRO-1 with fp32
    gradient accumulation is DeepSpeed's BF16_Optimizer, whose checkpoint zero_to_fp32 cannot read
    (consolidated through the universal checkpoint)."""
    from doge_dist.config import ModelConfig
    from doge_dist.convert.hf import load_hf, save_hf

    source = scratch() / "hf_fp32_init"
    if not source.is_dir():
        torch.manual_seed(1)
        model = build_model(ModelConfig.from_preset("doge-tiny"))
        with torch.no_grad():
            for param in model.parameters():  # norms and residual scales start at exact ones and zeros
                param.add_(1e-3 * torch.rand_like(param))
        save_hf(model, source)
    run_dir = scratch() / f"bf16_lr0_zero{stage}{'_fp32_accumulation' * fp32_accumulation}"
    ds_config = None
    if fp32_accumulation:
        ds_config = scratch() / "zero1_fp32_accumulation.json"
        ds_config.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
                                         "data_types": {"grad_accum_dtype": "fp32"}}))
    pretrain(run_dir, stage, nproc=nproc, launcher="python" if nproc == 1 else "torchrun", bf16="true", lr=0.0, ds_config=ds_config,
             micro_batch_size=2, gradient_accumulation_steps=1, max_steps=1, warmup_steps=0, decay_steps=0, eval_interval=0,
             **{"run.init_from": str(source)})
    expected, saved = load_hf(source).state_dict(), load_checkpoint_model(run_dir).state_dict()
    assert saved.keys() == expected.keys()
    assert all(not torch.equal(w, w.bfloat16().float()) for w in expected.values())  # no weight is bf16 already
    assert [name for name in expected if not torch.equal(saved[name], expected[name])] == []


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


def _transformers_directory(path, **config):
    """A randomly initialised transformers DogeForCausalLM of doge-tiny's shape, saved with save_pretrained."""
    from transformers import DogeConfig, DogeForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, keep_window_size=256)
    DogeForCausalLM(DogeConfig(**shape, **config)).save_pretrained(path)
    return path


def test_init_from_a_transformers_directory_starts_at_its_loss_and_never_drops_its_lm_head():
    """A directory written by transformers' own save_pretrained with an untied LM head: a run of the same
    model starts at the loss transformers computes on the run's first batch; a run configured with tied
    embeddings (doge-tiny's) would throw the trained LM head away, and is refused before training."""
    from doge_dist.config import load_config
    from doge_dist.train.data import TrainData

    source = _transformers_directory(scratch() / "transformers_untied", tie_word_embeddings=False)
    tied = pretrain(scratch() / "from_transformers_tied", 0, nproc=1, launcher="python", check=False, max_steps=2,
                    warmup_steps=1, decay_steps=0, eval_interval=0, **{"run.init_from": str(source)})
    assert tied.returncode == 2, tied.stderr[-3000:]
    assert "model.tie_word_embeddings=false" in tied.stderr and "train/loss" not in tied.stdout

    run_dir = scratch() / "from_transformers_untied"
    overrides = {"run.init_from": str(source), "model.tie_word_embeddings": "false", "micro_batch_size": 2,
                 "gradient_accumulation_steps": 1, "max_steps": 2, "warmup_steps": 1, "decay_steps": 0, "eval_interval": 0}
    pretrain(run_dir, 0, nproc=1, launcher="python", **overrides)
    config = load_config(None, base_overrides(run_dir, **overrides))
    batch = TrainData(config, 0, 1, 0, str(scratch() / "data_cache")).next_step()[0]
    hf = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(batch["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert losses(run_dir)[0] == pytest.approx(expected.item(), rel=1e-5)


def test_a_continued_model_that_computes_another_function_is_named():
    """run.init_from's own config against the run's model section: an untied LM head into a tied model
    is an error (its weights would be dropped), as is another attention variant (they do not fit), any other field that changes what the weights compute
    (RoPE, norm epsilon, keep window, router) a warning naming both values."""
    import warnings

    from doge_dist.config import ConfigError, ModelConfig
    from doge_dist.train.finetune import check_continued_model

    saved = ModelConfig.from_preset("doge-tiny", tie_word_embeddings=False, rope_theta=5e5)
    with pytest.raises(ConfigError, match=r"src.*tie_word_embeddings.*model\.tie_word_embeddings=false"):
        check_continued_model(saved, ModelConfig.from_preset("doge-tiny"), "src")
    with pytest.raises(ConfigError, match=r"src.*attention_variant 'v1'.*model\.attention_variant=v1"):  # a small-doge directory
        check_continued_model(ModelConfig.from_preset("doge-tiny", attention_variant="v1"), ModelConfig.from_preset("doge-tiny"), "src")
    with pytest.warns(UserWarning, match=r"src.*model\.rope_theta=500000\.0.*this run has 10000\.0"):
        check_continued_model(saved, ModelConfig.from_preset("doge-tiny", tie_word_embeddings=False), "src")
    moe = ModelConfig.from_preset("doge-tiny-moe", router_layout="hf_compat")
    with pytest.warns(UserWarning, match=r"model\.router_layout='hf_compat'"):
        check_continued_model(moe, ModelConfig.from_preset("doge-tiny-moe"), "src")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same function (a tied model may untie; dropout, backends may change)
        check_continued_model(saved, ModelConfig.from_preset("doge-tiny", tie_word_embeddings=False, rope_theta=5e5,
                                                             hidden_dropout=0.1, attn_backend="eager"), "src")
        check_continued_model(ModelConfig.from_preset("doge-tiny"), ModelConfig.from_preset("doge-tiny", tie_word_embeddings=False), "src")


@pytest.mark.parametrize("tokenizer,error", [
    ("missing", "does not exist"),
    ("512 ids", "has 512 ids but the model's vocab_size is 256"),
])
def test_a_missing_or_foreign_tokenizer_is_refused_before_the_checkpoint_is_consolidated(tokenizer, error, tmp_path, monkeypatch):
    """--tokenizer is checked against the checkpoint's vocabulary (its meta file) before the weights are
    consolidated: a tokenizer with more ids than the model would make an export whose tokens index
    past the embedding in transformers."""
    import json
    import re

    from data_helpers import assets
    from doge_dist.config import ConfigError, ModelConfig
    from doge_dist.data import DataError
    from doge_dist.train import export

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was consolidated before the tokenizer was checked")

    monkeypatch.setattr(export, "load_checkpoint_model", never)
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "doge_meta.json").write_text(json.dumps({"step": 4, "model": ModelConfig.from_preset("doge-tiny", vocab_size=256).to_dict()}))
    (step.parent / "latest").write_text(step.name)
    path = str(tmp_path / "missing.model") if tokenizer == "missing" else str(assets().tokenizer_model)
    with pytest.raises((ConfigError, DataError), match=re.escape(error)):
        export.export_hf(tmp_path / "run", tmp_path / "hf", tokenizer=path)


def test_a_corrupt_config_json_of_init_from_is_named(tmp_path):
    """run.init_from's config.json is read before the model is built (its shape for SFT/DPO, its function
    for every run): a truncated file is a one-paragraph error naming it, not a JSONDecodeError traceback."""
    from doge_dist.config import ConfigError
    from doge_dist.train.finetune import model_config_of

    (tmp_path / "config.json").write_text('{"model_type": "doge", "hidden_size": 6')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        model_config_of(str(tmp_path))


def test_a_step_directory_with_another_step_is_refused():
    """export_hf.py --checkpoint .../step_00000005 --step 10 exported step 10 without a word."""
    from doge_dist.config import ConfigError
    from doge_dist.train.checkpoint import resolve_checkpoint

    step_5 = single_process_run() / "checkpoints" / "step_00000005"
    with pytest.raises(ConfigError, match=r"is the checkpoint of one step, step_00000005, and --step asks for 10"):
        resolve_checkpoint(step_5, 10)
    assert resolve_checkpoint(step_5, 5) == resolve_checkpoint(step_5) == (step_5.parent, "step_00000005")
    assert resolve_checkpoint(single_process_run(), 5) == (step_5.parent, "step_00000005")
