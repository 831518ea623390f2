#!/bin/bash
# The launcher every slurm/doge_*.sh script hands over to (with exec, so this shell is the batch shell).
#
#   launch.sh CONFIG.yaml DS_CONFIG.json [section.key=value ...]
#
# Runs one srun task per node; each starts torchrun for that node's GPUs (slurm/node.sh). It keeps the
# recipe's global batch (train.micro_batch_size x train.gradient_accumulation_steps of the YAML, a
# single-GPU recipe) on any node count by recomputing the accumulation (a train.gradient_accumulation_steps=
# override fixes it instead; the global batch is then micro x accumulation x GPUs), writes to runs/<experiment>
# and resumes from its latest checkpoint, and on the preemption warning (#SBATCH --signal=B:USR1@120)
# asks the trainer to save and requeues the job. Extra arguments are launch/pretrain.py overrides (not
# run.resume or --resume: the launcher resumes itself) and come last, so they win.
#
# Environment (all optional):
#   EXPERIMENT     run directory name under RUNS_DIR (default: the job name, #SBATCH --job-name)
#   RUNS_DIR       default runs
#   GLOBAL_BATCH   sequences per optimizer step (default: the YAML's micro x accumulation)
#   GPUS_PER_NODE  default: Slurm's SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE
#   PYTHON         the interpreter with doge-dist installed (default: python)
#   MASTER_PORT    rendezvous port on the first node (default: 10000 + job id mod 20000, below
#                  Linux's ephemeral ports 32768-60999, which outgoing connections take)
#   DRY_RUN=1      print the srun command instead of running it
#
# Why torchrun and not the deepspeed launcher: one srun task per node running torchrun needs no ssh,
# no hostfile and no pdsh. The deepspeed-launcher variant is in docs/multinode.md.
set -euo pipefail

# NCCL and network settings that matter on multi-node jobs; uncomment what your cluster needs.
# export NCCL_DEBUG=WARN                        # INFO to see the chosen transport when a job hangs at start
# export NCCL_SOCKET_IFNAME=ib0                 # bootstrap interface: never lo or docker0 (see `ip addr`)
# export GLOO_SOCKET_IFNAME=ib0                 # the same for gloo (rendezvous and CPU collectives)
# export NCCL_IB_HCA=mlx5                       # InfiniBand adapters to use (all by default)
# export NCCL_IB_DISABLE=1                      # Ethernet-only clusters: skip the InfiniBand probe
# export NCCL_NET_GDR_LEVEL=PHB                 # GPUDirect RDMA when NIC and GPU share a PCIe host bridge
# export FI_PROVIDER=efa                        # AWS EFA (with the aws-ofi-nccl plugin)
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a dead rank ends the job instead of hanging it
# export DEEPSPEED_TIMEOUT=30                   # collective timeout in MINUTES (DeepSpeed's default 10) of every
#                                               # process group: raise it for slow saves or conversions
# export CUDA_DEVICE_MAX_CONNECTIONS=1          # needed when tensor-parallel comms overlap compute

if [[ $# -lt 2 ]]; then
    echo "usage: slurm/launch.sh CONFIG.yaml DS_CONFIG.json [section.key=value ...]" >&2
    exit 2
fi
config=$1
ds_config=$2
shift 2
for file in "$config" "$ds_config"; do
    if [[ ! -f $file ]]; then
        echo "error: '$file' does not exist (working directory $PWD). Submit from the repository root, or" \
             "sbatch --chdir=/path/to/doge-dist, and check the CONFIG/DS_CONFIG lines of the slurm/doge_*.sh script." >&2
        exit 2
    fi
done

args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do   # not "${!args[@]}": bash before 4.4 calls an empty array unbound under set -u
    override=${args[i]}
    if [[ $override == --resume ]] && (( i + 1 < ${#args[@]} )); then
        override+=" ${args[i + 1]}"   # the trainer's --resume X
    fi
    if [[ $override == run.resume=* || $override == --resume || $override == "--resume "* || $override == --resume=* ]]; then
        echo "error: '$override': slurm/launch.sh resumes from the latest checkpoint of the run directory itself (it" \
             "passes --resume auto), also when the job is requeued, so it takes no run.resume or --resume: its --resume" \
             "auto would win over a run.resume=, and a --resume of yours would replace it on every requeue. To start" \
             "from another checkpoint, submit under a new --job-name with run.init_from=CHECKPOINT (its weights; add" \
             "run.init_optimizer=true for its optimizer states)." >&2
        exit 2
    fi
done

python=${PYTHON:-python}
nodes=${SLURM_NNODES:?"not inside a Slurm allocation: submit with sbatch (SLURM_NNODES is unset)"}
gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}
gpus_per_node=${gpus_per_node##*:}   # "h100:8" -> 8
experiment=${EXPERIMENT:-${SLURM_JOB_NAME:-doge}}
run_dir=${RUNS_DIR:-runs}/$experiment
# sed -n 1p reads the whole list: head -n 1 exits after the first line, and on a long list scontrol's next write
# dies of SIGPIPE, which pipefail turns into a silent exit 141 of this script
master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
master_port=${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 20000))}

plan_args=(--config "$config" --ds_config "$ds_config" --gpus "$((nodes * gpus_per_node))" --accumulation)
[[ -n ${GLOBAL_BATCH:-} ]] && plan_args+=(--global-batch "$GLOBAL_BATCH")
accumulation=$("$python" launch/plan.py "${plan_args[@]}" "$@")   # an impossible GPU count stops here

# srun does not inherit #SBATCH --cpus-per-task (Slurm 22.05 and later): without it the node's task
# (torchrun, its ranks and their data workers) may be bound to one core.
command=(
    srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+"--cpus-per-task=$SLURM_CPUS_PER_TASK"}
    bash slurm/node.sh
    "$python" -m torch.distributed.run
    --nnodes="$nodes" --nproc-per-node="$gpus_per_node"
    --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port" --rdzv-id="${SLURM_JOB_ID:-0}"
    launch/pretrain.py --config "$config" --ds_config "$ds_config" --resume auto
    "train.gradient_accumulation_steps=$accumulation" "run.dir=$run_dir"
    "$@"
)
if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi

echo "[slurm] job ${SLURM_JOB_ID:-?} ($experiment): $nodes node(s) x $gpus_per_node GPU(s), accumulation $accumulation, run dir $run_dir"
mkdir -p "$run_dir"

# Preemption: Slurm signals this shell (B:USR1) ahead of the time limit. Pass it on (srun forwards
# it to every task; node.sh to the training processes, which save and exit 0), then requeue once
# the step has ended, so the next start resumes from the checkpoint just written.
requeue=0
# shellcheck disable=SC2329  # called by the trap below
on_usr1() {
    echo "[slurm] USR1: asking the trainer to save a checkpoint, then requeueing job $SLURM_JOB_ID"
    requeue=1
    kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap on_usr1 USR1

"${command[@]}" &
srun_pid=$!
status=0
while true; do
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break   # wait returns early when a trapped signal arrives
done

# Only a stop that saved (exit 0) requeues: a failed save (exit 4, e.g. a full disk) or a refused
# start would otherwise come back, fail again and requeue for ever.
if [[ $requeue == 1 && $status == 0 ]]; then
    scontrol requeue "$SLURM_JOB_ID"
elif [[ $requeue == 1 ]]; then
    echo "[slurm] not requeueing job $SLURM_JOB_ID: the trainer exited with status $status after the stop signal (see above)" >&2
fi
exit "$status"
