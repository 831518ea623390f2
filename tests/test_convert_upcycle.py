"""Upcycling a dense Doge to CDMoE keeps the dense function exactly at step 0."""
import re
import subprocess

import pytest
import torch

from doge_dist.config import ConfigError, ModelConfig
from doge_dist.convert.hf import load_hf, save_hf
from doge_dist.convert.upcycle import is_new_moe_parameter, upcycle, upcycle_to_hf
from doge_dist.model import build_model
from model_helpers import perturb_all, unique_tokens
from train_helpers import PYTHON, REPO, env


def test_upcycled_logits_equal_dense_logits_exactly():
    dense = build_model(ModelConfig.from_preset("doge-tiny"))
    perturb_all(dense)
    moe = upcycle(dense, ModelConfig.from_preset("doge-tiny-moe"))
    ids = unique_tokens(2, 16, 512)
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, dense(ids).logits)
    new = [n for n, _ in moe.named_parameters() if is_new_moe_parameter(n)]
    assert len(new) == 3 * 2  # router, down_embed, up_embed in both layers


def test_shape_mismatch_is_named():
    dense = build_model(ModelConfig.from_preset("doge-tiny"))
    with pytest.raises(ConfigError, match="model.hidden_size differs"):
        upcycle(dense, ModelConfig.from_preset("doge-tiny-moe", hidden_size=128))
    with pytest.raises(ConfigError, match="not a MoE config"):
        upcycle(dense, ModelConfig.from_preset("doge-tiny"))



def test_rope_scaling_keys_that_change_nothing_are_not_a_mismatch():
    """The presets' rope_scaling (the published models') carries original_max_position_embeddings, which
    dynamic NTK does not read; a dense model saved without it was refused as another shape. The type and
    factor still decide: the MoE model computes the dense function past max_position_embeddings, and
    another factor is refused."""
    from doge_dist.config import PUBLISHED_ROPE_SCALING

    dynamic = {"rope_type": "dynamic", "factor": 4.0}
    dense = build_model(ModelConfig.from_preset("doge-tiny", max_position_embeddings=8, rope_scaling=dynamic))
    perturb_all(dense)
    moe = upcycle(dense, ModelConfig.from_preset("doge-tiny-moe", max_position_embeddings=8, rope_scaling=PUBLISHED_ROPE_SCALING))
    ids = unique_tokens(2, 16, 512)
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, dense(ids).logits)
    with pytest.raises(ConfigError, match="model.rope_scaling differs"):
        upcycle(dense, ModelConfig.from_preset("doge-tiny-moe", max_position_embeddings=8,
                                               rope_scaling={**PUBLISHED_ROPE_SCALING, "factor": 2.0}))


def test_a_dense_model_saved_without_the_cache_flag_upcycles():
    """use_cache: false (how fine-tuned directories often come) says nothing of the shape or the function."""
    dense = build_model(ModelConfig.from_preset("doge-tiny", use_cache=False))
    perturb_all(dense)
    moe = upcycle(dense, ModelConfig.from_preset("doge-tiny-moe"))
    ids = unique_tokens(2, 16, 512)
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, dense(ids).logits)


def test_every_shape_mismatch_is_named_with_all_its_overrides():
    """The demo's dense shape differs from doge-tiny-moe in four fields: the error gave one at a time, so
    the user reran (consolidating the checkpoint each time) four times to find the whole command."""
    dense = build_model(ModelConfig.from_preset("doge-tiny", vocab_size=640, num_hidden_layers=1))
    with pytest.raises(ConfigError, match=re.escape("model.vocab_size=640 model.num_hidden_layers=1")):
        upcycle(dense, ModelConfig.from_preset("doge-tiny-moe"))

def test_dense_model_of_no_preset_shape_upcycles_with_model_overrides(tmp_path):
    """launch/upcycle.py's model.key=value overrides: the demo's doge_tiny_cpu.yaml shape is no preset."""
    dense = build_model(ModelConfig.from_preset("doge-tiny", vocab_size=640, num_hidden_layers=1))
    perturb_all(dense)
    save_hf(dense, tmp_path / "dense")
    with pytest.raises(ConfigError, match=r"override them \(model.vocab_size=640 model.num_hidden_layers=1\)"):
        upcycle_to_hf(str(tmp_path / "dense"), "doge-tiny-moe", str(tmp_path / "moe"))
    with pytest.raises(ConfigError, match="must all be model.key=value"):
        upcycle_to_hf(str(tmp_path / "dense"), "doge-tiny-moe", str(tmp_path / "moe"), overrides=["train.lr=1"])
    command = [PYTHON, str(REPO / "launch" / "upcycle.py"), "--checkpoint", str(tmp_path / "dense"),
               "--preset", "doge-tiny-moe", "--output", str(tmp_path / "moe"), "model.vocab_size=640", "model.num_hidden_layers=1"]
    subprocess.run(command, cwd=REPO, env=env(), check=True, capture_output=True, text=True)
    moe = load_hf(tmp_path / "moe")
    ids = unique_tokens(2, 16, 640)
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, dense(ids).logits)


@pytest.mark.parametrize("preset,overrides,output,error", [
    ("doge-tiny-mo", [], "moe", "Unknown model preset 'doge-tiny-mo'. Did you mean 'doge-tiny-moe'"),
    ("doge-tiny-moe", ["model.hidden_sise=64"], "moe", "hidden_sise"),
    ("doge-tiny", [], "moe", "not a MoE config"),
    ("doge-tiny-moe", [], "run", "exists and is not a Hugging Face model directory"),
])
def test_bad_preset_override_or_output_fails_before_the_dense_model_is_loaded(preset, overrides, output, error, tmp_path, monkeypatch):
    """Loading (for a run: consolidating a checkpoint) takes a while for a large model; what can be
    checked without it is checked first, as export_hf does."""
    from doge_dist.train import export

    def never(*args, **kwargs):
        raise AssertionError("the dense model was loaded before the arguments were checked")

    monkeypatch.setattr(export, "load_checkpoint_model", never)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run directory is no export: never overwritten
    with pytest.raises(ConfigError, match=re.escape(error)):
        upcycle_to_hf(str(tmp_path / "run"), preset, str(tmp_path / output), overrides=overrides)


@pytest.mark.parametrize("saved,error", [
    (ModelConfig.from_preset("doge-tiny", hidden_size=128), "model.hidden_size differs"),
    (ModelConfig.from_preset("doge-tiny-moe"), "already a MoE model"),
])
def test_a_checkpoint_of_another_shape_or_a_moe_one_is_refused_before_it_is_loaded(saved, error, tmp_path, monkeypatch):
    """The dense model's config is in its checkpoint's meta file (or config.json): a checkpoint that cannot
    be upcycled to the preset is refused without consolidating it (a tensor- or expert-parallel ZeRO 1-3
    checkpoint would first be converted to a universal one, the size of its optimizer states)."""
    import json

    from doge_dist.train import export

    def never(*args, **kwargs):
        raise AssertionError("the dense model was loaded before it was checked against the MoE config")

    monkeypatch.setattr(export, "load_checkpoint_model", never)
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "doge_meta.json").write_text(json.dumps({"step": 4, "model": saved.to_dict()}))
    (step.parent / "latest").write_text(step.name)
    with pytest.raises(ConfigError, match=re.escape(error)):
        upcycle_to_hf(str(tmp_path / "run"), "doge-tiny-moe", str(tmp_path / "moe"))


@pytest.mark.parametrize("made", ["nothing", "a run without checkpoints"])
def test_a_missing_dense_model_is_named_by_the_flag_that_gave_it(made, tmp_path):
    """launch/upcycle.py takes the dense model as --checkpoint: the error says so, not run.init_from."""
    if made != "nothing":
        (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=r"^--checkpoint = "):
        upcycle_to_hf(str(tmp_path / "run"), "doge-tiny-moe", str(tmp_path / "moe"))


def test_upcycle_on_a_full_disk_is_one_error_with_exit_code_4(tmp_path):
    """As launch/export_hf.py: a write that fails (here a file size limit, as ``ulimit -f`` sets; a full
    disk alike) is one paragraph and exit code 4, not a traceback; nothing is left behind."""
    import resource

    save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "dense")
    limit = 64 * 1024  # the dense tiny model's weights are 430 kB
    result = subprocess.run(
        [PYTHON, str(REPO / "launch" / "upcycle.py"), "--checkpoint", str(tmp_path / "dense"), "--preset", "doge-tiny-moe",
         "--output", str(tmp_path / "moe")], cwd=REPO, env=env(), capture_output=True, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: Writing the Hugging Face export {tmp_path / 'moe'} failed" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_upcycle_refuses_a_seed_out_of_range_before_loading_the_model(tmp_path):
    """A --seed past 64 bits was an overflow traceback from torch.manual_seed after the dense model had been
    loaded; checked when parsed, as launch/generate.py does (the dense model here does not even exist)."""
    result = subprocess.run([PYTHON, str(REPO / "launch" / "upcycle.py"), "--checkpoint", str(tmp_path / "missing"),
                             "--preset", "doge-tiny-moe", "--output", str(tmp_path / "moe"), "--seed", str(2**64)],
                            cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"--seed must be a 64-bit integer, got {2**64}" in result.stderr


def test_the_dense_source_is_never_the_output(tmp_path):
    """An export replaces an earlier export: --output equal to the dense HF directory replaced the model it upcycled."""

    save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "dense")
    with pytest.raises(ConfigError, match="is the dense model being upcycled"):
        upcycle_to_hf(str(tmp_path / "dense"), "doge-tiny-moe", str(tmp_path / "dense" / "."))
    assert (tmp_path / "dense" / "model.safetensors").is_file()


def test_a_step_of_a_hugging_face_directory_is_refused(tmp_path):
    """An HF directory has no steps: --step was ignored and the directory's one model upcycled, as if the
    asked-for step had been found."""
    save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "dense")
    with pytest.raises(ConfigError, match=re.escape(f"--step 200: --checkpoint '{tmp_path / 'dense'}' is a Hugging Face directory")):
        upcycle_to_hf(str(tmp_path / "dense"), "doge-tiny-moe", str(tmp_path / "moe"), step=200)
    assert not (tmp_path / "moe").exists()


def test_a_dense_head_dim_of_its_own_is_named():
    """A head_dim that does not tile hidden_size is part of the shape: the MoE target must take it too."""
    dense = build_model(ModelConfig.from_preset("doge-tiny", head_dim=8))
    with pytest.raises(ConfigError, match=re.escape("override it (model.head_dim=8)")):
        upcycle(dense, ModelConfig.from_preset("doge-tiny-moe"))


RELATIVE_TOKENIZER = "data:\n  tokenizer: data/tokenizer/tokenizer.model\n"


@pytest.mark.parametrize("config_yaml,tokenizer,error", [
    (None, None, "No tokenizer known for"),  # a step directory without its run's config.yaml
    (RELATIVE_TOKENIZER, None, "run from that directory, or pass --tokenizer"),
    (None, "missing", "does not exist"),
    (None, "512 ids", "has 512 ids but the model's vocab_size is 256"),
], ids=["no config.yaml", "relative data.tokenizer", "missing --tokenizer", "foreign --tokenizer"])
def test_the_tokenizer_is_found_and_checked_before_the_checkpoint_is_consolidated(config_yaml, tokenizer, error,
                                                                                  tmp_path, monkeypatch):
    """As export_hf: a run's tokenizer not found from here told the user to pass --tokenizer, which
    upcycle.py did not have, after consolidating the checkpoint; a run without config.yaml was upcycled
    into a directory without tokenizer files, silently."""
    import json

    from data_helpers import assets
    from doge_dist.data import DataError
    from doge_dist.train import export

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was consolidated before the tokenizer was checked")

    monkeypatch.setattr(export, "load_checkpoint_model", never)
    monkeypatch.chdir(tmp_path)
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "doge_meta.json").write_text(json.dumps({"step": 4, "model": ModelConfig.from_preset("doge-tiny", vocab_size=256).to_dict()}))
    (step.parent / "latest").write_text(step.name)
    if config_yaml:
        (tmp_path / "run" / "config.yaml").write_text(config_yaml)
    path = {None: None, "missing": str(tmp_path / "missing.model"), "512 ids": str(assets().tokenizer_model)}[tokenizer]
    with pytest.raises((ConfigError, DataError), match=re.escape(error)):
        upcycle_to_hf(str(tmp_path / "run"), "doge-tiny-moe", str(tmp_path / "moe"), overrides=["model.vocab_size=256"],
                      tokenizer=path)


def test_upcycle_writes_the_tokenizer_given_as_tokenizer(tmp_path):
    """launch/upcycle.py --tokenizer, as export_hf.py's: the tokenizer written into --output."""
    from data_helpers import assets

    save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "dense")  # no tokenizer of its own
    command = [PYTHON, str(REPO / "launch" / "upcycle.py"), "--checkpoint", str(tmp_path / "dense"), "--preset",
               "doge-tiny-moe", "--output", str(tmp_path / "moe"), "--tokenizer", str(assets().tokenizer_model)]
    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "moe" / "tokenizer_config.json").is_file() and (tmp_path / "moe" / "model.safetensors").is_file()
