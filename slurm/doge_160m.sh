#!/bin/bash
# Doge-160M pretraining (configs/doge_160m.yaml) on Slurm. Submit from the repository root:
#   mkdir -p logs && sbatch slurm/doge_160m.sh [section.key=value ...]
#   sbatch --nodes=4 slurm/doge_160m.sh                        # the global batch stays the recipe's
#   sbatch --job-name=doge_160m_lr2x slurm/doge_160m.sh train.lr=8e-3   # another experiment: runs/doge_160m_lr2x
#   sbatch --dependency=afterany:JOBID slurm/doge_160m.sh      # chain: continues from the latest checkpoint
# The run lives in runs/$SLURM_JOB_NAME and resumes from its latest checkpoint. 120 s before the time
# limit the trainer saves and the job requeues itself (slurm/launch.sh, docs/multinode.md).
#SBATCH --job-name=doge_160m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

# Slurm runs a copy of this file from its spool directory, in the directory sbatch was run in (or its
# --chdir): paths are relative to that, which must be the repository root.
[[ -f slurm/launch.sh ]] || { echo "error: slurm/launch.sh is not in $PWD, the job's working directory (where sbatch" \
    "was run, or its --chdir). Submit from the repository root: cd /path/to/doge-dist && sbatch slurm/doge_160m.sh" >&2; exit 2; }
exec bash slurm/launch.sh configs/doge_160m.yaml configs/zero2.json "$@"
