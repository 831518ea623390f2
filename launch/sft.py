#!/usr/bin/env python
"""Supervised fine-tuning (chat data, loss on assistant turns) of a pretrained Doge with DeepSpeed.

    deepspeed launch/sft.py --config configs/sft_doge_20m.yaml [section.key=value ...]
    torchrun --nproc_per_node 8 launch/sft.py --config configs/sft_doge_60m.yaml --ds_config configs/zero2.json
    python launch/sft.py --config configs/sft_tiny_cpu.yaml --ds_config configs/zero0.json

The same run directory layout, checkpoints, resume and TensorBoard scalars as launch/pretrain.py;
run.init_from names the pretrained run directory or Hugging Face directory.
Export with launch/export_hf.py: the tokenizer (data.tokenizer, with its chat template) goes along.
"""
import argparse
import sys

from doge_dist.train.cli import main_finetune

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (configs/sft_*.yaml)")
    parser.add_argument("--ds_config", default=None, help="DeepSpeed JSON (configs/zero0.json .. zero3.json)")
    parser.add_argument("--resume", default=None, help="auto | never | PATH (same as run.resume=...)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=20 run.dir=runs/try1")
    args = parser.parse_args()
    overrides = args.overrides + ([f"run.resume={args.resume}"] if args.resume else [])
    sys.exit(main_finetune("sft", args.config, args.ds_config, overrides))
