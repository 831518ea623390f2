"""Hugging Face export/import: transformers loads our export with equal logits; round trips are exact."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import safetensors.torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from doge_dist.config import ConfigError, ModelConfig
from doge_dist.convert.hf import OLD_KEY_NAMES, ExportWriteError, load_hf, save_hf
from doge_dist.model import build_model
from model_helpers import model_pair, unique_tokens


@pytest.mark.parametrize("preset, overrides", [("doge-tiny", {}), ("doge-tiny-moe", {"router_layout": "hf_compat"}),
                                               ("doge-tiny", {"tie_word_embeddings": False, "max_position_embeddings": 8,
                                                              "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}),
                                               ("doge-tiny", {"rope_theta": 500.0, "rms_norm_eps": 1e-3}),
                                               ("doge-tiny", {"head_dim": 8})])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, preset, overrides):
    """transformers' DogeAttention takes config.head_dim, also one that does not tile hidden_size (o_proj maps
    heads x head_dim back to it); the export carries it in config.json, as it carries rope_theta, the norms'
    eps and the dynamic rope scaling (16 tokens past 8 positions: in use); our import reads them back."""
    from transformers import AutoModelForCausalLM

    ours, _ = model_pair(ModelConfig.from_preset(preset, **overrides))
    save_hf(ours, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(loaded).__name__ == "DogeForCausalLM"
    back = load_hf(tmp_path / "hf").eval()
    assert {key: getattr(back.config, key) for key in overrides} == overrides
    written = json.loads((tmp_path / "hf" / "config.json").read_text())  # transformers 4.x reads only these two
    assert (written["rope_theta"], written["rope_scaling"]) == (back.config.rope_theta, back.config.rope_scaling)
    ids = unique_tokens(2, 16, 512)
    with torch.no_grad():
        expected = ours.eval()(ids).logits
        assert (expected - loaded(ids).logits).abs().max() <= 1e-5
        assert (expected - back(ids).logits).abs().max() <= 1e-5


def test_import_then_export_returns_identical_tensors(tmp_path):
    ours, _ = model_pair(ModelConfig.from_preset("doge-tiny-moe"))
    save_hf(ours, tmp_path / "a")
    again = load_hf(tmp_path / "a", router_layout="split")
    assert again.config.router_layout == "split" and again.config.is_moe
    save_hf(again, tmp_path / "b")
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "doge"


def _small_doge_directory(path: Path):
    """A v1 model (per-query-head bias, no q/k norms) saved under small-doge's own key names; returns the model."""
    config = ModelConfig.from_preset("doge-tiny", attention_variant="v1")
    torch.manual_seed(0)
    ours = build_model(config)
    old_names = {v: k for k, v in OLD_KEY_NAMES.items()}
    state = {".".join(old_names.get(p, p) for p in k.split(".")): v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    # small-doge kept each residual scale in a module of its own: model.layers.N.pre_residual.weight
    state = {k + ".weight" if k.endswith(("pre_residual", "post_residual")) else k: v for k, v in state.items()}
    assert "model.layers.0.pre_residual.weight" in state and "model.layers.0.post_residual.weight" in state
    assert "model.word_embed.weight" in state
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    hf_config = {k: v for k, v in config.to_dict().items() if k not in ("attention_variant", "router_layout", "balance_loss", "attn_backend")}
    (path / "config.json").write_text(json.dumps({**hf_config, "model_type": "doge"}))
    return ours


def test_import_accepts_small_doge_key_names_and_detects_v1(tmp_path):
    ours = _small_doge_directory(tmp_path / "old")
    loaded = load_hf(tmp_path / "old")
    assert loaded.config.attention_variant == "v1"
    ids = unique_tokens(1, 12, 512)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_fine_tuning_from_a_small_doge_directory_builds_its_v1_model(tmp_path):
    """SFT/DPO build the model run.init_from's directory describes (model_config_of): a small-doge v1
    directory must give a v1 model that takes its weights; it gave v2, and the run failed on A's shape
    after its process groups had started, saying the weights did not match their config."""
    from doge_dist.train.engine import initial_model
    from doge_dist.train.finetune import model_config_of

    ours = _small_doge_directory(tmp_path / "old")
    config = model_config_of(str(tmp_path / "old"))
    assert config.attention_variant == "v1"
    run = SimpleNamespace(model=config, run=SimpleNamespace(init_from=str(tmp_path / "old")))
    ids = unique_tokens(1, 12, 512)
    with torch.no_grad():
        assert torch.equal(initial_model(run)(ids).logits, ours(ids).logits)


def test_a_config_it_cannot_load_is_refused_before_the_weights_are_read(tmp_path, monkeypatch):
    """launch/generate.py and load_hf read config.json and the tensor names first: a config this model cannot
    compute (here YaRN RoPE) is refused before gigabytes of weights are read."""
    save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    config_file.write_text(json.dumps(config))

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the config was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", no_weights)
    with pytest.raises(ConfigError, match="rope_scaling.rope_type = 'yarn'"):
        load_hf(tmp_path / "hf")


def test_not_doge_and_mismatched_shapes_are_named(tmp_path):
    ours, _ = model_pair(ModelConfig.from_preset("doge-tiny"))
    save_hf(ours, tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="not 'doge'"):
        load_hf(tmp_path / "hf")
    config_file.write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\)"):
        load_hf(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)


def test_v1_export_is_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="v1"):
        save_hf(build_model(ModelConfig.from_preset("doge-tiny", attention_variant="v1")), tmp_path / "x")


def test_export_replaces_only_an_earlier_export_or_an_empty_directory(tmp_path):
    """A mistyped output (here the run directory itself) is refused, not deleted."""
    model = build_model(ModelConfig.from_preset("doge-tiny"))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        save_hf(model, run_dir)
    assert (run_dir / "checkpoints").is_dir()
    (tmp_path / "empty").mkdir()
    for output in ("hf", "hf", "empty"):  # a new directory, an earlier export, an empty directory
        assert (save_hf(model, tmp_path / output) / "config.json").is_file()


def test_an_export_into_the_current_directory(tmp_path, monkeypatch):
    """``--output .`` (export_hf.py, upcycle.py): an empty current directory is a valid output, but the
    export died after all its work with "PosixPath('.') has an empty name" (the temporary directory is
    named after the output's)."""
    model = build_model(ModelConfig.from_preset("doge-tiny"))
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    assert save_hf(model, ".") == tmp_path / "out"
    assert load_hf(tmp_path / "out").config == model.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_corrupt_config_or_weights_are_named(tmp_path):
    save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(100)
    with pytest.raises(ConfigError, match="model.safetensors cannot be read as safetensors"):
        load_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{bad")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_hf(tmp_path / "hf")


def test_a_transformers_directory_with_a_sliding_window_is_refused(tmp_path):
    """transformers masks keys beyond sliding_window; our attention does not, so loading it would change the function."""
    save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "sliding_window": 6}))
    with pytest.raises(ConfigError, match="sliding_window = 6"):
        load_hf(tmp_path / "hf")


def test_config_values_are_type_checked_and_a_null_dropout_is_the_default(tmp_path):
    """transformers loads "attention_dropout": null (DogeConfig types it float | None, 0.0 outside training);
    the import raised a TypeError from the validation. It takes the default now, and a value of the wrong
    type is a ConfigError naming the key and the file."""
    ours, _ = model_pair(ModelConfig.from_preset("doge-tiny", attention_dropout=0.1))
    save_hf(ours, tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    written = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**written, "attention_dropout": None}))
    loaded = load_hf(tmp_path / "hf")
    assert loaded.config.attention_dropout == 0.0
    ids = unique_tokens(2, 16, 512)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, ours.eval()(ids).logits)
    config_file.write_text(json.dumps({**written, "rms_norm_eps": None}))
    with pytest.raises(ConfigError, match=f"Key 'rms_norm_eps' in {config_file} must be a number, got None"):
        load_hf(tmp_path / "hf")


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face tokenizer directory"):
        save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "hf", tokenizer=tmp_path / "tokenizer.model")
    assert list(tmp_path.iterdir()) == []


def test_an_export_killed_while_replacing_an_earlier_one_leaves_a_whole_export(tmp_path, monkeypatch):
    """The process dies while it deletes files (here after the weights): the output directory is then
    still a loadable export, the earlier or the new one, never one without its weights."""
    class Killed(BaseException):
        pass

    def rmtree_killed_part_way(path, ignore_errors=False):
        if Path(path).exists():
            (Path(path) / "model.safetensors").unlink()
            raise Killed()

    torch.manual_seed(0)
    earlier = save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "hf")
    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_part_way)
    torch.manual_seed(1)
    with pytest.raises(Killed):
        save_hf(build_model(ModelConfig.from_preset("doge-tiny")), earlier)
    assert load_hf(earlier).config.hidden_size == ModelConfig.from_preset("doge-tiny").hidden_size


def test_an_export_on_a_full_disk_is_one_error_and_keeps_the_earlier_export(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    earlier = save_hf(build_model(ModelConfig.from_preset("doge-tiny")), tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(ExportWriteError, match=r"Writing the Hugging Face export .*hf failed: SafetensorError: .*"
                                               r"No space left on device .*the earlier export there is untouched\."):
        save_hf(build_model(ModelConfig.from_preset("doge-tiny")), earlier)
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no partial directory beside it


def test_moe_router_layout_is_recorded_and_a_foreign_moe_directory_keeps_transformers_routing(tmp_path):
    """Our MoE export records its router in config.json, so load_hf keeps it; a MoE directory without the
    key (transformers', small-doge's) loads with transformers' cross-token router, the function it computes."""
    import warnings

    from transformers import AutoModelForCausalLM

    ours, _ = model_pair(ModelConfig.from_preset("doge-tiny-moe"))
    with pytest.warns(UserWarning, match="cross-token reshape"):
        save_hf(ours, tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["router_layout"] == "split"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_hf(tmp_path / "hf").config.router_layout == "split"
    del config["router_layout"]
    config_file.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="not written by doge-dist: loaded with transformers' cross-token router"):
        foreign = load_hf(tmp_path / "hf")
    assert foreign.config.router_layout == "hf_compat"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = unique_tokens(2, 16, 512)
    with torch.no_grad():
        assert (foreign.eval()(ids).logits - reference(ids).logits).abs().max() <= 1e-5
    assert load_hf(tmp_path / "hf", router_layout="split").config.router_layout == "split"


def test_moe_balance_loss_formula_survives_an_export(tmp_path):
    """The balance-loss formula a MoE model trains with is recorded beside its router, so SFT, DPO or a
    continued run from the export (load_hf) adds the same auxiliary loss; transformers ignores the key."""
    config = ModelConfig.from_preset("doge-tiny-moe")
    config.balance_loss = "hf_compat"
    ours, _ = model_pair(config)
    with pytest.warns(UserWarning, match="cross-token reshape"):
        save_hf(ours, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["balance_loss"] == "hf_compat"
    assert load_hf(tmp_path / "hf").config.balance_loss == "hf_compat"


def test_a_tokenizer_taken_from_a_sharded_model_directory_brings_no_weights(tmp_path):
    """save_hf(model, out, tokenizer=DIR) copies DIR's tokenizer files (launch/upcycle.py passes the dense
    model's own directory): a sharded directory's weight shards and index must stay behind, or the new
    directory holds the old model beside the new one and readers that follow the index load the old one."""
    from transformers import DogeForCausalLM

    from data_helpers import assets

    ours, _ = model_pair(ModelConfig.from_preset("doge-tiny"))
    save_hf(ours, tmp_path / "dense", tokenizer=str(assets().tokenizer_dir))
    DogeForCausalLM.from_pretrained(tmp_path / "dense").save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for file in (tmp_path / "dense").glob("tokenizer*"):
        shutil.copy2(file, tmp_path / "sharded" / file.name)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    save_hf(ours, tmp_path / "copy", tokenizer=tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert (tmp_path / "copy" / "tokenizer.json").is_file() and (tmp_path / "copy" / "tokenizer.model").is_file()


def test_an_export_takes_the_special_ids_of_its_tokenizer(tmp_path, capsys):
    """config.json kept the preset's eos/pad (1/2) beside a tokenizer whose eos/pad are 5/6: transformers'
    generate stopped at the wrong token. The export writes the tokenizer's ids, says so, updates a
    generation_config.json that came with the tokenizer files, and refuses ids outside the vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from data_helpers import assets

    tokenizer = AutoTokenizer.from_pretrained(assets().tokenizer_dir)
    tokenizer.eos_token, tokenizer.pad_token = tokenizer.convert_ids_to_tokens([5, 6])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2).save_pretrained(tmp_path / "tokenizer")
    model = build_model(ModelConfig.from_preset("doge-tiny"))
    save_hf(model, tmp_path / "hf", tokenizer=tmp_path / "tokenizer")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (0, 5, 6)
    assert "eos_token_id 1 -> 5, pad_token_id 2 -> 6" in capsys.readouterr().out
    generation = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").generation_config
    assert (generation.eos_token_id, generation.pad_token_id) == (5, 6)
    assert model.config.eos_token_id == 1  # the model itself is left as it is
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(300)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ConfigError, match=r"eos_token_id is 300, not an id of the model's vocabulary \(0 to 255\)"):
        save_hf(build_model(ModelConfig.from_preset("doge-tiny", vocab_size=256)), tmp_path / "small", tokenizer=tmp_path / "tokenizer")
    assert not (tmp_path / "small").exists()
