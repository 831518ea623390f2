"""Hugging Face transformers <-> doge-dist.

Our parameter names are transformers' names, so conversion is a config translation, the old
small-doge key renames on import, and the tied LM head dropped from the file on export.
"""
import dataclasses
import json
import warnings
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..config import RUNTIME_SWITCHES, ConfigError, ModelConfig, dataclass_from_dict
from ..files import replace_directory
from ..model import DogeForCausalLM, build_model

# small-doge's original module names -> transformers' names
OLD_KEY_NAMES = {
    "word_embed": "embed_tokens",
    "pre_layernorm": "input_layernorm",
    "pre_residual": "input_residual",
    "post_layernorm": "post_attention_layernorm",
    "post_residual": "post_attention_residual",
    "feed_forward": "mlp",
    "final_layernorm": "norm",
}
OLD_RESIDUAL_MODULES = ("pre_residual.weight", "post_residual.weight")
DOGE_DIST_ONLY = ("attention_variant", "router_layout", "balance_loss", "rope_theta", "rope_scaling", *RUNTIME_SWITCHES)


def to_hf_config(config: ModelConfig):
    """The ``transformers.DogeConfig`` of a v2 model config."""
    from transformers import DogeConfig

    if config.attention_variant != "v2":
        raise ConfigError(
            "transformers' DogeForCausalLM implements attention_variant 'v2' only; a 'v1' model "
            "(per-query-head bias, no q/k norm) cannot be exported as a transformers Doge directory."
        )
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in DOGE_DIST_ONLY}
    rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    rope.update({k: v for k, v in (config.rope_scaling or {}).items() if k not in ("type", "rope_type")})
    return DogeConfig(rope_parameters=rope, **values)


# keys that transformers' DogeConfig takes as null and then computes with its default (attention_dropout:
# `float | None`, and DogeAttention uses 0.0 outside training): a null there is our default too
NULL_MEANS_DEFAULT = ("attention_dropout",)


def from_hf_config(hf: dict[str, Any], state_keys: tuple[str, ...] = (), a_shape: Optional[int] = None,
                   where: str = "config.json", **overrides) -> ModelConfig:
    """A ModelConfig from a config.json mapping (``where`` names it in errors); v1/v2 detected from the
    state dict when given. Every value is type-checked (``dataclass_from_dict``), so a wrong one is a
    ConfigError naming the key and the file, not a TypeError deep in the validation."""
    if hf.get("model_type") != "doge":
        raise ConfigError(f"model_type is {hf.get('model_type')!r}, not 'doge': this is not a Doge checkpoint.")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in hf.items() if k in names and not (k in NULL_MEANS_DEFAULT and v is None)}
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "rope_theta" in rope or "rope_theta" in hf:
        values["rope_theta"] = rope.pop("rope_theta", hf.get("rope_theta"))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    values["rope_scaling"] = rope if rope_type != "default" else None
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(values.get(key), list):
            values[key] = values[key][0]
    if state_keys:
        values["attention_variant"] = "v2" if any(".q_norm." in k for k in state_keys) else "v1"
    if hf.get("is_moe") and "router_layout" not in hf and "router_layout" not in overrides:
        warnings.warn(
            "A MoE Doge directory not written by doge-dist: loaded with transformers' cross-token router "
            "(router_layout 'hf_compat'), the function transformers computes and it was trained with; pass "
            "router_layout='split' (model.router_layout) for doge-dist's per-token router."
        )
        values["router_layout"] = "hf_compat"
    values.update(overrides)
    return dataclass_from_dict(ModelConfig, values, where)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors or pytorch_model*.bin weights.")
    return files


def _read_safetensors(file: Path, read):
    """``read(file)`` with a SafetensorError (whose message names no file) as a ConfigError naming it."""
    from safetensors import SafetensorError

    try:
        return read(str(file))
    except SafetensorError as error:
        raise ConfigError(f"{file} cannot be read as safetensors ({error}); is the download or copy complete?") from error


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in _weight_files(path):
        if file.suffix == ".safetensors":
            state.update(_read_safetensors(file, load_file))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def tensor_names(path: Union[str, Path]) -> tuple[str, ...]:
    """The tensor names of a model directory, from the safetensors headers (a pytorch_model*.bin is
    memory-mapped): no weights are read."""
    from safetensors import safe_open

    names = []
    for file in _weight_files(Path(path)):
        if file.suffix == ".safetensors":
            names += _read_safetensors(file, lambda name: list(safe_open(name, "pt").keys()))
        else:
            names += list(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return tuple(names)


def hf_model_config(path: Union[str, Path], **overrides) -> ModelConfig:
    """The ModelConfig of a transformers (or small-doge) Doge directory: its config.json, with the
    attention variant (v1/v2) told by its tensor names."""
    return from_hf_config(read_hf_config(path), tensor_names(path), where=str(Path(path) / "config.json"), **overrides)


def rename_old_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names for small-doge's (OLD_KEY_NAMES); small-doge kept each residual scale in a
    module of its own (``pre_residual.weight``), transformers as a bare parameter (``input_residual``)."""
    renamed = {}
    for key, tensor in state.items():
        if key.endswith(OLD_RESIDUAL_MODULES):
            key = key[: -len(".weight")]
        parts = [OLD_KEY_NAMES.get(part, part) for part in key.split(".")]
        renamed[".".join(parts)] = tensor
    return renamed


def load_state_checked(model: DogeForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, naming the first missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        expected.pop("lm_head.weight", None)
    for name, tensor in expected.items():
        if name not in state:
            raise ConfigError(f"{source}: tensor '{name}' is missing (expected shape {tuple(tensor.shape)}).")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"{source}: tensor '{name}' has shape {tuple(state[name].shape)}, but the config needs "
                f"{tuple(tensor.shape)}: the weights do not match their config."
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ConfigError(f"{source}: unexpected tensor '{unexpected[0]}' for this config ({len(unexpected)} in all).")
    model.load_state_dict(state, strict=not model.config.tie_word_embeddings)


def read_hf_config(path: Union[str, Path]) -> dict[str, Any]:
    """The config.json mapping of a Doge model directory; a missing, corrupt or non-Doge file is named."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: config.json is missing.")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{config_file} is not valid JSON: {error}.") from error
    if hf.get("model_type") != "doge":
        raise ConfigError(f"{config_file}: model_type is {hf.get('model_type')!r}, not 'doge'.")
    return hf


def load_hf(path: Union[str, Path], **config_overrides) -> DogeForCausalLM:
    """Our model from a transformers (or small-doge) Doge directory; ``model.config`` is its ModelConfig."""
    path = Path(path)
    config = hf_model_config(path, **config_overrides)  # a config it cannot load is refused before the weights are read
    state = rename_old_keys(_read_state_dict(path))
    state = {k: v for k, v in state.items() if "rotary_emb" not in k}
    model = build_model(config)
    load_state_checked(model, {k: v.float() for k, v in state.items()}, str(path))
    return model


def check_output(path: Union[str, Path]) -> None:
    """An export replaces an earlier export (a directory with a config.json) or an empty directory,
    never anything else: a mistyped output (the run directory, data/) must not be deleted."""
    path = Path(path).resolve()
    if path.exists() and not (path.is_dir() and ((path / "config.json").is_file() or not any(path.iterdir()))):
        raise ConfigError(f"Output '{path}' exists and is not a Hugging Face model directory; an export replaces only an "
                          "earlier export or an empty directory: choose a new output directory.")


def _keep_transformers_4_rope_keys(config_file: Path, config: ModelConfig) -> None:
    """transformers 5 writes the rotary settings as ``rope_parameters`` only; transformers 4.x (where an
    export may be loaded) ignores that key and would compute with theta 10000 and no scaling, silently. The
    published directories' ``rope_theta`` and ``rope_scaling`` go beside it (transformers 5 and load_hf
    read ``rope_parameters`` first)."""
    written = json.loads(config_file.read_text())
    if "rope_parameters" in written:
        written.update(rope_theta=config.rope_theta, rope_scaling=config.rope_scaling)
        config_file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def save_hf(model: DogeForCausalLM, path: Union[str, Path], tokenizer: Optional[Union[str, Path, Any]] = None) -> Path:
    """Write a directory that ``AutoModelForCausalLM.from_pretrained`` loads as DogeForCausalLM; an
    earlier export there is replaced (``check_output``)."""
    from safetensors.torch import save_file

    check_output(path)
    path = Path(path).resolve()  # "." has no name for the temporary directory beside it
    if model.config.is_moe and model.config.router_layout == "split":
        warnings.warn(
            "transformers' DogeForCausalLM routes CDMoE tokens with the reference's cross-token reshape "
            "(router_layout 'hf_compat'); this model was built with the per-token 'split' router, so "
            "transformers computes a different function for batches of more than one token. "
            "doge_dist.convert.hf.load_hf(path) reads the router_layout recorded in config.json and keeps it exact."
        )
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        config = model.config
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
            config = with_tokenizer_special_ids(config, tmp)
        hf_config = to_hf_config(config)
        hf_config.architectures = ["DogeForCausalLM"]
        if config.is_moe:  # for load_hf (transformers ignores both): the router and the loss it trained with
            hf_config.router_layout = config.router_layout
            hf_config.balance_loss = config.balance_loss
        hf_config.save_pretrained(tmp)
        _keep_transformers_4_rope_keys(tmp / "config.json", config)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    except BaseException as error:  # a bad tokenizer, a full disk, Ctrl-C: no half-written directory stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        from ..data.errors import is_write_failure

        if is_write_failure(error):
            kept = "the earlier export there is untouched" if (path / "config.json").is_file() else "nothing was written"
            raise ExportWriteError(f"Writing the Hugging Face export {path} failed: {type(error).__name__}: {error} "
                                   f"(a full disk or a file size limit?); {kept}.") from error
        raise
    replace_directory(tmp, path)  # an earlier export is set aside, not deleted, before the new one takes its name
    return path


class ExportWriteError(RuntimeError):
    """An export could not be written (a full disk, a file size limit); an earlier export is untouched."""


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def with_tokenizer_special_ids(config: ModelConfig, directory: Path) -> ModelConfig:
    """``config`` with the bos/eos/pad ids of the tokenizer written to ``directory`` (those it has), also in
    a generation_config.json there (copied from a model directory with its tokenizer): transformers'
    generate stops at the model's eos and pads with its pad, so an export whose config.json kept the
    preset's ids (0/1/2) beside a tokenizer with others stopped at the wrong token. Said in one line when
    they differ; an id outside the model's vocabulary is a ConfigError (the tokenizer is another model's)."""
    if not (directory / "tokenizer_config.json").is_file():
        return config
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(directory)
    ids = {key: getattr(loaded, key) for key in SPECIAL_TOKENS if getattr(loaded, key) is not None}
    for key, token in ids.items():
        if not 0 <= token < config.vocab_size:
            raise ConfigError(f"The exported tokenizer's {key} is {token}, not an id of the model's vocabulary (0 to "
                              f"{config.vocab_size - 1}): export with the tokenizer this model was trained with.")
    changed = {key: token for key, token in ids.items() if token != getattr(config, key)}
    if changed:
        print("[doge-dist] config.json takes the exported tokenizer's special ids: " + ", ".join(
            f"{key} {getattr(config, key)} -> {token}" for key, token in changed.items()), flush=True)
    generation_file = directory / "generation_config.json"
    if generation_file.is_file():
        generation = json.loads(generation_file.read_text())
        generation_file.write_text(json.dumps({**generation, **ids}, indent=2) + "\n")
    return dataclasses.replace(config, **changed)


def _save_tokenizer(tokenizer: Union[str, Path, Any], directory: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
        return
    source = Path(tokenizer)
    if not source.is_dir():
        raise FileNotFoundError(f"Tokenizer '{source}' is not a Hugging Face tokenizer directory.")
    for file in source.iterdir():
        if file.is_file() and not is_model_file(file.name):
            shutil.copy2(file, directory / file.name)


def model_files_in(directory: Path) -> list[str]:
    """The model files (``is_model_file``) in ``directory``, sorted; none when it is not a directory: a
    tool about to replace a tokenizer directory must not take a model directory for one."""
    return sorted(p.name for p in Path(directory).iterdir() if is_model_file(p.name)) if Path(directory).is_dir() else []


def is_model_file(name: str) -> bool:
    """The config and weights of a model directory (one file or shards with their index, safetensors or
    pytorch_model*.bin), which a tokenizer taken from that directory leaves behind."""
    return name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json")) or name.startswith("pytorch_model")
