#!/usr/bin/env python
r"""Pretrain a Doge model with DeepSpeed.

    deepspeed launch/pretrain.py --config configs/doge_20m.yaml --ds_config configs/zero1.json [section.key=value ...]
    torchrun --nproc_per_node 8 launch/pretrain.py --config ... --ds_config ...
    python launch/pretrain.py --config configs/doge_tiny_cpu.yaml --ds_config configs/zero0.json train.max_steps=20 \
        train.warmup_steps=2 train.decay_steps=4 run.dir=runs/try0

Everything the run writes goes under run.dir. A restart resumes from its latest checkpoint.
"""

from doge_dist.train.cli import main_pretrain, run_launcher

if __name__ == "__main__":
    run_launcher(__doc__, "configs/*.yaml", main_pretrain)
