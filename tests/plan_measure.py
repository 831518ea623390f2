"""Run under torchrun (2 CPU ranks): the bytes each rank's DeepSpeed engine really holds for
parameters, gradients and optimizer states at ZeRO 1, 2 and 3, for tests/test_plan.py.

Tensors are found by walking the engine's module and optimizer objects and counted once per
storage, so a view into a flat buffer is not counted twice. Gradients are measured after the first
micro-batch of two (the accumulation state a recipe sits in most of the time), parameters and
optimizer states after the optimizer step (Adam's moments exist only then).

    python -m torch.distributed.run --nproc_per_node 2 tests/plan_measure.py OUT.json STAGE... [section.key=value...]

A STAGE is 1, 2 or 3, or 1+fp32 for ZeRO-1 with ``data_types.grad_accum_dtype: fp32`` (DeepSpeed's BF16_Optimizer).

The overrides replace OVERRIDES' keys (e.g. the model preset) or add to them (e.g. parallel.expert_parallel=2).
"""
import json
import sys
from pathlib import Path

import deepspeed
import torch

from doge_dist.config import load_config
from doge_dist.parallel.state import initialize_parallel
from doge_dist.train.ds_config import read_ds_config, resolve_ds_config
from doge_dist.train.engine import build_engine

OVERRIDES = ["model.preset=doge-20m", "model.attn_backend=sdpa", "train.micro_batch_size=1",
             "train.gradient_accumulation_steps=2"]


def held_tensors(engine) -> dict[int, tuple[int, str, torch.dtype]]:
    """storage address -> (bytes, where it was found, dtype) for everything the engine holds."""
    found: dict[int, tuple[int, str, torch.dtype]] = {}
    seen: set[int] = set()

    def walk(obj, path: str, depth: int) -> None:
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if obj.device.type != "meta" and storage.data_ptr() and storage.data_ptr() not in found:
                found[storage.data_ptr()] = (storage.nbytes(), path, obj.dtype)
            for name in ("grad", "ds_tensor"):
                if getattr(obj, name, None) is not None:
                    walk(getattr(obj, name), f"{path}.{name}", depth + 1)
        elif isinstance(obj, dict):
            for key, value in list(obj.items()):
                walk(value, f"{path}[{key if isinstance(key, str) else ''}]", depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value, path, depth + 1)
        elif isinstance(obj, torch.optim.Optimizer):
            walk(list(obj.state.values()), f"{path}.state", depth + 1)
            walk(vars(obj), path, depth + 1)
        elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
            walk(vars(obj), path, depth + 1)

    for param in engine.module.parameters():
        walk(param, "param", 0)
    walk(engine.optimizer, "optimizer", 0)
    return found


def by_kind(found) -> dict[str, int]:
    """Gradients: anything named grad; communication buckets: ipg; optimizer: fp32; params: the rest."""
    kinds = {"params": 0, "grads": 0, "optimizer": 0, "buffers": 0}
    for nbytes, path, dtype in found.values():
        kind = ("grads" if "grad" in path.lower() else "buffers" if "ipg" in path.lower()
                else "optimizer" if dtype in (torch.float32, torch.float64) else "params")
        kinds[kind] += nbytes
    return kinds


def ds_config(stage: str) -> dict:
    """configs/zero{N}.json for "N"; "N+fp32" adds DeepSpeed's fp32 gradient accumulation."""
    ds = read_ds_config(str(Path(__file__).resolve().parents[1] / "configs" / f"zero{stage[0]}.json"))
    if stage.endswith("+fp32"):
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def measure(stage: str, overrides: list[str]) -> dict[str, int]:
    config = load_config(None, OVERRIDES + overrides)
    initialize_parallel(config.parallel)
    ds = resolve_ds_config(ds_config(stage), config.train, torch.distributed.get_world_size())
    engine, _ = build_engine(config, ds, torch.device("cpu"))
    ids = torch.randint(0, config.model.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    grads = None
    for _ in range(2):
        engine.backward(engine(ids).logits.float().mean())
        grads = grads if grads is not None else by_kind(held_tensors(engine))["grads"]
        engine.step()
    return {**by_kind(held_tensors(engine)), "grads": grads}


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    overrides = [arg for arg in sys.argv[2:] if "=" in arg]
    results = {stage: measure(stage, overrides) for stage in sys.argv[2:] if "=" not in stage}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        with open(sys.argv[1], "w") as out:
            json.dump(gathered, out)
    # an orderly teardown: exiting with the gloo group alive aborted a rank about one run in ten
    # ("terminate called without an active exception")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
