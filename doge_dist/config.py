"""Dataclass configs for the model, data, parallel layout, training and run.

A run is described by one YAML file with the sections ``model``, ``data``, ``parallel``, ``train`` and
``run``, plus ``section.key=value`` overrides from the command line. Every key is checked: an unknown
key fails with the closest valid key suggested, and impossible values fail here, before any model,
data or process group is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml


class ConfigError(ValueError):
    """A configuration the run cannot use; the message names the key and the fix."""


# other trainers' names for gradient clipping (Megatron-LM, Hugging Face, Lightning...), which is DeepSpeed's to do
CLIPPING_KEYS = ("gradient_clipping", "clip_grad", "clip_grad_norm", "max_grad_norm", "grad_clip", "gradient_clip_val")


def _unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    if key in CLIPPING_KEYS:  # no key of ours clips: a "Did you mean" would name an unrelated one
        hint = (" Gradient clipping is DeepSpeed's: set \"gradient_clipping\" in the --ds_config JSON (configs/zero*.json "
                "set \"gradient_clipping\": 1.0).")
    return ConfigError(f"Unknown key '{key}' in {where}.{hint} Valid keys: {', '.join(sorted(valid))}.")


def dataclass_from_dict(cls, values: dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``values``, naming unknown keys and the closest valid one."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(values).__name__}.")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise _unknown_key_error(key, list(fields), where)
    return cls(**{key: _typed_value(key, value, fields[key], where) for key, value in values.items()})


_SCALAR_TYPES = {"int": (int, "an integer"), "float": (float, "a number"), "bool": (bool, "true or false"), "str": (str, "a string")}


def _typed_value(key: str, value: Any, annotation: str, where: str) -> Any:
    """``value`` as the field's type: YAML reads 3e-3 (no dot) as a string, so numeric strings and
    ints are accepted for floats, whole numbers (2.4e+4, "1e4") for ints and numbers for strings; any
    other mismatch is an error naming the key, before it fails somewhere deep in the run."""
    optional = annotation.startswith("Optional[")
    kind = annotation[len("Optional["):-1] if optional else annotation
    if (value is None and optional) or kind not in _SCALAR_TYPES:
        return value
    if not isinstance(value, bool):
        if kind == "float" and isinstance(value, (str, int)):
            try:
                value = float(value)
            except ValueError:
                pass
        if kind == "int" and isinstance(value, (str, float)):
            try:
                if float(value).is_integer():
                    return int(float(value))
            except ValueError:
                pass
        if kind == "str" and isinstance(value, (int, float)):
            return str(value)
    python_type, name = _SCALAR_TYPES[kind]
    if kind == "float" and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"Key '{key}' in {where} must be a finite number, got {value!r}.")
    if isinstance(value, python_type) and (kind == "bool" or not isinstance(value, bool)):
        return value
    raise ConfigError(f"Key '{key}' in {where} must be {name}, got {value!r}.")


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

ATTENTION_VARIANTS = ("v2", "v1")
ROUTER_LAYOUTS = ("split", "hf_compat")
BALANCE_LOSSES = ("per_expert", "hf_compat")
ATTN_BACKENDS = ("auto", "sdpa", "eager", "flex", "flash")
LOSS_BACKENDS = ("torch", "te")  # te: transformer-engine's fused cross entropy where whole logits exist
RUNTIME_SWITCHES = ("attn_backend", "loss_backend")  # how the model computes, not what it is

PUBLISHED_ROPE_SCALING = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048}


@dataclass
class ModelConfig:
    """The fields of ``transformers.DogeConfig`` (same names and defaults) plus doge-dist switches.

    ``attention_variant``: "v2" is the transformers model (per key/value-head bias, q/k norms);
    "v1" is the small-doge repository's file (per query-head bias, no q/k norms).
    ``router_layout``: "split" routes each token from its own logits; "hf_compat" reproduces the
    reference's cross-token reshape (parity tests only). ``balance_loss``: "per_expert" is the
    correct Switch-style loss; "hf_compat" reproduces the reference formula. ``head_dim``:
    hidden_size / num_attention_heads unless given; transformers' DogeAttention reads it too, and its
    o_proj maps heads x head_dim back to hidden_size, so it need not tile hidden_size.
    """

    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 32
    hidden_dropout: float = 0.0
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    keep_window_size: int = 2048
    is_moe: bool = False
    num_experts: int = 16384
    num_experts_per_tok: int = 64
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # doge-dist switches
    attention_variant: str = "v2"
    router_layout: str = "split"
    balance_loss: str = "per_expert"
    attn_backend: str = "auto"
    loss_backend: str = "torch"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.check_sizes()
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.hidden_size ({self.hidden_size}) is not divisible by model.num_attention_heads "
                    f"({self.num_attention_heads}); set model.head_dim explicitly or change the head count."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def fields_differing_from(self, other: "ModelConfig", ignore=()) -> list[str]:
        """The names of the fields (but ``ignore``) whose values differ from ``other``'s; a head_dim
        that each derives from its own hidden_size / num_attention_heads differs through those, and a
        rope_scaling only where it changes the rotary embedding (``rope_function``)."""
        def derived(config: ModelConfig) -> bool:
            return config.head_dim * config.num_attention_heads == config.hidden_size

        def differs(name: str) -> bool:
            if name == "rope_scaling":
                return self.rope_function != other.rope_function
            return getattr(self, name) != getattr(other, name)

        return [f.name for f in dataclasses.fields(self) if f.name not in ignore and differs(f.name)
                and not (f.name == "head_dim" and derived(self) and derived(other))]

    def check_sizes(self) -> None:
        """Every size at least 1 (before any division by a head count)."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be at least 1, got {getattr(self, key)}.")

    def validate(self) -> None:
        def choice(key: str, options: tuple[str, ...]) -> None:
            if getattr(self, key) not in options:
                raise ConfigError(f"model.{key} = {getattr(self, key)!r} is not one of {', '.join(options)}.")

        choice("attention_variant", ATTENTION_VARIANTS)
        choice("router_layout", ROUTER_LAYOUTS)
        choice("balance_loss", BALANCE_LOSSES)
        choice("attn_backend", ATTN_BACKENDS)
        if self.attn_backend == "flex" and self.attention_dropout:
            raise ConfigError(f"model.attn_backend = 'flex' has no attention dropout (model.attention_dropout = "
                              f"{self.attention_dropout}): use attn_backend 'auto' or 'sdpa' with dropout, or dropout 0.")
        choice("loss_backend", LOSS_BACKENDS)
        if self.hidden_act != "silu":
            raise ConfigError(f"model.hidden_act = {self.hidden_act!r}: Doge uses 'silu' only.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.head_dim}) must be even and at least 2, for rotary embeddings.")
        for key in ("initializer_range", "router_aux_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}.")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            token = getattr(self, key)
            if token is not None and not 0 <= token < self.vocab_size:
                raise ConfigError(f"model.{key} = {token} is not an id of the vocabulary (0 to {self.vocab_size - 1}).")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key} must be within [0, 1), got {getattr(self, key)}.")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta must be positive, got {self.rope_theta}.")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"model.rope_scaling must be a mapping such as {PUBLISHED_ROPE_SCALING} (or null), "
                              f"got {self.rope_scaling!r}.")
        if self.rope_scaling is not None:
            factor = self.rope_scaling.get("factor", 1.0)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
                raise ConfigError(f"model.rope_scaling.factor must be a number >= 1, got {factor!r}.")
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ("default", "dynamic"):
                raise ConfigError(f"model.rope_scaling.rope_type = {rope_type!r}: supported are 'default' and 'dynamic'.")
            if rope_type == "dynamic" and "factor" not in self.rope_scaling:
                raise ConfigError("model.rope_scaling with rope_type 'dynamic' needs a 'factor'.")
        if self.sliding_window is not None:
            raise ConfigError(
                f"model.sliding_window = {self.sliding_window}: doge-dist does not implement transformers' sliding-window "
                "causal mask, so this model would compute a different function; set it to null (Doge's own sparsity "
                "is DMA's keep_window_size)."
            )
        if self.keep_window_size < 1:
            raise ConfigError(f"model.keep_window_size must be positive, got {self.keep_window_size}.")
        if self.is_moe:
            if math.isqrt(self.num_experts) ** 2 != self.num_experts:
                raise ConfigError(
                    f"model.num_experts = {self.num_experts} is not a perfect square: CDMoE's product keys reach "
                    f"only floor(sqrt(E))^2 experts. Use a square such as {math.isqrt(self.num_experts) ** 2} "
                    f"or {(math.isqrt(self.num_experts) + 1) ** 2}."
                )
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"model.num_experts_per_tok = {self.num_experts_per_tok} must be between 1 and num_experts."
                )

    @property
    def num_keys(self) -> int:
        """Product-key count per half: floor(sqrt(num_experts))."""
        return math.isqrt(self.num_experts)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def rope_function(self) -> tuple[str, Optional[float]]:
        """What of rope_scaling the rotary embedding computes with: the type and a dynamic one's factor.
        Other keys, such as the published original_max_position_embeddings, change nothing: dynamic NTK
        (ours and transformers') starts at max_position_embeddings."""
        return self.rope_type, self.rope_scaling["factor"] if self.rope_type == "dynamic" else None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A published Doge shape (or a tiny test shape) with optional field overrides."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown model preset '{name}'.{hint} Presets: {', '.join(PRESETS)}.")
        values = {**PRESETS[name], **overrides}
        return dataclass_from_dict(cls, values, f"preset '{name}' overrides")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "model") -> "ModelConfig":
        """From a YAML ``model`` section: ``preset`` picks the base shape, other keys override it."""
        values = dict(values or {})
        preset = values.pop("preset", None)
        if preset is not None and not isinstance(preset, str):
            raise ConfigError(f"model.preset in {where} must be a preset name such as 'doge-20m', got {preset!r}.")
        base = PRESETS.get(preset, {}) if preset else {}
        if preset and preset not in PRESETS:
            cls.from_preset(preset)  # raises the suggestion error
        return dataclass_from_dict(cls, {**base, **values}, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _published(hidden: int, layers: int, heads: int, experts: int = 0, top_k: int = 0) -> dict[str, Any]:
    preset: dict[str, Any] = dict(
        vocab_size=32768,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        keep_window_size=2048,
        rope_scaling=dict(PUBLISHED_ROPE_SCALING),
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    if experts:
        preset.update(is_moe=True, num_experts=experts, num_experts_per_tok=top_k)
    return preset


def _tiny(**extra: Any) -> dict[str, Any]:
    preset: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        keep_window_size=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    preset.update(extra)
    return preset


PRESETS: dict[str, dict[str, Any]] = {
    "doge-20m": _published(256, 8, 2),
    "doge-60m": _published(512, 16, 4),
    "doge-160m": _published(768, 24, 6),
    "doge-320m": _published(1024, 32, 8),
    "doge-20m-moe": _published(256, 8, 2, experts=1024, top_k=16),
    "doge-120m-moe": _published(512, 16, 4, experts=4096, top_k=32),
    "doge-480m-moe": _published(768, 24, 6, experts=9216, top_k=48),
    "doge-1.4b-moe": _published(1024, 32, 8, experts=16384, top_k=64),
    "doge-tiny": _tiny(),
    "doge-tiny-moe": _tiny(is_moe=True, num_experts=16, num_experts_per_tok=4),
}


# ----------------------------------------------------------------------------------------------
# Run sections (data, parallel, train, run) and the whole-run config
# ----------------------------------------------------------------------------------------------


def expand_home(value: Any) -> Any:
    """A path value with a leading ~ or ~user expanded, as Hugging Face's Trainer expands output_dir: the shell
    leaves ``run.dir=~/x`` alone (no tilde expansion inside a word), and a run would write into a directory named
    '~' in the working directory (which a later ``rm -rf ~`` takes for the home). Anything else is returned as is."""
    return os.path.expanduser(value) if isinstance(value, str) else value


def check_seed(seed: int, key: str) -> None:
    """numpy seeds the data order and each rank's random state from it, and takes only 0 <= seed < 2**32: it
    would fail with a ValueError once the process group, the model and the engine were built."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{key} must be within [0, 2**32) (numpy's seed range), got {seed}.")


@dataclass
class DataConfig:
    """Where tokens come from: Megatron indexed-dataset prefixes, blended and split."""

    train_data: list = field(default_factory=list)  # [weight, prefix, weight, prefix, ...] or [prefix, ...] (weighted by size)
    valid_data: list = field(default_factory=list)  # optional separate validation blend
    split: str = "969,30,1"
    seq_length: int = 2048
    tokenizer: Optional[str] = None  # sentencepiece .model file or Hugging Face tokenizer directory
    cache_dir: Optional[str] = None  # index cache; default <run.dir>/data_cache
    seed: int = 1234
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        """YAML spellings: ``train_data: data/x_text_document`` is one prefix, ``split: 100`` is "100"."""
        for key in ("train_data", "valid_data"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])
        if isinstance(self.split, (int, float)) and not isinstance(self.split, bool):
            self.split = str(self.split)
        for key in ("train_data", "valid_data"):
            if not isinstance(getattr(self, key), list):
                raise ConfigError(f"data.{key} must be a list of prefixes ([prefix, ...] or [weight, prefix, ...]), "
                                  f"got {getattr(self, key)!r}.")
            setattr(self, key, [expand_home(entry) for entry in getattr(self, key)])  # a blend's weights stay numbers
        self.tokenizer, self.cache_dir = expand_home(self.tokenizer), expand_home(self.cache_dir)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (0: load in the training process), got {self.num_workers}.")
        check_seed(self.seed, "data.seed")


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallelism takes the rest of the world: dp = world / tensor_parallel."""

    tensor_parallel: int = 1
    sequence_parallel: bool = False
    expert_parallel: int = 1  # experts sharded within the data-parallel group: must divide dp

    def __post_init__(self) -> None:
        for key in ("tensor_parallel", "expert_parallel"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key} must be at least 1 (1: off), got {getattr(self, key)}.")


@dataclass
class TrainConfig:
    """Optimisation and loop settings; DeepSpeed's own settings (ZeRO, clipping) stay in the JSON."""

    micro_batch_size: int = 1  # sequences per rank per forward
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    lr: float = 1e-3  # peak
    min_lr_ratio: float = 0.0
    scheduler: str = "wsd"  # wsd | cosine
    warmup_steps: int = 0
    decay_steps: int = 0  # wsd: the final decay phase
    decay_type: str = "linear"  # wsd decay shape: linear | cosine | 1-sqrt
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    decay_groups: str = "matrices"  # matrices | original (the HF Trainer grouping the recipes used)
    bf16: Optional[bool] = None  # None: as the DeepSpeed JSON says; true/false override it
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (fuses the elementwise work; ZeRO 0-2)
    seed: int = 233
    log_interval: int = 10  # steps between console lines / TensorBoard points
    eval_interval: int = 0  # 0: no validation
    eval_iters: int = 10  # validation iterations of one global batch each (Megatron's --eval-iters)
    save_interval: int = 0  # 0: only on exit signals and at the end
    keep_last: int = 3  # checkpoints kept (older ones deleted after a newer one is complete)
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops
    peak_tflops: Optional[float] = None  # per device, for MFU; default: a GPU by name, a CPU measured (train/metrics.py)
    freeze_dense_steps: int = 0  # MoE after upcycling: only router/expert tables update for this many steps
    moe_stats_window: int = 100  # MoE: the last optimizer steps whose routing moe/expert_load_* and moe/unused_* count

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "gradient_accumulation_steps", "log_interval", "keep_last", "max_bad_steps",
                    "moe_stats_window"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1, got {getattr(self, key)}.")
        for key in ("eval_interval", "save_interval", "freeze_dense_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be 0 (off) or a number of steps, got {getattr(self, key)}.")
        for key in ("lr", "weight_decay"):  # AdamW would refuse them only once the model is built
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}.")
        if not self.adam_eps > 0:  # AdamW takes 0, then divides 0 by 0 for a parameter without gradient: NaN weights
            raise ConfigError(f"train.adam_eps must be > 0 (AdamW divides by sqrt(v) + eps, which is 0 for a parameter "
                              f"whose gradient is 0), got {self.adam_eps}; the usual value is 1e-8.")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"train.{key} must be within [0, 1), got {getattr(self, key)}.")
        if self.eval_interval and self.eval_iters < 1:
            raise ConfigError(f"train.eval_iters must be at least 1 when train.eval_interval > 0 (it validated nothing), "
                              f"got {self.eval_iters}; set train.eval_interval=0 to turn validation off.")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"train.peak_tflops must be positive (or null: measured), got {self.peak_tflops}.")
        check_seed(self.seed, "train.seed")


@dataclass
class RunConfig:
    """Where a run writes, and what it starts from."""

    dir: str = "runs/default"  # checkpoints, TensorBoard events and the resolved config go here
    ds_config: Optional[str] = None  # DeepSpeed JSON used when --ds_config is not given
    resume: str = "auto"  # auto (latest checkpoint in dir if any) | never | PATH to a checkpoint dir
    init_from: Optional[str] = None  # HF Doge directory, or a run dir / checkpoint to continue from
    init_optimizer: bool = False  # continue mode: also take the checkpoint's optimizer states

    def __post_init__(self) -> None:
        for key in ("dir", "ds_config", "resume", "init_from"):  # resume: auto and never are not paths, and stay
            setattr(self, key, expand_home(getattr(self, key)))


@dataclass
class FinetuneConfig:
    """SFT and DPO (launch/sft.py, launch/dpo.py); pretraining ignores this section.

    ``epochs`` > 0 sizes the run from the data: train.max_steps = ceil(epochs x samples / global
    batch), train.warmup_steps = ceil(warmup_ratio x max_steps) (and, for the wsd scheduler, decay_steps =
    decay_ratio x max_steps; given with cosine, decay_ratio is refused); a train.max_steps in the YAML or on the command line wins over the
    epochs (the ratios then apply to it), a train.warmup_steps or decay_steps given there over its
    ratio; 0 keeps train.max_steps/warmup_steps/decay_steps as written.
    The launcher prints how the run was sized.
    """

    epochs: float = 2.0
    warmup_ratio: float = 0.1
    decay_ratio: float = 0.1
    packing: bool = False  # SFT: whole conversations packed into data.seq_length (positions restart, attention stays within each)
    beta: float = 0.1  # DPO: strength of the KL penalty towards the reference model
    reference: str = "model"  # DPO: model (a frozen copy) | precomputed (its log-probs, computed once before step 1); DPO trains with dropout off

    def __post_init__(self) -> None:
        if self.reference not in ("model", "precomputed"):
            raise ConfigError(f"finetune.reference = {self.reference!r} is not one of model, precomputed.")
        if self.epochs < 0 or not 0 <= self.warmup_ratio <= 1 or not 0 <= self.decay_ratio <= 1 or self.beta <= 0:
            raise ConfigError("finetune.epochs must be >= 0, warmup_ratio and decay_ratio within [0, 1], beta > 0.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig, "train": TrainConfig, "run": RunConfig,
            "finetune": FinetuneConfig}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config mapping; values are parsed as YAML."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"Override '{item}' must look like section.key=value (for example train.max_steps=20).")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise _unknown_key_error(section, list(SECTIONS), "the override sections")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as error:
            raise ConfigError(f"The command-line override '{item}' is not valid YAML: {_yaml_problem(error)}. Write lists as "
                              "[a, b], and quote a string value that YAML would read otherwise inside the shell's "
                              "quotes: 'run.dir=\"[try1\"'.") from None
        if re.search(r"(^|\s)#", value) and "#" not in yaml.safe_dump(parsed):
            raise ConfigError(f"The command-line override '{item}' has ' #', where YAML starts a comment and the value "
                              f"would end; quote the value inside the shell's quotes: '{dotted}=\"{value}\"'.")
        _check_override(section, key, parsed, f"the command-line override '{item}'")
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {})
        raw[section][key] = parsed
    return raw


def _check_override(section: str, key: str, value: Any, where: str) -> None:
    """An override's key and type, named as the override (the merged config would name the YAML file)."""
    fields = {f.name: f.type for f in dataclasses.fields(SECTIONS[section])}
    if section == "model":
        fields["preset"] = "Optional[str]"
    if key not in fields:
        raise _unknown_key_error(key, list(fields), where)
    _typed_value(key, value, fields[key], where)


MOE_ONLY_KEYS = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_layout", "balance_loss")


def inherits_model(init_from: Optional[str], file_raw: Optional[dict], overrides: Iterable[str]) -> bool:
    """Whether a fine-tuning run's model shape comes from run.init_from: a YAML without a model section
    (the SFT/DPO recipes) continues the model it starts from, unless model.preset=... names another."""
    return (bool(init_from) and "model" not in (file_raw or {})
            and not any(o.startswith("model.preset=") for o in overrides))


def check_moe_keys(model: ModelConfig, given: Mapping[str, Any], where: str, whose: str = "the model") -> None:
    """A ConfigError for a MoE-only model key given for a dense model, which would silently be ignored; a key
    at its default is not one (a run's resolved config.yaml writes them all)."""
    defaults = {field.name: field.default for field in dataclasses.fields(ModelConfig)}
    moe_keys = [key for key in MOE_ONLY_KEYS if key in given and given[key] != defaults[key]]
    if moe_keys and not model.is_moe:
        raise ConfigError(
            f"model.{moe_keys[0]} is set in {where}, but {whose} is dense (model.is_moe is false), so it would be "
            "ignored: set model.is_moe=true (or a -moe preset such as doge-20m-moe) for a CDMoE model, or drop it."
        )


def config_from_dict(raw: dict[str, Any], where: str = "config", model_inherited: bool = False) -> Config:
    """The run config of the sections in ``raw``; ``model_inherited``: the model will be run.init_from's
    (``inherits_model``), which checks its own MoE keys."""
    raw = raw or {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown_key_error(section, list(SECTIONS), where)
        if values is not None and not isinstance(values, dict):
            example = "model:\n  preset: doge-20m" if section == "model" else f"{section}:\n  key: value"
            raise ConfigError(f"Section '{section}' in {where} must be a mapping of keys, as in\n{example}\ngot "
                              f"{type(values).__name__} {values!r}.")
    config = Config(
        model=ModelConfig.from_dict(raw.get("model") or {}, f"{where}: model"),
        **{
            name: dataclass_from_dict(cls, raw.get(name) or {}, f"{where}: {name}")
            for name, cls in SECTIONS.items()
            if name != "model"
        },
    )
    if not model_inherited:
        check_moe_keys(config.model, raw.get("model") or {}, where)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"Config file '{self.name}' gives '{key}' twice (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); the second would silently replace the first. Merge them.")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_config(path: Optional[str], overrides: list[str] = (), fine_tuning: bool = False) -> Config:
    """Read a YAML run config (or none) and apply ``section.key=value`` overrides. ``fine_tuning``: the
    SFT/DPO launchers, where a YAML without a model section continues run.init_from's model."""
    raw: dict[str, Any] = {}
    where = "the command-line overrides"
    if path:
        file = Path(path)
        if not file.is_file():
            state = "is a directory" if file.is_dir() else "does not exist"
            raise ConfigError(f"Config file '{path}' {state}; pass --config with a YAML file from configs/.")
        raw = _read_yaml(file, path)
        where = f"config file '{path}'"
    file_sections = dict(raw)  # before the overrides add theirs
    merged = apply_overrides(raw, list(overrides))
    run = merged.get("run")  # not a mapping: config_from_dict says so
    inherited = fine_tuning and isinstance(run, dict) and inherits_model(run.get("init_from"), file_sections, overrides)
    return config_from_dict(merged, where, model_inherited=inherited)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What the parser found wrong and where, in one line (its own message spans several, with a caret)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _read_yaml(file: Path, path: str) -> dict[str, Any]:
    """The config file's sections; a file that is not UTF-8, not YAML or not a mapping is one ConfigError."""
    try:
        with open(file, encoding="utf-8") as stream:
            raw = yaml.load(stream, Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"Config file '{path}' is not UTF-8 text (byte {error.start}): pass a YAML file from configs/.") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {_yaml_problem(error)}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (model, data, train, ...), got "
                          f"{type(raw).__name__}.")
    return raw
