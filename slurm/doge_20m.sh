#!/bin/bash
# Doge-20M pretraining (configs/doge_20m.yaml) on Slurm. Submit from the repository root:
#   mkdir -p logs && sbatch slurm/doge_20m.sh [section.key=value ...]
#   sbatch --nodes=4 slurm/doge_20m.sh train.micro_batch_size=8   # the global batch stays the recipe's (32 GPUs x
#                                                               # micro 16 would be 512 sequences: micro 8, accumulation 1)
#   sbatch --job-name=doge_20m_lr2x slurm/doge_20m.sh train.lr=1.6e-2   # another experiment: runs/doge_20m_lr2x
#   sbatch --dependency=afterany:JOBID slurm/doge_20m.sh      # chain: continues from the latest checkpoint
# The run lives in runs/$SLURM_JOB_NAME and resumes from its latest checkpoint. 120 s before the time
# limit the trainer saves and the job requeues itself (slurm/launch.sh, docs/multinode.md).
#SBATCH --job-name=doge_20m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

# Slurm runs a copy of this file from its spool directory, in the directory sbatch was run in (or its
# --chdir): paths are relative to that, which must be the repository root.
[[ -f slurm/launch.sh ]] || { echo "error: slurm/launch.sh is not in $PWD, the job's working directory (where sbatch" \
    "was run, or its --chdir). Submit from the repository root: cd /path/to/doge-dist && sbatch slurm/doge_20m.sh" >&2; exit 2; }
exec bash slurm/launch.sh configs/doge_20m.yaml configs/zero1.json "$@"
