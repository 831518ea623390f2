"""Checkpoints of a tensor x expert parallel run, through DeepSpeed's universal checkpoint.

Under tp x ep, DeepSpeed's model-parallel ranks are megatron-core's expert-tensor-and-model-parallel
group, tensor-parallel fastest: model-parallel rank r = ep_rank * tp + tp_rank. A tensor-parallel
slice is held by the tp ranks' counterparts on every expert-parallel rank, an expert shard by every
tensor-parallel rank of its expert-parallel rank. ``ds_to_universal``'s name categories ("concatenate
along dim d", "replicated") cannot say "split over one axis of that grid and replicated over the
other"; DeepSpeed's affine maps (``deepspeed.checkpoint.affine``) can, so every parameter gets one:

- saving: ``grid_universal_info`` goes into the checkpoint, and ``ds_to_universal`` rebuilds every full
  tensor from it; ``label_universal`` then adds the category keys the category-based loaders read
  (concatenation dim, vocabulary), so the result loads at any other layout like any universal checkpoint;
- loading at tp x ep: ``mark_grid_restore`` attaches each parameter's map, and DeepSpeed cuts this
  rank's piece out of the full tensor with it.

Under tensor parallelism alone the same maps (ep = 1) serve ZeRO-3's loader, which cuts a rank's share
by map only (``apply.parallelize``, ``shape_bare_tensors``, ``deepspeed_restore_group``).

Written here because neither library knows Doge's layout; the merging, cutting and their checks are
DeepSpeed's. The vocabulary is not padded under tp x ep (``check_grid``), so every map is exact.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from .expert import is_expert_param, merge_experts
from .tensor import VOCAB_PARAMS, merge_state_dicts, parameter_shapes, tp_split_dim

UNIVERSAL_STATES = ("fp32", "exp_avg", "exp_avg_sq")


def check_grid(config: ModelConfig, tp: int) -> None:
    if config.vocab_size % tp:
        raise ConfigError(
            f"model.vocab_size ({config.vocab_size}) must be a multiple of parallel.tensor_parallel ({tp}) when "
            "expert parallelism is on too (the vocabulary is not padded then): pad model.vocab_size up to a multiple."
        )


def split_of(name: str) -> tuple[Optional[int], str]:
    """(split dim or None, grid axis it is split over)."""
    if is_expert_param(name):
        return 0, "ep"
    return tp_split_dim(name), "tp"


def grid_map(shape: tuple[int, ...], split_dim: Optional[int], axis: str, tp: int, ep: int):
    """The affine map of one parameter over the tp x ep model-parallel ranks."""
    from deepspeed.checkpoint.affine import AffinePiece, ParamAffineMap, contiguous_split_map, replicated_map

    ranks = range(tp * ep)
    if split_dim is None:
        return replicated_map(shape, tp * ep)
    parts = tp if axis == "tp" else ep

    def index(rank: int) -> int:
        return rank % tp if axis == "tp" else rank // tp

    split = contiguous_split_map(shape, [shape[split_dim] // parts] * parts, split_dim)
    pieces = {
        rank: [AffinePiece(p.shape, p.source_offset, p.source_strides, p.dest_offset, p.dest_strides,
                           locations=[r for r in ranks if index(r) == index(rank)])
               for p in split.pieces_by_rank[index(rank)]]
        for rank in ranks
    }
    return ParamAffineMap(shape, {rank: split.shard_shapes[index(rank)] for rank in ranks}, pieces)


def grid_maps(config: ModelConfig, tp: int, ep: int) -> dict[str, object]:
    return {name: grid_map(shape, *split_of(name), tp, ep) for name, shape in parameter_shapes(config).items()}


def grid_universal_info(config: ModelConfig, tp: int, ep: int) -> dict:
    """``universal_checkpoint_info`` for a tp x ep checkpoint: one affine map per parameter."""
    from deepspeed.checkpoint import constants as uc
    from deepspeed.checkpoint.affine import AFFINE_MAP_FORMAT_VERSION

    maps = {f"^{re.escape(name)}$": m.to_dict() for name, m in grid_maps(config, tp, ep).items()}
    return {"universal_checkpoint_version": 0.2,
            uc.AFFINE_MAP: {uc.AFFINE_MAP_VERSION: AFFINE_MAP_FORMAT_VERSION, uc.AFFINE_MAP_PARAMS: maps}}


def label_universal(universal: Path) -> None:
    """Add to every tensor of a universal checkpoint of an expert-parallel run (merged with affine maps,
    or with ``expert_universal_info``'s rules, which know no tensor-parallel dims) the keys the tensor-parallel
    converter writes: the dimension a loader at another layout splits along, and the vocabulary flag."""
    from deepspeed.checkpoint import constants as uc

    for folder in (universal / "zero").iterdir():
        dim, _ = split_of(folder.name)
        for state in UNIVERSAL_STATES:
            file = folder / f"{state}.pt"
            if not file.is_file():
                continue
            saved = torch.load(file, weights_only=False)
            saved[uc.CAT_DIM] = dim or 0
            if folder.name in VOCAB_PARAMS:
                saved[uc.VOCAB_TENSOR] = True
            torch.save(saved, file)


def shape_bare_tensors(universal: Path, config: ModelConfig) -> None:
    """Put every state ``ds_to_universal`` saved as a bare flat tensor (it does so for a ZeRO-3 checkpoint
    without tensor parallelism) into the form its tensor-parallel merge writes, ``{"param": tensor}`` at
    the parameter's full shape: DeepSpeed's ZeRO-3 loader applies restore maps to that form only, and a
    run at tp > 1 took whole tensors for its shards."""
    from deepspeed.checkpoint import constants as uc

    shapes = parameter_shapes(config)
    for folder in (universal / "zero").iterdir():
        for state in UNIVERSAL_STATES:
            file = folder / f"{state}.pt"
            if file.is_file() and torch.is_tensor(saved := torch.load(file, weights_only=False)):
                torch.save({uc.PARAM: saved.view(shapes[folder.name])}, file)


def mark_grid_restore(model: nn.Module, config: ModelConfig, tp: int, ep: int) -> None:
    """Attach each parameter's affine map, which DeepSpeed's universal loader cuts this rank's piece with
    (ep = 1: tensor parallelism alone, for ZeRO-3's loader; see ``apply.parallelize``)."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META

    maps = grid_maps(config, tp, ep)
    for name, param in model.named_parameters():
        setattr(param, DS_AUTOTP_UC_META, {"conversion": {"affine_map": maps[name].to_dict()}})


@contextmanager
def deepspeed_restore_group(mpu):
    """DeepSpeed's ZeRO-3 universal loader cuts a parameter's piece with its map at this rank's place in
    DeepSpeed's own tensor-parallel group (``deepspeed.utils.groups.get_tensor_model_parallel_group``),
    which only DeepSpeed's AutoTP sets (otherwise an assertion). Ours is the mpu's model-parallel group,
    the ranks the maps are written over: set as DeepSpeed's for the load only."""
    from deepspeed.utils import groups

    unset = mpu is not None and groups._TENSOR_MODEL_PARALLEL_GROUP is None
    if unset:
        groups._TENSOR_MODEL_PARALLEL_GROUP = mpu.get_model_parallel_group()
    try:
        yield
    finally:
        if unset:
            groups._TENSOR_MODEL_PARALLEL_GROUP = None


def merge_grid(shards: list[dict], config: ModelConfig, tp: int) -> dict:
    """Full weights from the model-parallel ranks' state dicts (ordered by model-parallel rank)."""
    per_expert_rank = [merge_state_dicts(shards[i : i + tp], config) for i in range(0, len(shards), tp)]
    return merge_experts(per_expert_rank)
