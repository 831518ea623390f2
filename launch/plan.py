#!/usr/bin/env python
"""How much GPU memory a run needs, before it runs.

    python launch/plan.py --config configs/doge_160m.yaml --ds_config configs/zero2.json --gpus 1 --gpu-mem-gb 24
    python launch/plan.py --config configs/doge_320m.yaml --gpus 16 --gpu-mem-gb 80 parallel.tensor_parallel=2
    python launch/plan.py --config configs/dpo_doge_20m.yaml --task dpo run.init_from=runs/sft_doge_20m

Prints bytes per GPU for parameters, gradients, optimizer states and communication buffers (per ZeRO
stage, tensor and expert parallel size), activations per sequence with and without activation
checkpointing, whether the configured micro-batch fits, the largest one that does, and the
gradient accumulation that keeps the recipe's global batch on --gpus GPUs. The model behind the
numbers is described in doge_dist/plan.py.

--accumulation prints only that accumulation (slurm/launch.sh uses it), or the one a
train.gradient_accumulation_steps= override fixes.
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import yaml

from doge_dist.config import Config, ConfigError, ModelConfig, expand_home, load_config
from doge_dist.model.flops import parameter_count
from doge_dist.train.cli import input_errors
from doge_dist.plan import TASKS, accumulation_steps, check_run, format_plan, make_plan, recipe_global_batch

# The plan imports DeepSpeed to check the JSON as the trainer does; on a machine without a GPU (a login node) its
# "Setting accelerator to CPU" line would read as if the plan were for the CPU.
logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


def planned_model(config_path: str, config: Config, overrides: list[str]) -> ModelConfig:
    """The model launch/sft.py and dpo.py train: run.init_from's for a YAML without a model section."""
    from doge_dist.config import inherits_model
    from doge_dist.train.finetune import continued_model

    if not inherits_model(config.run.init_from, yaml.safe_load(Path(config_path).read_text()), overrides):
        return config.model
    if not Path(config.run.init_from).exists():
        raise ConfigError(f"{config_path} has no model section: its model is the one run.init_from = "
                          f"'{config.run.init_from}' holds, which does not exist yet. Plan the model it will be with "
                          f"an override such as model.preset=doge-20m, or point run.init_from at an existing run.")
    return continued_model(config.run.init_from, overrides)


def fixed_accumulation(config: Config, dp: int, global_batch: Optional[int]) -> int:
    """The accumulation an override fixed, which the trainer takes as given (docs/multinode.md): the global
    batch is then micro x accumulation x dp, and a --global-batch (GLOBAL_BATCH) that says otherwise is refused
    rather than silently dropped."""
    train = config.train
    fixed = train.micro_batch_size * train.gradient_accumulation_steps * dp
    if global_batch is not None and global_batch != fixed:
        raise ConfigError(
            f"The global batch {global_batch} (--global-batch; GLOBAL_BATCH for slurm/launch.sh) is not the "
            f"train.micro_batch_size {train.micro_batch_size} x train.gradient_accumulation_steps "
            f"{train.gradient_accumulation_steps} x data-parallel size {dp} = {fixed} the overrides fix: drop one of them."
        )
    return train.gradient_accumulation_steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("--ds_config", default=None, help="DeepSpeed JSON (default: run.ds_config of the YAML)")
    parser.add_argument("--gpus", type=int, default=1, help="total GPUs (nodes x GPUs per node)")
    parser.add_argument("--gpu-mem-gb", type=float, default=24.0, help="memory of one GPU in GB (1e9 bytes)")
    parser.add_argument("--reserve-gb", type=float, default=1.5,
                        help="CUDA context, allocator fragmentation, NCCL: memory the model cannot use")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step to keep (default: the YAML's micro x accumulation)")
    parser.add_argument("--accumulation", action="store_true", help="print only the accumulation steps for --gpus")
    parser.add_argument("--task", choices=TASKS, default="pretrain",
                        help="the trainer that runs the config: launch/pretrain.py, sft.py (planned as pretrain.py) "
                             "or dpo.py (a sample is a pair; the frozen reference model)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for launch/pretrain.py")
    args = parser.parse_args()
    try:
        from doge_dist.train.ds_config import read_ds_config

        recipe = load_config(args.config)
        config = load_config(args.config, args.overrides, fine_tuning=True)  # the model as planned_model finds it
        ds_path = expand_home(args.ds_config) or config.run.ds_config  # --ds_config=~/x: the shell leaves it
        if not ds_path:
            raise ConfigError("No DeepSpeed config: pass --ds_config configs/zero2.json (or set run.ds_config in the YAML).")
        config.model = planned_model(args.config, config, args.overrides)  # the layout must split this model
        if args.accumulation:  # the launcher's question only: no model needs building
            layout, _ = check_run(config, read_ds_config(ds_path), args.gpus, f"DeepSpeed config '{ds_path}'")
            dp = layout.dp_size
            if any(o.startswith("train.gradient_accumulation_steps=") for o in args.overrides):
                print(fixed_accumulation(config, dp, args.global_batch))
                return 0
            global_batch = recipe_global_batch(recipe) if args.global_batch is None else args.global_batch
            print(accumulation_steps(global_batch, config.train.micro_batch_size, dp))
            return 0
        plan = make_plan(recipe, config, read_ds_config(ds_path), args.gpus, args.gpu_mem_gb, args.reserve_gb,
                         args.global_batch, args.task, f"DeepSpeed config '{ds_path}'")
    except input_errors() as error:  # as the trainer reports them (a run.init_from without weights too)
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = f"{args.config} + {ds_path}" + (f" + {' '.join(args.overrides)}" if args.overrides else "")
    print("\n".join(format_plan(plan, name, parameter_count(config.model))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
