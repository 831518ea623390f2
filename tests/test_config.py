"""Config validation: bad input fails at config time with the key named and a fix suggested."""
import re

import pytest
import yaml

from doge_dist.config import ConfigError, ModelConfig, load_config
from doge_dist.model import build_model
from doge_dist.model.flops import parameter_count

PUBLISHED = {
    "doge-20m": 13_118_728,
    "doge-60m": 54_571_552,
    "doge-160m": 152_676_168,
    "doge-320m": 335_750_272,
    "doge-20m-moe": 17_444_104,
    "doge-120m-moe": 122_728_992,
    "doge-480m-moe": 495_953_736,
    "doge-1.4b-moe": 1_417_880_704,
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_parameter_counts_equal_the_published_table(preset):
    assert parameter_count(ModelConfig.from_preset(preset)) == PUBLISHED[preset]


@pytest.mark.parametrize("preset", ["doge-20m", "doge-20m-moe", "doge-tiny"])
def test_built_models_have_the_counted_parameters(preset):
    config = ModelConfig.from_preset(preset)
    assert sum(p.numel() for p in build_model(config).parameters()) == parameter_count(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hiden_size": 64}, "Did you mean 'hidden_size'"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of"),
        ({"hidden_size": 65}, "not divisible"),
        ({"head_dim": 15}, r"head_dim \(15\) must be even"),
        ({"head_dim": -4}, r"head_dim \(-4\) must be even and at least 2"),
        ({"hidden_size": 60, "num_attention_heads": 4, "num_key_value_heads": 2}, "even"),
        ({"is_moe": True, "num_experts": 1000}, "perfect square"),
        ({"attn_backend": "xformers"}, "attn_backend"),
        ({"router_layout": "reshape"}, "router_layout"),
        ({"num_attention_heads": 0}, r"num_attention_heads must be at least 1, got 0"),
        ({"num_key_value_heads": 0}, r"num_key_value_heads must be at least 1, got 0"),
        ({"hidden_size": 0}, r"hidden_size must be at least 1, got 0"),
        ({"sliding_window": 6}, "sliding_window = 6: doge-dist does not implement"),
    ],
)
def test_bad_model_config_is_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_preset("doge-tiny", **overrides)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'doge-20m'"):
        ModelConfig.from_preset("doge-20")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: doge-tiny\n  hidden_size: 128\ntrain:\n  lr: 0.01\n")
    config = load_config(str(path), ["train.max_steps=7", "model.num_hidden_layers=3"])
    assert (config.model.hidden_size, config.model.num_hidden_layers, config.train.max_steps) == (128, 3, 7)
    assert config.model.vocab_size == 512
    # an override's mistake is named as the override, not as the YAML file it is merged into
    with pytest.raises(ConfigError, match=r"Unknown key 'max_step' in the command-line override 'train.max_step=7'. Did you mean 'max_steps'"):
        load_config(str(path), ["train.max_step=7"])
    with pytest.raises(ConfigError, match=r"Key 'lr' in the command-line override 'train.lr=abc' must be a number"):
        load_config(str(path), ["train.lr=abc"])
    assert load_config(str(path), ["model.preset=doge-20m"]).model.hidden_size == 128  # preset is a model key
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"Config file '.*' is a directory; pass --config with a YAML file"):
        load_config(str(tmp_path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=abc", "Key 'max_steps' in the command-line override 'train.max_steps=abc' must be an integer, got 'abc'"),
        ("train.max_steps=20.5", "'max_steps' .* must be an integer, got 20.5"),
        ("train.micro_batch_size=", "'micro_batch_size' .* must be an integer, got None"),
        ("train.bf16=abc", "'bf16' .* must be true or false"),
        ("model.hidden_size=abc", "'hidden_size' .* must be an integer"),
        ("train.log_interval=0", "train.log_interval must be at least 1"),
        ("train.save_interval=-1", "train.save_interval must be 0"),
        ("train.freeze_dense_steps=-3", "train.freeze_dense_steps must be 0"),
        ("train.lr=-1", r"train.lr must be >= 0, got -1.0"),
        ("train.adam_beta2=1.5", r"train.adam_beta2 must be within \[0, 1\), got 1.5"),
        ("train.adam_eps=-1e-8", r"train.adam_eps must be > 0"),
        ("train.adam_eps=0", r"train.adam_eps must be > 0 \(AdamW divides by sqrt\(v\) \+ eps, .*\), got 0.0"),  # NaN weights
        ("train.seed=-1", r"train.seed must be within \[0, 2\*\*32\) \(numpy's seed range\), got -1"),
        ("train.seed=4294967296", r"train.seed must be within \[0, 2\*\*32\) .*, got 4294967296"),
        ("data.seed=-1", r"data.seed must be within \[0, 2\*\*32\) .*, got -1"),
        ("train.weight_decay=-0.1", r"train.weight_decay must be >= 0"),
        ("train.eval_iters=0", r"train.eval_iters must be at least 1 when train.eval_interval > 0"),
        ("train.peak_tflops=0", r"train.peak_tflops must be positive"),
        ("data.num_workers=-1", r"data.num_workers must be >= 0"),
        ("data.train_data=123", r"data.train_data must be a list of prefixes"),
        ("model.rope_scaling=dynamic", r"model.rope_scaling must be a mapping"),
        ("model.rope_scaling={rope_type: dynamic, factor: x}", r"model.rope_scaling.factor must be a number >= 1"),
        ("model.rope_theta=0", r"model.rope_theta must be positive"),
        ("model.attention_dropout=1.5", r"model.attention_dropout must be within \[0, 1\)"),
        ("train.keep_last=0", r"train.keep_last must be at least 1, got 0"),
        ("train.max_bad_steps=-1", r"train.max_bad_steps must be at least 1"),
        ("train.moe_stats_window=0", r"train.moe_stats_window must be at least 1, got 0"),
        ("model.initializer_range=-0.02", r"model.initializer_range must be >= 0"),
        ("model.router_aux_loss_coef=-1", r"model.router_aux_loss_coef must be >= 0"),
        ("model.pad_token_id=40000", r"model.pad_token_id = 40000 is not an id of the vocabulary \(0 to 32767\)"),
        ("train.lr=nan", r"Key 'lr' in the command-line override 'train.lr=nan' must be a finite number, got nan"),
        ("train.weight_decay=.inf", r"Key 'weight_decay' .* must be a finite number, got inf"),
        ("train.micro_batch_size=0", r"train.micro_batch_size must be at least 1, got 0"),
        ("train.gradient_accumulation_steps=0", r"train.gradient_accumulation_steps must be at least 1, got 0"),
        ("parallel.tensor_parallel=0", r"parallel.tensor_parallel must be at least 1 \(1: off\), got 0"),
        ("parallel.expert_parallel=-2", r"parallel.expert_parallel must be at least 1 \(1: off\), got -2"),
    ],
)
def test_values_of_the_wrong_type_or_range_name_the_key(override, message):
    """Refused when the config is read, not as a TypeError or ZeroDivisionError inside the run."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.eval_interval=10", override])


def test_seeds_at_the_ends_of_numpys_range_are_accepted():
    """train.seed and data.seed seed numpy, which takes 0 to 2**32 - 1 (outside it: refused above)."""
    config = load_config(None, ["train.seed=0", "data.seed=4294967295"])
    assert (config.train.seed, config.data.seed) == (0, 2**32 - 1)


def test_yaml_spellings_of_numbers_and_one_data_prefix_are_accepted():
    config = load_config(None, ["train.lr=3e-3", "train.max_steps=1e4", "train.warmup_steps=2.0e+2",
                                "data.train_data=data/sample_train_text_document", "data.split=100"])
    assert (config.train.lr, config.train.max_steps, config.train.warmup_steps) == (3e-3, 10000, 200)
    assert type(config.train.max_steps) is int
    assert config.data.train_data == ["data/sample_train_text_document"]  # not one prefix per character
    assert config.data.split == "100"


@pytest.mark.parametrize("text, message", [
    ("model: doge-20m\n", r"Section 'model' in config file '.*run.yaml' must be a mapping of keys, as in\nmodel:\n  preset: doge-20m\ngot str 'doge-20m'"),
    ("model:\n  - preset: doge-20m\n", r"Section 'model' .* must be a mapping of keys, as in\nmodel:\n  preset: doge-20m\ngot list"),
    ("train: 0.01\n", r"Section 'train' .* must be a mapping of keys, as in\ntrain:\n  key: value\ngot float 0.01"),
    ("model:\n  preset: [doge-20m]\n", r"model.preset in config file '.*run.yaml': model must be a preset name such as 'doge-20m', got \['doge-20m'\]"),
])
def test_a_section_that_is_not_a_mapping_is_named(tmp_path, text, message):
    """`model: doge-20m` (a preset name where the section belongs) was a ValueError traceback."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_a_key_given_twice_in_the_yaml_is_named(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section silently dropped the first."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.01\n  max_steps: 7\nmodel:\n  preset: doge-tiny\ntrain:\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match=r"run.yaml' gives 'train' twice \(lines 1 and 6\)"):
        load_config(str(path))


@pytest.mark.parametrize("text, message", [
    (b"model: [\n", r"run.yaml' is not valid YAML: .*line 2"),
    (b"- 1\n- 2\n", r"run.yaml' must hold a mapping of sections \(model, data, train, ...\), got list"),
    (b"\xff\xfemodel: {}\n", r"run.yaml' is not UTF-8 text"),
])
def test_a_yaml_file_that_cannot_be_read_as_a_config_is_named(tmp_path, text, message):
    """A truncated file, a list, a binary file: one ConfigError naming the file, not yaml's or
    difflib's traceback (launch/pretrain.py, sft.py, dpo.py and plan.py print ConfigErrors as one paragraph)."""
    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_an_override_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'data.train_data=\[a, b' is not valid YAML: expected .* \(line 1, column 6\)\. Write lists as \[a, b\], and quote a string value"):
        load_config(None, ["data.train_data=[a, b"])


def test_an_override_that_yaml_would_cut_at_a_comment_is_refused():
    """``run.dir=runs/try #2`` read as YAML is ``runs/try``: the rest is a comment, silently dropped."""
    with pytest.raises(ConfigError, match=r"override 'run.dir=runs/try #2' has ' #', where YAML starts a comment.*'run.dir=\"runs/try #2\"'"):
        load_config(None, ["run.dir=runs/try #2"])
    assert load_config(None, ['run.dir="runs/try #2"', "run.ds_config=a#b"]).run.dir == "runs/try #2"


def test_a_deepspeed_json_that_is_not_utf8_is_named(tmp_path):
    from doge_dist.train.ds_config import read_ds_config

    path = tmp_path / "ds.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=r"ds.json' is not UTF-8 text"):
        read_ds_config(str(path))


def test_moe_keys_on_a_dense_model_are_refused_not_ignored(tmp_path):
    """model.num_experts=16 on a dense preset trained a dense model without a word."""
    with pytest.raises(ConfigError, match=r"model.num_experts is set in the command-line overrides, but the model is dense"):
        load_config(None, ["model.preset=doge-tiny", "model.num_experts=16"])
    assert load_config(None, ["model.preset=doge-tiny", "model.is_moe=true", "model.num_experts=16",
                              "model.num_experts_per_tok=4"]).model.num_experts == 16
    assert load_config(None, ["model.preset=doge-20m-moe", "model.router_aux_loss_coef=0.01"]).model.is_moe
    # a run's resolved config.yaml writes every model field, the MoE ones at their defaults: it loads back
    written = tmp_path / "config.yaml"
    written.write_text(yaml.safe_dump(load_config(None, ["model.preset=doge-tiny"]).to_dict()))
    assert not load_config(str(written)).model.is_moe
    # fine-tuning without a model section: the model (MoE or not) comes from run.init_from, checked there
    assert load_config(None, ["run.init_from=runs/sft", "model.router_aux_loss_coef=0.01"],
                       fine_tuning=True).model.router_aux_loss_coef == 0.01
    # pretraining from init_from trains the config's model: its MoE keys are checked as without init_from
    with pytest.raises(ConfigError, match=r"model.router_aux_loss_coef is set in the command-line overrides, but the model is dense"):
        load_config(None, ["run.init_from=runs/sft", "model.router_aux_loss_coef=0.01"])
    with pytest.raises(ConfigError, match=r"model.num_experts is set in the command-line overrides, but the model is dense"):
        load_config(None, ["run.init_from=runs/sft", "model.preset=doge-tiny", "model.num_experts=16"], fine_tuning=True)


def test_a_home_directory_tilde_in_a_path_is_expanded(tmp_path, monkeypatch):
    """The shell leaves run.dir=~/x as it is (no tilde expansion inside section.key=value): the run wrote into
    a directory named '~' in the working directory, which a later `rm -rf ~` to clean it up takes for the home
    directory. Every path key is expanded as Hugging Face's Trainer expands output_dir."""
    from doge_dist.train.cli import ds_config_path_of

    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, ["run.dir=~/x", "run.ds_config=~/zero1.json", "run.init_from=~/runs/pre",
                                "run.resume=~/runs/x/checkpoints/step_00000010", "data.tokenizer=~/tok.model",
                                "data.cache_dir=~/cache", "data.train_data=[0.3, ~/a_text_document, 0.7, ~/b_text_document]",
                                "data.valid_data=~/v_text_document"])
    home = str(tmp_path)
    assert config.run.dir == f"{home}/x" and config.run.ds_config == f"{home}/zero1.json"
    assert config.run.init_from == f"{home}/runs/pre" and config.run.resume == f"{home}/runs/x/checkpoints/step_00000010"
    assert (config.data.tokenizer, config.data.cache_dir) == (f"{home}/tok.model", f"{home}/cache")
    assert config.data.train_data == [0.3, f"{home}/a_text_document", 0.7, f"{home}/b_text_document"]
    assert config.data.valid_data == [f"{home}/v_text_document"]
    path = tmp_path / "run.yaml"  # from the YAML file alike
    path.write_text("data:\n  train_data: ~/c_text_document\nrun:\n  dir: ~/y\n")
    config = load_config(str(path))
    assert (config.data.train_data, config.run.dir) == ([f"{home}/c_text_document"], f"{home}/y")
    assert load_config(None, ["run.resume=never"]).run.resume == "never"
    # --ds_config=~/x (the shell expands ~ only at the start of a word) is recorded as run.ds_config
    assert ds_config_path_of(load_config(None), "~/zero2.json") == f"{home}/zero2.json"


@pytest.mark.parametrize("key", ["gradient_clipping", "clip_grad", "max_grad_norm"])
def test_a_clipping_key_says_clipping_is_in_the_deepspeed_json(key, tmp_path):
    """train.gradient_clipping=0.5 (Megatron's --clip-grad, Hugging Face's max_grad_norm) got only "Unknown key ...
    Valid keys: ..." (or a "Did you mean" of an unrelated key): clipping is DeepSpeed's "gradient_clipping"."""
    pointer = "Gradient clipping is DeepSpeed's: set \"gradient_clipping\" in the --ds_config JSON (configs/zero*.json"
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"train.{key}=0.5"])
    assert f"Unknown key '{key}' in the command-line override 'train.{key}=0.5'. {pointer}" in str(error.value)
    assert "Did you mean" not in str(error.value) and "Valid keys: " in str(error.value)
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  {key}: 0.5\n")
    with pytest.raises(ConfigError, match=re.escape(pointer)):
        load_config(str(path))
