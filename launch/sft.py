#!/usr/bin/env python
"""Supervised fine-tuning (chat data, loss on assistant turns) of a pretrained Doge with DeepSpeed.

    deepspeed launch/sft.py --config configs/sft_doge_20m.yaml [section.key=value ...]
    torchrun --nproc_per_node 8 launch/sft.py --config configs/sft_doge_60m.yaml --ds_config configs/zero2.json
    python launch/sft.py --config configs/sft_tiny_cpu.yaml --ds_config configs/zero0.json

The same run directory layout, checkpoints, resume and TensorBoard scalars as launch/pretrain.py;
run.init_from names the pretrained run directory or Hugging Face directory.
Export with launch/export_hf.py: the tokenizer (data.tokenizer, with its chat template) goes along.
"""

from functools import partial

from doge_dist.train.cli import main_finetune, run_launcher

if __name__ == "__main__":
    run_launcher(__doc__, "configs/sft_*.yaml", partial(main_finetune, "sft"))
