#!/usr/bin/env bash
# One device session on one H100: the CUDA tests (the compiled FlexAttention, flash-attn and
# transformer-engine kernels, the compiled decode step against the eager one), the GPU benchmarks of
# doge-320m and doge-20m against transformers (our default flex path and our SDPA path in the same
# run, with a profile of the 320m step), a short DeepSpeed ZeRO-2 run of the trainer on the GPU,
# exploration runs for the throughput and MFU targets, then decode. The first session measured about
# 6 minutes for the steps before the exploration; BUDGET_S (540 s by default) caps the whole script,
# so it fits one 10-minute device call.
# Most important first: every step has its own time limit and a failure does not stop the others. The
# limits add up to about three times BUDGET_S: a step that finds fewer than 20 s left is skipped, so
# when time runs out the last steps go first: the decode benches, then the exploration runs, then the
# flash-attn bench and the trainer run. The CUDA tests come first: a benchmark of a wrong kernel is
# worth nothing, and they are the only check of the compiled decode step's correctness on a GPU.
# Copy the JSON lines it prints (also $OUT/figures.jsonl) into docs/performance.md with the device,
# date and commit.
#
#   bash launch/gpu_check.sh         # PY=python, DEEPSPEED=deepspeed by default; OUT=dir keeps the logs
# The trainer step needs the `make demo` data (data/sample_train_text_document.*, data/tokenizer).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python}
DEEPSPEED=${DEEPSPEED:-deepspeed}
OUT=${OUT:-/tmp/gpu_check}  # gets figures.jsonl and gpu_check_logs.tar.gz (every step's log)
LOGS=$(mktemp -d)
mkdir -p "$OUT"
status=0

BUDGET_S=${BUDGET_S:-540}  # the whole script's seconds: a step gets at most what is left, none once it is spent
START_S=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, keep going on failure
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START_S)))
    if [ "$left" -lt 20 ]; then
        echo "=== $name skipped: the ${BUDGET_S}s budget is spent (BUDGET_S=... to allow more)"
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; status=1; }
}

echo "commit ${DOGE_DIST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, $(date -u +%Y-%m-%d)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step cuda_tests 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests  # compiles for several lengths: minutes
BENCH=("$PY" launch/bench.py --dtype bf16 --compile --models "ours,ours_sdpa,hf_eager,hf_sdpa")
step bench_320m 200 "${BENCH[@]}" --preset doge-320m --seq-len 2048 --micro-batch 4 --steps 8 --warmup 3 --profile 25
step bench_20m 150 "${BENCH[@]}" --preset doge-20m --seq-len 2048 --micro-batch 16 --steps 10 --warmup 3
if [ -f data/sample_train_text_document.bin ] && [ -f data/tokenizer/tokenizer.model ]; then
    # doge-20m's shape with the demo tokenizer's 8192 ids, compiled layers, ZeRO-2, bf16: the trainer's own tokens/s and MFU
    step train_20m 100 "$DEEPSPEED" --num_gpus 1 launch/pretrain.py --config configs/doge_20m.yaml --ds_config configs/zero2.json \
        model.vocab_size=8192 "data.train_data=[data/sample_train_text_document]" data.tokenizer=data/tokenizer/tokenizer.model \
        data.split=100,0,0 train.max_steps=40 train.gradient_accumulation_steps=1 train.warmup_steps=5 train.decay_steps=5 \
        train.log_interval=10 train.eval_interval=0 train.save_interval=0 train.compile=true run.dir=/tmp/gpu_check_run
else
    echo "=== no demo data (make demo builds it): skipping the trainer run"
fi
if "$PY" -c "import flash_attn" 2>/dev/null; then  # the [gpu] extra: the same 320m bench through flash-attn
    step bench_320m_flash 200 "${BENCH[@]}" --preset doge-320m --seq-len 2048 --micro-batch 4 --steps 8 --warmup 3 --attn-backend flash
else
    echo "=== flash-attn not installed: pip install --no-build-isolation -e '.[gpu]' to also bench --attn-backend flash"
fi

# exploration for the H100 targets (docs/performance.md): the launch-bound doge-20m step with 4x the tokens
# per step (1M tokens/s target), the 320m step (45% MFU target) with twice the tokens per step, with CUDA
# graphs (reduce-overhead), and with autotuned kernels (FlexAttention's block sizes among them)
step bench_20m_mb64 100 "$PY" launch/bench.py --dtype bf16 --compile --models ours --preset doge-20m --seq-len 2048 \
    --micro-batch 64 --steps 6 --warmup 3
step bench_320m_mb8 120 "$PY" launch/bench.py --dtype bf16 --compile --models ours --preset doge-320m --seq-len 2048 \
    --micro-batch 8 --steps 6 --warmup 3
step bench_320m_graphs 150 "$PY" launch/bench.py --dtype bf16 --compile-mode reduce-overhead --models ours \
    --preset doge-320m --seq-len 2048 --micro-batch 4 --steps 8 --warmup 3
step bench_320m_autotune 180 "$PY" launch/bench.py --dtype bf16 --compile-mode max-autotune-no-cudagraphs --models ours \
    --preset doge-320m --seq-len 2048 --micro-batch 4 --steps 8 --warmup 3

# GPU decode has no target (the 3x decode target is a CPU one): last, the first skipped when time runs out
step decode_20m 120 "$PY" launch/bench.py --dtype bf16 --preset doge-20m --decode --steps 5
step decode_20m_compiled 150 "$PY" launch/bench.py --dtype bf16 --preset doge-20m --decode --compile --steps 5 --models ours,hf_eager

echo "=== JSON figures"
grep -h '^{' "$LOGS"/bench_*.log "$LOGS"/decode_*.log | tee "$OUT/figures.jsonl"
tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$LOGS" .
exit $status
