#!/usr/bin/env python
"""Pretrain a Doge model with DeepSpeed.

    deepspeed launch/pretrain.py --config configs/doge_20m.yaml --ds_config configs/zero1.json [section.key=value ...]
    torchrun --nproc_per_node 8 launch/pretrain.py --config ... --ds_config ...
    python launch/pretrain.py --config configs/doge_tiny_cpu.yaml --ds_config configs/zero0.json train.max_steps=20

Everything the run writes goes under run.dir. A restart resumes from its latest checkpoint.
"""
import argparse
import sys

from doge_dist.train.cli import main_pretrain

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (configs/*.yaml)")
    parser.add_argument("--ds_config", default=None, help="DeepSpeed JSON (configs/zero0.json .. zero3.json)")
    parser.add_argument("--resume", default=None, help="auto | never | PATH (same as run.resume=...)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=20 run.dir=runs/try1")
    args = parser.parse_args()
    overrides = args.overrides + ([f"run.resume={args.resume}"] if args.resume else [])
    sys.exit(main_pretrain(args.config, args.ds_config, overrides))
