#!/usr/bin/env python
"""DPO (preference pairs, frozen reference model) of a fine-tuned Doge with DeepSpeed.

    deepspeed launch/dpo.py --config configs/dpo_doge_20m.yaml [section.key=value ...]
    torchrun --nproc_per_node 8 launch/dpo.py --config configs/dpo_doge_60m.yaml --ds_config configs/zero2.json
    python launch/dpo.py --config configs/dpo_tiny_cpu.yaml --ds_config configs/zero0.json

The same run directory layout, checkpoints, resume and TensorBoard scalars as launch/pretrain.py;
run.init_from names the SFT run directory or Hugging Face directory (also the reference model: the
checkpoint it names at the start, kept by a resume). DPO trains with dropout off, as TRL does by default.
Export with launch/export_hf.py: the tokenizer (data.tokenizer, with its chat template) goes along.
"""

from functools import partial

from doge_dist.train.cli import main_finetune, run_launcher

if __name__ == "__main__":
    run_launcher(__doc__, "configs/dpo_*.yaml", partial(main_finetune, "dpo"))
