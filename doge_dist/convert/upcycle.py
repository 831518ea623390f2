"""Dense -> sparse continuation: a dense Doge becomes the CDMoE model of the same shape.

The dense MLP keeps its parameter names as the shared expert; the router and the expert tables are
new, with ``up_embed`` zero so the converted model computes exactly the dense function at step 0.
"""
import dataclasses

import torch

from ..config import RUNTIME_SWITCHES, ConfigError, ModelConfig, apply_overrides
from ..model import DogeForCausalLM, build_model

MOE_ONLY_FIELDS = {"is_moe", "num_experts", "num_experts_per_tok", "norm_topk_prob", "output_router_logits",
                   "router_aux_loss_coef", "router_layout", "balance_loss"}
NEW_PARAMETERS = ("mlp.router_gate.weight", "mlp.down_embed.weight", "mlp.up_embed.weight")


def is_new_moe_parameter(name: str) -> bool:
    return name.endswith(NEW_PARAMETERS)


def check_moe_target(moe: ModelConfig) -> ModelConfig:
    if not moe.is_moe:
        raise ConfigError("The target config is not a MoE config (model.is_moe is false); pick a '-moe' preset.")
    return moe


def moe_config_for(dense: ModelConfig, moe: ModelConfig) -> ModelConfig:
    """The MoE config ``moe`` checked against ``dense``: every non-MoE field must agree. All differences
    are named at once, with the overrides that fix them (the demo's shape differs from its preset in four)."""
    if dense.is_moe:
        raise ConfigError("The checkpoint to upcycle is already a MoE model.")
    check_moe_target(moe)
    # use_cache: a generation flag (fine-tuned directories often carry false), not a shape or the function
    differing = dense.fields_differing_from(moe, ignore=MOE_ONLY_FIELDS | set(RUNTIME_SWITCHES) | {"use_cache"})
    if differing:
        def values(config: ModelConfig) -> str:
            return " and ".join(repr(getattr(config, name)) for name in differing)

        names = " and ".join(f"model.{name}" for name in differing)
        overrides = " ".join(f"model.{name}={getattr(dense, name)!r}" for name in differing)
        raise ConfigError(
            f"{names} {'differs' if len(differing) == 1 else 'differ'}: the dense checkpoint has {values(dense)}, the "
            f"MoE config {values(moe)}. Upcycling needs the same shape: pick the matching preset or override "
            f"{'it' if len(differing) == 1 else 'them'} ({overrides})."
        )
    return moe


def upcycle(dense: DogeForCausalLM, moe_config: ModelConfig, seed: int = 0) -> DogeForCausalLM:
    """A MoE model holding ``dense``'s weights, new router/experts, ``up_embed`` zero."""
    moe_config_for(dense.config, moe_config)
    torch.manual_seed(seed)
    moe = build_model(moe_config)
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(is_new_moe_parameter(n) for n in missing), (missing, unexpected)
    for layer in moe.model.layers:
        torch.nn.init.zeros_(layer.mlp.up_embed.weight)
    return moe


def moe_config_from(preset: str, overrides=()) -> ModelConfig:
    """``preset`` with ``model.key=value`` overrides (the training config's), as the trainer reads them."""
    if any(not item.startswith("model.") for item in overrides):
        raise ConfigError(f"Overrides {list(overrides)} must all be model.key=value (the MoE model's shape).")
    model = apply_overrides({"model": {"preset": preset}}, list(overrides))["model"]
    return check_moe_target(ModelConfig.from_dict(model, "the upcycle overrides"))


def upcycle_to_hf(source: str, preset: str, output: str, step=None, seed: int = 0, overrides=(), tokenizer=None):
    """``launch/upcycle.py``: load a dense model from a run or HF directory, upcycle it to ``preset``
    (with ``model.key=value`` overrides), save it with its tokenizer as a Hugging Face directory: ``tokenizer``
    (--tokenizer), else an HF directory's own tokenizer files or the run's data.tokenizer (as export_hf)."""
    from pathlib import Path

    from ..train.export import load_checkpoint_model, resolve_tokenizer, save_hf_with_tokenizer
    from ..train.finetune import model_config_of
    from .hf import check_output, load_hf, save_hf

    check_output(output)  # a bad output, preset, override or tokenizer fails before the dense model is loaded
    if Path(output).resolve() == Path(source).resolve():
        raise ConfigError(f"--output '{output}' is the dense model being upcycled, which the MoE model would replace: "
                          "write it to a new directory.")
    moe_config = moe_config_from(preset, overrides)
    dense_config = model_config_of(source, "--checkpoint")  # from its config.json or meta file, before it is loaded
    moe_config_for(dense_config, moe_config)
    hf_source = Path(source, "config.json").is_file()
    if hf_source and step is not None:
        raise ConfigError(f"--step {step}: --checkpoint '{source}' is a Hugging Face directory, which holds one set of "
                          "weights and no steps; drop --step, or pass the run directory the steps are in.")
    if not (hf_source and tokenizer is None):
        tokenizer = resolve_tokenizer(source, step, tokenizer, dense_config.vocab_size)
    dense = load_hf(source) if hf_source else load_checkpoint_model(source, step)
    moe = upcycle(dense, dataclasses.replace(moe_config, attn_backend=dense.config.attn_backend), seed)
    if tokenizer is None:
        return save_hf(moe, output, tokenizer=source)  # the HF directory's own tokenizer files, copied
    return save_hf_with_tokenizer(moe, output, tokenizer)
