"""The DeepSpeed JSON a run uses: the user's file plus the batch sizes from the YAML.

The JSON holds DeepSpeed's own keys (ZeRO stage, bf16, gradient clipping...). Batch sizes live in
the YAML only, and are written here as micro-batch x accumulation x data-parallel size, so the three
can never disagree; a user JSON that states a different value is an error rather than a silent winner.
The optimizer and schedule come from the YAML train section, so JSON "optimizer"/"scheduler" are errors, and
so are "activation_checkpointing" (train.activation_checkpointing) and other sections doge-dist does not use.
Keys DeepSpeed does not read are errors too (it would ignore them), and so are settings its engine refuses only
once the model is built.
"""
from __future__ import annotations

import copy
import difflib
import functools
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..config import ConfigError, TrainConfig

SECTIONS = ("bf16", "bfloat16", "fp16", "zero_optimization", "checkpoint", "flops_profiler",
            "tensorboard", "wandb", "csv_monitor", "comms_logger", "data_types")  # keys whose values are JSON objects
DTYPE_KEYS = ("grad_accum_dtype", "param_dtype", "buffer_dtype")  # in data_types
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# sections DeepSpeed's parser reads with dict lookups, so that it ignores keys it does not know (the others are pydantic models)
READ_BY_KEY = ("data_types", "checkpoint", "flops_profiler", "data_efficiency", "aio", "timers", "torch_autocast")
# DeepSpeed sections doge-dist does not use, and the run config's keys that do their work
YAML_INSTEAD = {
    "optimizer": "AdamW with train.lr, train.adam_beta1, train.adam_beta2, train.adam_eps, train.weight_decay and "
                 "train.decay_groups.",
    "scheduler": "train.scheduler (wsd or cosine), train.warmup_steps, train.decay_steps, train.decay_type, "
                 "train.min_lr_ratio and train.max_steps.",
    "fp16": "doge-dist trains in bf16 or fp32 only; use \"bf16\": {\"enabled\": true} or train.bf16=true.",
    "activation_checkpointing": "that section configures deepspeed.checkpointing, which doge-dist does not use; to "
                                "recompute each decoder layer in the backward pass set train.activation_checkpointing=true.",
}
# other trainers' names (Hugging Face, Accelerate, Megatron-LM) for DeepSpeed's keys: no spelling is close to them
OTHER_NAMES = {"zero": "zero_optimization", "zero_stage": "zero_optimization", "max_grad_norm": "gradient_clipping",
               "clip_grad": "gradient_clipping"}


class _RecordedReads(dict):
    """A dict that remembers every key looked up in it (``in``, ``get``, ``[]``), shared by its copies."""

    def __init__(self, values: dict[str, Any], read: Optional[set[str]] = None) -> None:
        super().__init__(values)
        self.read = set() if read is None else read

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def keys(self):  # ``key in config.keys()``, as DeepSpeed writes some lookups, is a lookup too
        return self

    def __copy__(self) -> "_RecordedReads":
        return _RecordedReads(self, self.read)


@contextmanager
def _deepspeed_logger_quiet() -> Iterator[None]:
    """DeepSpeedConfig logs "world_size = 1" when it parses outside a process group: a multi-rank run reads it as its own."""
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.cache
def deepspeed_keys() -> frozenset[str]:
    """The top-level keys DeepSpeed reads: those its own parser (``DeepSpeedConfig``, which deepspeed.initialize
    runs) looks up while parsing a minimal config, recorded as it does so. DeepSpeed ignores any other top-level
    key without a word, so asking DeepSpeed itself keeps the set current with the installed version (its
    removed keys are among them: DeepSpeed refuses those with its own message)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    recorded = _RecordedReads({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    with _deepspeed_logger_quiet():
        DeepSpeedConfig(recorded)
    return frozenset(key for key in recorded.read if isinstance(key, str))


def read_ds_config(path: Optional[str]) -> dict[str, Any]:
    if not path:
        return {}
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"DeepSpeed config '{path}' is a directory; pass the JSON file, e.g. --ds_config configs/zero2.json "
                          "(or zero0..zero3).")
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config '{path}' does not exist; pass --ds_config configs/zero2.json (or zero0..zero3).")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"DeepSpeed config '{path}' is not UTF-8 text (byte {error.start}): pass --ds_config "
                          "configs/zero2.json (or zero0..zero3).") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON: {error}.") from error


def check_ds_keys(user: dict[str, Any], where: str) -> None:
    """Keys DeepSpeed would not act on, before any work: a top-level key it does not read (it ignores those:
    ``"zero"`` trained at ZeRO-0, ``"max_grad_norm"`` changed no clipping), named with the closest key it
    reads, and the zero_optimization and bf16 sections through DeepSpeed's own models (which would
    otherwise refuse them only once the model is built, with a traceback)."""
    known = deepspeed_keys()
    for key in user:
        if key not in known:
            close = OTHER_NAMES.get(key) or (difflib.get_close_matches(key, known, n=1, cutoff=0.8) or [None])[0]
            fix = f"did you mean '{close}'?" if close else ("remove it (DeepSpeed's keys: "
                                                            "https://www.deepspeed.ai/docs/config-json/).")
            raise ConfigError(f"{where} has the key '{key}', which DeepSpeed would ignore: {fix}")
    from deepspeed.runtime.precision_config import get_bfloat16_config
    from deepspeed.runtime.zero.config import get_zero_config
    from pydantic import ValidationError

    for section, parse in (("zero_optimization", get_zero_config), ("bf16", get_bfloat16_config)):
        try:
            parse(user)
        except ValidationError as error:
            problems = "; ".join(f"{section}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise ConfigError(f"{where}: {problems}.") from None


def check_ds_sections(user: Any, where: str) -> None:
    """The JSON is an object and its sections are objects (``"bf16": true`` would fail deep inside)."""
    if not isinstance(user, dict):
        raise ConfigError(f"{where} must hold a JSON object of DeepSpeed keys, got {type(user).__name__}.")
    for key in SECTIONS:
        if key in user and not isinstance(user[key], dict):
            raise ConfigError(f"{where}: '{key}' must be a JSON object such as {{\"enabled\": true}}, got {user[key]!r}.")


def check_ds_values(user: dict[str, Any], where: str) -> None:
    """Values DeepSpeed would take and misread later: Hugging Face Trainer-style "auto" (only that Trainer
    fills it in; DeepSpeed reads ``"bf16": {"enabled": "auto"}`` as disabled, a silent fp32 run, and
    ``"gradient_clipping": "auto"`` fails at the first optimizer step), a clipping threshold that is not a
    number, and a ZeRO stage that is not the number 0-3 (``"3"`` passes DeepSpeed's parser but not our
    comparisons)."""
    def find_auto(section: dict[str, Any], path: str) -> None:
        for key, value in section.items():
            name = f"{path}{key}"
            if isinstance(value, dict):
                find_auto(value, f"{name}.")
            elif value == "auto" and name != "data_types.keep_in_fp32_modules":  # DeepSpeed's own default there
                raise ConfigError(
                    f"{where} sets {name} to \"auto\", a placeholder that only the Hugging Face Trainer fills in. "
                    "doge-dist sets batch sizes and precision from the run config (train.micro_batch_size, "
                    f"train.gradient_accumulation_steps, train.bf16): give {name} an explicit value, or remove it."
                )

    find_auto(user, "")
    for key in DTYPE_KEYS:  # DeepSpeed's parser keeps them as given; its engine converts them once the model is built
        try:
            data_type(user, key)
        except ValueError:
            raise ConfigError(f"{where}: data_types.{key} = {user['data_types'][key]!r} is not a dtype DeepSpeed knows: "
                              "use fp32 or bf16 (doge-dist trains in those).") from None
    clip = user.get("gradient_clipping", 0)  # only a given value is checked; a missing one is DeepSpeed's default
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"{where}: gradient_clipping must be a number >= 0 (the largest gradient norm; 0 turns "
                          f"clipping off; without the key DeepSpeed clips at 1.0), got {clip!r}.")
    stage = user.get("zero_optimization", {}).get("stage", 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3 written as a JSON number, got {stage!r}.")


def check_no_optimizer_offload(user: dict[str, Any], where: str) -> None:
    """ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own CPU Adam: ``deepspeed.initialize``
    refuses doge-dist's torch AdamW (its ``zero_force_ds_cpu_optimizer`` check) once the model is built.
    Read through DeepSpeed's model, so the older ``cpu_offload: true`` is caught too."""
    from deepspeed.runtime.zero.config import get_zero_config

    offload = get_zero_config(user).offload_optimizer
    if offload is not None and offload.device != "none":
        raise ConfigError(
            f"{where} sets zero_optimization.offload_optimizer (or the older cpu_offload) to device {offload.device!r}: "
            "ZeRO-Offload is not supported, because doge-dist builds its own AdamW (the weight-decay groups of "
            "train.decay_groups) and DeepSpeed offloads only its own CPU Adam. Remove it; to save memory use ZeRO-3 "
            "without offload (configs/zero3.json), a smaller train.micro_batch_size with a larger "
            "train.gradient_accumulation_steps, or train.activation_checkpointing=true (launch/plan.py shows what fits)."
        )


def check_with_deepspeed(ds: dict[str, Any], where: str) -> None:
    """Everything else DeepSpeed checks in its config (removed keys such as "amp", value types), here
    rather than in ``deepspeed.initialize`` once the model is built. Its batch arithmetic counts
    the ranks of the process group if one exists (else one rank), so the batch size is given for those.
    Also the keys inside a section DeepSpeed reads key by key (``READ_BY_KEY``) that it would ignore:
    ``"data_types": {"grad_accum_type": "fp32"}`` accumulated in bf16 without a word. Found as the top-level
    ones are, by recording what its parser looks up (the sections it reads through its pydantic models,
    zero_optimization, bf16, the monitors, refuse unknown keys themselves)."""
    import torch.distributed as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    sections = {key: _RecordedReads(value) for key, value in ds.items() if key in READ_BY_KEY and isinstance(value, dict)}
    checked = {**ds, **sections,
               "train_batch_size": ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * ranks}
    try:
        with _deepspeed_logger_quiet():
            DeepSpeedConfig(checked)
    except Exception as error:  # DeepSpeedConfigError, pydantic's ValidationError, ValueError, AssertionError...
        raise ConfigError(f"{where}: DeepSpeed refuses it: {error}") from None
    for section, values in sections.items():
        unread = [key for key in values if values.read and key not in values.read]
        if unread:
            close = (difflib.get_close_matches(unread[0], values.read, n=1, cutoff=0.6) or [None])[0]
            fix = f"did you mean '{section}.{close}'?" if close else f"remove it (DeepSpeed reads {', '.join(sorted(values.read))})."
            raise ConfigError(f"{where} has {section}.{unread[0]}, which DeepSpeed would ignore: {fix}")


def check_engine_settings(ds: dict[str, Any], where: str) -> None:
    """What ``deepspeed.initialize`` (its engine, ZeRO optimizers and monitors) refuses only once the process
    group and the model are built, with an assertion traceback on every rank: refused here with the fix."""
    import importlib.util

    from deepspeed.runtime.precision_config import get_bfloat16_config
    from deepspeed.runtime.zero.config import get_zero_config

    for section, module in (("wandb", "wandb"), ("comet", "comet_ml")):
        if ds.get(section, {}).get("enabled") and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{where} enables '{section}', but {module} is not installed: pip install {module}, or "
                              f"remove '{section}' (TensorBoard logs are written to run.dir anyway).")
    precision = torch.bfloat16 if bf16_enabled(ds) else torch.float32
    if data_type(ds, "param_dtype") not in (None, precision):
        raise ConfigError(f"{where} sets data_types.param_dtype = {ds['data_types']['param_dtype']!r}, but the run trains in "
                          f"{'bf16' if precision == torch.bfloat16 else 'fp32'} (bf16.enabled, or train.bf16): remove "
                          "data_types.param_dtype, which DeepSpeed requires to match.")
    bf16 = get_bfloat16_config(ds)
    if bf16.bf16_master_weights_and_grads or bf16.bf16_optimizer_states:
        raise ConfigError(f"{where} sets bf16.bf16_master_weights_and_grads or bf16.bf16_optimizer_states, which DeepSpeed "
                          "supports only with ZeRO-Offload's CPU Adam, and doge-dist builds its own AdamW: remove them.")
    zero = get_zero_config(ds)
    if zero_stage(ds) >= 2 and zero.reduce_scatter and (ds.get("prescale_gradients")
                                                        or ds.get("gradient_predivide_factor", 1.0) != 1.0):
        raise ConfigError(f"{where} sets prescale_gradients or gradient_predivide_factor, which DeepSpeed does not support "
                          f"at ZeRO stage {zero_stage(ds)} with reduce_scatter: remove them (the averaged gradient is the same).")
    if zero.offload_param is not None and zero.offload_param.device == "nvme":
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            raise ConfigError(f"{where} offloads parameters to nvme, which needs DeepSpeed's async_io op (libaio), not "
                              "available here: install libaio (libaio-dev) and reinstall DeepSpeed, or offload to cpu.")


def data_type(ds: dict[str, Any], key: str) -> Optional[torch.dtype]:
    """``data_types.<key>`` as DeepSpeed reads it (None: not set; for grad_accum_dtype, the model's dtype)."""
    from deepspeed.runtime.config import DtypeEnum

    name = ds.get("data_types", {}).get(key)
    return None if name is None else DtypeEnum(name).value


def check_grad_accum_dtype(ds: dict[str, Any], where: str) -> None:
    """DeepSpeed accumulates bf16 gradients in another dtype only with ZeRO (its BF16_Optimizer at
    ZeRO-1, the ZeRO optimizers' partitions at 2-3); at ZeRO-0 ``deepspeed.initialize`` raises
    NotImplementedError once the model is built."""
    dtype = data_type(ds, "grad_accum_dtype")
    if bf16_enabled(ds) and zero_stage(ds) == 0 and dtype not in (None, torch.bfloat16):
        raise ConfigError(f"{where} sets data_types.grad_accum_dtype = {ds['data_types']['grad_accum_dtype']!r} with bf16 at "
                          "ZeRO stage 0, which DeepSpeed does not support: use ZeRO stage 1 (configs/zero1.json) for "
                          "gradients accumulated in fp32, or remove data_types.")


def gradient_clipping(ds: dict[str, Any]) -> float:
    """The largest gradient norm, as DeepSpeed reads it: a missing key is its default, 1.0 (0 turns clipping off)."""
    from deepspeed.runtime.config import get_gradient_clipping

    return float(get_gradient_clipping(ds))


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def bf16_enabled(ds: dict[str, Any]) -> bool:
    """As DeepSpeed reads it: "bf16", or its older name "bfloat16", with "enabled" parsed as a boolean."""
    from deepspeed.runtime.precision_config import get_bfloat16_config

    return get_bfloat16_config(ds).enabled


def resolve_ds_config(user: dict[str, Any], train: TrainConfig, dp_size: int, where: str = "the DeepSpeed config") -> dict[str, Any]:
    """The effective DeepSpeed config: ``user`` + batch sizes (+ ``train.bf16`` when set)."""
    check_ds_sections(user, where)
    check_ds_values(user, where)
    for key, instead in YAML_INSTEAD.items():
        if key in user and (key != "fp16" or user[key].get("enabled", False)):
            raise ConfigError(f"{where} sets '{key}', which doge-dist takes from the run config instead: {instead} Remove the key.")
    if user.get("data_efficiency", {}).get("enabled"):
        raise ConfigError(f"{where} enables 'data_efficiency': DeepSpeed applies its curriculum and data sampling only in "
                          "its own data loader (deepspeed_io) and random-LTD only through its layer wrappers, neither of "
                          "which doge-dist uses, so it would change nothing. Remove the key.")
    if user.get("checkpoint", {}).get("load_universal"):
        raise ConfigError(f"{where} sets checkpoint.load_universal: a resume that changes the parallel sizes converts the "
                          "checkpoint to DeepSpeed's universal format and loads it so by itself, and an ordinary resume "
                          "cannot load universal. Remove the key.")
    wanted = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * dp_size,
    }
    for key, value in wanted.items():
        if key in user and user[key] != value:
            raise ConfigError(
                f"{where} sets {key} = {user[key]}, but the YAML gives {value} (train.micro_batch_size "
                f"{train.micro_batch_size} x train.gradient_accumulation_steps {train.gradient_accumulation_steps} x "
                f"data-parallel size {dp_size}). Batch sizes belong in the YAML: remove {key} from the JSON."
            )
    ds = copy.deepcopy(user)
    ds.update(wanted)
    if train.bf16 is not None:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": train.bf16}
    check_ds_keys(user, where)
    check_no_optimizer_offload(user, where)
    check_with_deepspeed(ds, where)
    check_engine_settings(ds, where)
    check_grad_accum_dtype(ds, where)
    ds.setdefault("steps_per_print", 10**9)  # our own log line replaces DeepSpeed's
    ds["gradient_clipping"] = gradient_clipping(ds)  # stated: the run's ds_config.json shows the threshold it clips at
    return ds
